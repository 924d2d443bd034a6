"""The broker role: the message queue and the only durable state (ROUTER socket in ``server``, LMDB replay in
``store``, score-job dispatch in ``scorers``, the live process table in ``processes``). It knows no model: no torch."""
