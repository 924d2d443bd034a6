"""Shared ground: what two or more roles use and that knows no role -- the wire protocol (``wire``) and its codec
(``codec``), the topology config, ZeroMQ helpers, security and key files, logging, images, tasks and LoRA helpers;
editor families in ``families/``, weight transports in ``weights/``. Nothing here imports a role or ``editrl.scripts``."""
