"""The learner role: torchrun ranks that train on scored groups (``loop``), one update (``update``), the objective
(``objective``, ``loss``) and the training engines (``engines``: FSDP2, DeepSpeed ZeRO-3)."""
