"""Shared ground: what two or more roles use and that knows no role -- the wire protocol, the topology config, ZeroMQ
helpers, security, logging, images, tasks and LoRA helpers; editor families in ``families/``, weight transports in
``weights/``. Nothing here imports a role package or ``editrl.scripts``."""
