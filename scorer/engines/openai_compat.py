"""OpenAIEngine: a judge behind any OpenAI-compatible chat-completions server (OpenAI, vLLM serve, SGLang, ...).

Plain ``urllib.request`` (no new dependency). Each prompt is one ``POST {base_url}/chat/completions`` with an
optional system message and a user message whose content is :func:`~editrl.scorer.engines.prompt_parts` (images as
``data:image/png;base64,...`` URLs), plus ``model``, ``seed``, ``max_tokens``, ``temperature``, and ``top_p`` /
``top_k`` when set (``top_k`` is a vLLM/SGLang extension). Prompts run
concurrently on ``concurrency`` threads; replies come back in prompt order.

Failure model (per prompt, never raised): timeouts, connection errors, HTTP 429 and HTTP 5xx are retried up to
``max_retries`` times with exponential backoff (retry n waits ``backoff_s * 2**(n-1)``); any other HTTP 4xx (bad
request, auth, unknown model) is not retried. A prompt that still failed, or whose 200 response has no string
``choices[0].message.content``, yields ``None``. No reply text is ever made up.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from editrl.scorer.engines import JudgePrompt, check_sampling, prompt_parts

log = logging.getLogger(__name__)


def image_data_url(image: Image.Image) -> str:
    """``image`` as a ``data:image/png;base64,...`` URL (converted to RGB first)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def openai_messages(prompt: JudgePrompt) -> list[dict[str, Any]]:
    """OpenAI-style chat messages for one prompt: optional system, then the user content in the prompt's layout
    (images as ``image_url`` parts with data URLs). Also what vLLM's ``LLM.chat`` takes."""
    messages: list[dict[str, Any]] = []
    if prompt.system:
        messages.append({"role": "system", "content": prompt.system})
    content = [
        {"type": "text", "text": part}
        if isinstance(part, str)
        else {"type": "image_url", "image_url": {"url": image_data_url(part)}}
        for part in prompt_parts(prompt)
    ]
    messages.append({"role": "user", "content": content})
    return messages


class _NonRetryable(Exception):
    """A failure that repeating the same request will not fix."""


class OpenAIEngine:
    """Chat-completions judge engine; see the module docstring for the wire format and the failure model."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "",
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        concurrency: int = 4,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
    ) -> None:
        if not base_url or not isinstance(base_url, str):
            raise ValueError(f"base_url must be a non-empty string, got {base_url!r}")
        if not model or not isinstance(model, str):
            raise ValueError(f"model must be a non-empty string, got {model!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if not backoff_s >= 0:
            raise ValueError(f"backoff_s must be >= 0, got {backoff_s}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        check_sampling(temperature, top_p, top_k)
        self.top_p, self.top_k = float(top_p), top_k
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout_s = float(timeout_s)
        self.max_retries = max_retries
        self.backoff_s = float(backoff_s)
        self.concurrency = concurrency
        self.temperature = float(temperature)

    def generate(self, prompts: list[JudgePrompt], seed: int = 0, max_new_tokens: int = 512) -> list[str | None]:
        """One reply per prompt, in prompt order; None where the request failed after its retries."""
        if not prompts:
            return []
        if len(prompts) == 1 or self.concurrency == 1:
            return [self._generate_one(prompt, seed, max_new_tokens) for prompt in prompts]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(lambda prompt: self._generate_one(prompt, seed, max_new_tokens), prompts))

    def payload(self, prompt: JudgePrompt, seed: int, max_new_tokens: int) -> dict[str, Any]:
        """The chat-completions request body for one prompt."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": openai_messages(prompt),
            "seed": int(seed),
            "max_tokens": int(max_new_tokens),
            "temperature": self.temperature,
        }
        if self.top_p < 1.0:
            body["top_p"] = self.top_p
        if self.top_k > 0:  # not in OpenAI's API; vLLM and SGLang servers accept it
            body["top_k"] = self.top_k
        return body

    def _generate_one(self, prompt: JudgePrompt, seed: int, max_new_tokens: int) -> str | None:
        """The reply text of one prompt or None; never raises."""
        try:
            body = json.dumps(self.payload(prompt, seed, max_new_tokens)).encode("utf-8")
        except Exception as exc:  # an image that cannot be encoded: no request can succeed
            log.warning("judge prompt could not be encoded: %r", exc)
            return None
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return self._post(body, headers)
            except _NonRetryable as exc:
                log.warning("judge request to %s failed (not retried): %s", self.url, exc)
                return None
            except urllib.error.HTTPError as exc:
                if exc.code != 429 and exc.code < 500:
                    log.warning("judge request to %s failed with HTTP %d (not retried)", self.url, exc.code)
                    return None
                last_error = f"HTTP {exc.code}"
            except (OSError, http.client.HTTPException) as exc:  # timeouts, refused/reset connections, bad status
                last_error = repr(exc)
        log.warning("judge request to %s failed after %d retries: %s", self.url, self.max_retries, last_error)
        return None

    def _post(self, body: bytes, headers: dict[str, str]) -> str:
        """One request; the reply text, or raises (HTTPError / OSError / HTTPException retryable, _NonRetryable)."""
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            raw = response.read()
        try:
            reply = json.loads(raw)
            content = reply["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise _NonRetryable(f"malformed chat-completions response: {raw[:200]!r}") from exc
        if not isinstance(content, str):
            raise _NonRetryable(f"chat-completions content is not a string: {content!r}")
        return content
