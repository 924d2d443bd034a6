"""A chat-completions judge that misbehaves on demand: a real HTTP server for fault and fuzz tests.

It speaks the OpenAI chat-completions API of the ``openai`` judge engine
(:mod:`editrl.scorer.engines.openai_compat`): ``POST <base_url>/chat/completions``. By default every prompt gets a
VIEScore-parseable reply, ``{"reasoning": "...", "score": [7, 8]}``, so a scored edit has SC 7, PQ 7 and overall 7.
A marker anywhere in a prompt's text changes the answer to that prompt. The SC question quotes the instruction and the
PQ question does not, so an instruction carrying a marker spoils the SC question of every edit of its group:

- ``#HUGE#``: HTTP 200 whose reply text is over 2 MB (``HUGE_CHARS`` of reasoning, then a valid score list).
- ``#RAISE#``: HTTP 500 (the engine retries ``max_retries`` times, then gives up: no reply).
- ``#GARBAGE#``: HTTP 200 whose body is not JSON (the engine does not retry: no reply).
- ``#BIGNUM#``: a score of 5,000 digits (the parser raised ValueError out of the backend before issue 14).

What a scorer makes of each (:mod:`editrl.scorer.vlm`, :mod:`editrl.scorer.viescore`): every edit of the group
unscored, with the reason, in a reply that fits the wire.

In-process: ``with MisbehavingJudge() as judge: ... judge.base_url ...`` (port 0 = a free one; ``judge.counts`` has
the requests per mode). As a process: ``python tests/faults/misbehaving_judge.py [PORT]`` prints its base URL on
stdout and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MARKERS = ("#HUGE#", "#RAISE#", "#GARBAGE#", "#BIGNUM#")
HUGE_CHARS = 2_500_000  # reasoning characters of a #HUGE# reply (over 2 MB of text)
DEFAULT_SCORES = (7, 8)  # every normal reply: SC = PQ = min(7, 8) = 7, overall 7


class MisbehavingJudge(ThreadingHTTPServer):
    """The server; ``start()``/``stop()`` or a ``with`` block run it on a daemon thread."""

    daemon_threads = True

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()  # requests answered, by mode ("normal" or a marker)
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def start(self) -> MisbehavingJudge:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> MisbehavingJudge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def mode_of(text: str) -> str:
    """The first marker in ``text``, or "normal"."""
    return next((marker for marker in MARKERS if marker in text), "normal")


def reply_content(mode: str) -> str:
    """The assistant's reply text for a prompt answered with 200 and JSON (every mode but #RAISE# / #GARBAGE#)."""
    if mode == "#HUGE#":
        return json.dumps({"reasoning": "very long " + "x" * HUGE_CHARS, "score": list(DEFAULT_SCORES)})
    if mode == "#BIGNUM#":
        return '{"reasoning": "enormous", "score": [' + "9" * 5000 + ", 8]}"
    return json.dumps({"reasoning": "the edit follows the instruction", "score": list(DEFAULT_SCORES)})


class _Handler(BaseHTTPRequestHandler):
    server: MisbehavingJudge

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read the counts instead
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up
            pass

    def do_POST(self) -> None:
        if not self.path.endswith("/chat/completions"):
            self._send(404, b'{"error": "not found"}')
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            texts = [
                part["text"] if isinstance(part, dict) else str(part)
                for message in body["messages"]
                for part in (message["content"] if isinstance(message["content"], list) else [message["content"]])
                if not isinstance(part, dict) or part.get("type") == "text"
            ]
        except (ValueError, KeyError, TypeError):
            self._send(400, b'{"error": "bad request"}')
            return
        mode = mode_of("\n".join(texts))
        with self.server.lock:
            self.server.counts[mode] += 1
        if mode == "#RAISE#":
            self._send(500, b'{"error": "the judge fell over"}')
        elif mode == "#GARBAGE#":
            self._send(200, b"<html>this is not JSON{", "text/html")
        else:
            message = {"role": "assistant", "content": reply_content(mode)}
            self._send(200, json.dumps({"choices": [{"index": 0, "message": message}]}).encode())


def main(argv: list[str]) -> None:
    judge = MisbehavingJudge(int(argv[0]) if argv else 0)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=judge.shutdown).start())
    print(judge.base_url, flush=True)
    try:
        judge.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass
    judge.server_close()


if __name__ == "__main__":
    main(sys.argv[1:])
