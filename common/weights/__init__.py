"""Weight transports from the learner to the actors: a shared file system (``file``), or chunks pulled over ZeroMQ
from the learner's weight server (``stream_server``: protocol and server; ``stream_client``: the actor's side)."""
