"""The face of editrl: the ``editrl`` CLI and what it runs for a user -- ``up`` (start and supervise a topology),
``status``, ``replay`` (inspect the replay buffer), ``bon`` and ``evaluate`` (offline Best-of-N and evaluation,
sharing ``offline``), ``check`` (score a known workload through the live pool) and run summaries."""
