"""The actor role: a stateless rollout worker (``main`` is the process entry, ``loop`` the
lease -> maybe load weights -> sample -> send loop)."""
