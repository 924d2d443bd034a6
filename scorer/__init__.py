"""The scorer role: a stateless reward worker (``worker``) over score backends (``backend``: ``metric``, ``vlm``,
``editscore``, ``composite``) and judge engines (``engines/``)."""
