"""OpenAIEngine and VLMBackend against a real local chat-completions server (http.server on 127.0.0.1, port 0).

The server picks its canned reply from the prompt: engine tests put a ``CASE:<name>:<id>`` marker in the text;
backend tests key on the colour of the last image (the edited one): red = always valid, blue = malformed forever,
green = malformed on the first ask of each question, then valid. SC prompts (2 images) get ``[8, 6]``, PQ prompts
(1 image) ``[9, 4]``, so a scored edit has SC 6, PQ 4, overall sqrt(24).
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from PIL import Image

from editrl.scorer import vlm
from editrl.scorer.backend import ScoreRequest, make_backend
from editrl.scorer.engines import JudgePrompt
from editrl.scorer.engines.openai_compat import OpenAIEngine
from editrl.scorer.vlm import VLMBackend

COLOURS = {(255, 0, 0): "red", (0, 0, 255): "blue", (0, 128, 0): "green", (255, 255, 255): "white"}
SLOW_S = 0.6
TIMEOUT_S = 0.25


class JudgeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), JudgeHandler)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.requests: list[dict[str, Any]] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class JudgeHandler(BaseHTTPRequestHandler):
    server: JudgeServer

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

    def _reply(self, content: str) -> None:
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})

    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            self._send(404, {"error": "not found"})
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        text = " ".join(part["text"] for part in user if part["type"] == "text")
        images = []
        for part in [part for part in user if part["type"] == "image_url"]:
            url = part["image_url"]["url"]
            assert url.startswith("data:image/png;base64,"), url[:40]
            image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
            assert image.format == "PNG"
            images.append(image.convert("RGB"))
        case = re.search(r"CASE:(\w+):(\w+)", text)
        kind = "SC" if len(images) == 2 else "PQ"
        colour = COLOURS.get(images[-1].getpixel((0, 0)), "other") if images else "none"
        key = f"{case.group(1)}:{case.group(2)}" if case else f"{colour}:{kind}"
        with self.server.lock:
            self.server.counts[key] += 1
            attempt = self.server.counts[key]
            self.server.requests.append(
                {
                    "key": key,
                    "seed": body["seed"],
                    "max_tokens": body["max_tokens"],
                    "temperature": body["temperature"],
                    "top_p": body.get("top_p"),
                    "top_k": body.get("top_k"),
                    "content": [part["type"] for part in body["messages"][-1]["content"]],
                    "model": body["model"],
                    "roles": [m["role"] for m in body["messages"]],
                    "auth": self.headers.get("Authorization"),
                    "n_images": len(images),
                }
            )
        if case:
            self._engine_case(case.group(1), case.group(2), attempt)
        else:
            self._judge_case(colour, kind, attempt)

    def _engine_case(self, name: str, ident: str, attempt: int) -> None:
        if name == "valid":
            self._reply(json.dumps({"reasoning": f"id {ident}", "score": [7, 8]}))
        elif name == "delay":  # later prompts answer sooner, to catch out-of-order results
            time.sleep(0.02 * (10 - int(ident)))
            self._reply(f"reply {ident}")
        elif name == "malformed":
            self._reply("I think it is pretty good, maybe seven?")
        elif name == "slow":
            if attempt == 1:
                time.sleep(SLOW_S)
            self._reply("fast now")
        elif name == "fail500":
            if attempt == 1:
                self._send(500, {"error": "overloaded"})
            else:
                self._reply("recovered")
        elif name == "always503":
            self._send(503, {"error": "down"})
        elif name == "rate429":
            if attempt <= 2:
                self._send(429, {"error": "slow down"})
            else:
                self._reply("after 429")
        elif name == "bad400":
            self._send(400, {"error": "bad request"})
        elif name == "nochoices":
            self._send(200, {"object": "error"})
        else:
            self._send(404, {"error": f"unknown case {name}"})

    def _judge_case(self, colour: str, kind: str, attempt: int) -> None:
        scores = [8, 6] if kind == "SC" else [9, 4]
        valid = f"```json\n{json.dumps({'reasoning': f'{kind} of {colour}', 'score': scores})}\n```"
        if colour == "red" or (colour == "green" and attempt > 1):
            self._reply(valid)
        else:
            self._reply("The edit looks fine overall.")


@pytest.fixture
def server() -> Iterator[JudgeServer]:
    srv = JudgeServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def make_engine(server: JudgeServer, **kwargs: Any) -> OpenAIEngine:
    options: dict[str, Any] = {"timeout_s": 5.0, "max_retries": 3, "backoff_s": 0.01, "concurrency": 4}
    options.update(kwargs)
    return OpenAIEngine(server.base_url, "judge-model", **options)


def prompt(case: str, image_colour: str = "white") -> JudgePrompt:
    return JudgePrompt(text=f"Rate this. CASE:{case}", images=[Image.new("RGB", (8, 8), image_colour)], system="sys")


def test_valid_reply_and_wire_format(server: JudgeServer) -> None:
    engine = make_engine(server, api_key="k123", temperature=0.7)
    replies = engine.generate([prompt("valid:a")], seed=17, max_new_tokens=99)
    assert json.loads(replies[0]) == {"reasoning": "id a", "score": [7, 8]}
    (request,) = server.requests
    assert request["seed"] == 17 and request["max_tokens"] == 99 and request["temperature"] == 0.7
    assert request["model"] == "judge-model" and request["auth"] == "Bearer k123"
    assert request["roles"] == ["system", "user"] and request["n_images"] == 1
    assert request["top_p"] is None and request["top_k"] is None  # not sent unless set
    assert request["content"] == ["text", "image_url"]


def test_editscore_sampling_and_labelled_layout_on_the_wire(server: JudgeServer) -> None:
    engine = make_engine(server, temperature=0.7, top_p=0.9, top_k=20)
    labelled = JudgePrompt("Rate this. CASE:valid:b", [Image.new("RGB", (8, 8))] * 2, label_images=True)
    assert json.loads(engine.generate([labelled])[0])["score"] == [7, 8]
    (request,) = server.requests
    assert (request["top_p"], request["top_k"]) == (0.9, 20) and request["roles"] == ["user"]
    assert request["content"] == ["text", "image_url", "text", "image_url", "text"]


def test_results_keep_prompt_order_with_concurrency(server: JudgeServer) -> None:
    engine = make_engine(server, concurrency=4)
    replies = engine.generate([prompt(f"delay:{i}") for i in range(8)])
    assert replies == [f"reply {i}" for i in range(8)]
    assert len(server.requests) == 8


def test_malformed_reply_is_returned_as_text_not_retried(server: JudgeServer) -> None:
    assert make_engine(server).generate([prompt("malformed:x")]) == ["I think it is pretty good, maybe seven?"]
    assert server.counts["malformed:x"] == 1


def test_slow_reply_times_out_and_is_retried(server: JudgeServer) -> None:
    engine = make_engine(server, timeout_s=TIMEOUT_S, max_retries=2)
    assert engine.generate([prompt("slow:s")]) == ["fast now"]
    assert server.counts["slow:s"] == 2


def test_5xx_and_429_are_retried(server: JudgeServer) -> None:
    engine = make_engine(server, max_retries=3)
    assert engine.generate([prompt("fail500:f"), prompt("rate429:r")]) == ["recovered", "after 429"]
    assert server.counts["fail500:f"] == 2
    assert server.counts["rate429:r"] == 3


def test_retries_run_out_to_none(server: JudgeServer) -> None:
    engine = make_engine(server, max_retries=2)
    assert engine.generate([prompt("always503:d"), prompt("valid:v")]) == [
        None,
        json.dumps({"reasoning": "id v", "score": [7, 8]}),
    ]
    assert server.counts["always503:d"] == 3  # 1 try + 2 retries


def test_4xx_is_not_retried_and_bad_body_is_none(server: JudgeServer) -> None:
    engine = make_engine(server, max_retries=3)
    assert engine.generate([prompt("bad400:b"), prompt("nochoices:n")]) == [None, None]
    assert server.counts["bad400:b"] == 1
    assert server.counts["nochoices:n"] == 1


def test_unreachable_server_gives_none_without_raising() -> None:
    srv = JudgeServer()
    url = srv.base_url
    srv.server_close()  # nothing listens on this port any more
    engine = OpenAIEngine(url, "m", timeout_s=1.0, max_retries=1, backoff_s=0.01)
    assert engine.generate([prompt("valid:a"), prompt("valid:b")]) == [None, None]


def test_engine_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        OpenAIEngine("", "m")
    with pytest.raises(ValueError):
        OpenAIEngine("http://x", "m", concurrency=0)
    with pytest.raises(ValueError):
        OpenAIEngine("http://x", "m", max_retries=-1)


# ----------------------------------------------------------------------------------------------- VLMBackend


def group(colours: list[str], group_id: str = "g0") -> ScoreRequest:
    source = Image.new("RGB", (16, 16), "white")
    edits = [Image.new("RGB", (16, 16), colour) for colour in colours]
    return ScoreRequest(group_id, "make the square red", "color_alter", source, edits)


class CountingEngine:
    """Wraps an engine and records every generate call (prompt count, seed)."""

    name = "counting"

    def __init__(self, inner: OpenAIEngine) -> None:
        self.inner = inner
        self.calls: list[tuple[int, int]] = []

    def generate(self, prompts: list[JudgePrompt], seed: int = 0, max_new_tokens: int = 512) -> list[str | None]:
        self.calls.append((len(prompts), seed))
        return self.inner.generate(prompts, seed, max_new_tokens)


def test_vlm_backend_scores_group_over_http(server: JudgeServer) -> None:
    engine = CountingEngine(make_engine(server))
    backend = VLMBackend(engine=engine, max_reasks=2, seed=42)
    scores = backend.score(group(["red", "blue", "green"]))
    assert len(scores) == 3
    red, blue, green = scores
    for scored in (red, green):
        assert scored.scored and scored.overall == pytest.approx(math.sqrt(24.0))
        assert scored.sub_scores == pytest.approx(
            {
                "SC": 6.0,
                "PQ": 4.0,
                "SC_success": 8.0,
                "SC_overedit": 6.0,
                "PQ_naturalness": 9.0,
                "PQ_artifacts": 4.0,
                "passes": 1.0,
            }
        )
    assert red.reasoning == "SC of red | PQ of red"
    assert not blue.scored and blue.overall is None and blue.sub_scores == {}
    assert blue.reasoning.startswith("judge reply unparseable after 2 re-asks: SC: no score found")
    # One call for all 6 prompts, then re-asks of only the unparseable ones (blue SC+PQ, green SC+PQ; then blue).
    assert engine.calls == [(6, 42), (4, 43), (2, 44)]
    assert server.counts == {"red:SC": 1, "red:PQ": 1, "blue:SC": 3, "blue:PQ": 3, "green:SC": 2, "green:PQ": 2}
    # PQ saw only the edited image, SC both.
    assert {r["n_images"] for r in server.requests if r["key"].endswith("PQ")} == {1}
    assert {r["n_images"] for r in server.requests if r["key"].endswith("SC")} == {2}


def test_vlm_backend_without_reasks_leaves_green_unscored(server: JudgeServer) -> None:
    scores = VLMBackend(engine=make_engine(server), max_reasks=0).score(group(["green", "red"]))
    assert [s.scored for s in scores] == [False, True]
    assert scores[0].reasoning.startswith("judge reply unparseable after 0 re-asks")


def test_vlm_backend_engine_none_is_unscored(server: JudgeServer) -> None:
    srv = JudgeServer()
    url = srv.base_url
    srv.server_close()
    backend = VLMBackend(engine=OpenAIEngine(url, "m", timeout_s=1.0, max_retries=0), max_reasks=1)
    (score,) = backend.score(group(["red"]))
    assert not score.scored and "engine returned no reply" in score.reasoning


def test_score_many_packs_groups_into_one_call_per_pass(server: JudgeServer) -> None:
    engine = CountingEngine(make_engine(server))
    backend = VLMBackend(engine=engine, num_pass=2, seed=7)
    results = backend.score_many([group(["red", "red"], "g0"), group(["red"], "g1")])
    assert [len(r) for r in results] == [2, 1]
    assert engine.calls == [(6, 7), (6, 8)]  # pass i uses seed + i
    for score in (s for r in results for s in r):
        assert score.scored and score.overall == pytest.approx(math.sqrt(24.0))
        assert score.sub_scores["passes"] == 2.0


def test_make_backend_builds_openai_engine_lazily(server: JudgeServer) -> None:
    backend = make_backend(
        {
            "backend": "vlm",
            "engine": "openai",
            "engine_options": {"base_url": server.base_url, "model": "judge-model", "backoff_s": 0.01},
            "num_pass": 1,
            "score_range": 10,
        }
    )
    assert isinstance(backend, VLMBackend) and backend._engine is None
    (score,) = backend.score(group(["red"]))
    assert score.scored and score.overall == pytest.approx(math.sqrt(24.0))


@pytest.mark.parametrize(
    "options",
    [
        {"engine": "gpt"},
        {"engine": "openai", "num_pass": 0},
        {"engine": "openai", "max_reasks": -1},
        {"engine": "openai", "score_range": 2.5},
        {"engine": "openai", "seed": "1"},
        {"engine": "openai", "engine_options": "x"},
        {"engine": "openai", "temperature": 0.7},
    ],
)
def test_vlm_from_options_rejects_bad_options(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        VLMBackend.from_options(options)


class FlakyEngine:
    """Raises on the first call, returns too few replies on the second, then valid JSON for every prompt."""

    name = "flaky"

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, prompts: list[JudgePrompt], seed: int = 0, max_new_tokens: int = 512) -> list[str | None]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("CUDA out of memory")
        if self.calls == 2:
            return []
        return ['{"reasoning": "ok", "score": [10, 10]}' for _ in prompts]


def test_engine_wide_failures_are_reasked_then_scored() -> None:
    engine = FlakyEngine()
    (score,) = VLMBackend(engine=engine, max_reasks=2).score(group(["red"]))
    assert engine.calls == 3 and score.scored and score.overall == 10.0
    (score,) = VLMBackend(engine=FlakyEngine(), max_reasks=1).score(group(["red"]))
    assert not score.scored and "engine returned 0 replies for 2 prompts" in score.reasoning


def test_missing_engine_module_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(vlm.ENGINES, "vllm", ("editrl.scorer.engines.no_such_engine", "VLLMEngine"))
    backend = VLMBackend.from_options({"engine": "vllm", "engine_options": {"model": "x"}})
    with pytest.raises(ImportError):
        backend.score(group(["red"]))
