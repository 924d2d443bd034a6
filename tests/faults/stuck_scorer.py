"""A scorer that announces itself and heartbeats but never answers a job (a hung judge), as a real process.

python stuck_scorer.py TOPOLOGY WORKER_ID   (the broker endpoint and the role secret come from the topology)
"""

import sys
import time

import zmq

from editrl.common import codec, wire
from editrl.common.config import load_config
from editrl.common.net import harden
from editrl.common.security import secure_client


def main() -> None:
    cfg, worker_id = load_config(sys.argv[1]), sys.argv[2]
    ctx = zmq.Context()
    sock = harden(ctx.socket(zmq.DEALER))
    sock.setsockopt(zmq.ROUTING_ID, worker_id.encode())
    secure_client(sock, cfg.security, "scorer")
    sock.connect(cfg.broker.endpoint)
    sock.send_multipart(codec.encode(wire.ScorerReady(worker_id, "metric", 1)))
    while True:
        sock.send_multipart(codec.encode(wire.Heartbeat(worker_id)))
        if sock.poll(200):  # heartbeats well inside any scorer liveness a topology may set
            sock.recv_multipart()  # a job: swallowed, never answered
        time.sleep(0.1)


if __name__ == "__main__":
    main()
