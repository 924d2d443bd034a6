"""Offline jobs against the LIVE scorer pool, shared by ``editrl eval`` and ``editrl bon``.

- :class:`PoolScorer`: scores groups of edits through the broker as ``CheckGroup`` messages (as ``editrl check``:
  nothing enters the replay), several in flight, one resend with the same ids, unscored edits never given a number.
- :class:`Editor`: the configured policy (optionally with published LoRA weights) sampling edits with seeds derived
  from (seed, task id, index), so a resumed run equals an uninterrupted one.
- Output-directory identity (``run.json``: a resume must match what produced the directory), atomic writes, the CLI
  wrapper (config errors exit 2, an unanswering pool 1, a failed CURVE handshake 3).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy modules load only when a command runs, so `editrl --help` stays instant
    from editrl.common.config import TopologyConfig
    from editrl.common.tasks import Task
    from editrl.scorer.backend import Score

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
DEFAULT_TIMEOUT_S = 120.0  # per attempt; a group gets one resend before the run stops


# ----------------------------------------------------------------------------------------------------- shared parts


def safe_name(value: str, what: str) -> str:
    """``value`` if it can be a file name (task ids and task types name files in the output), else ValueError."""
    if not value or value in (".", "..") or any(c in value for c in "/\\\0"):
        raise ValueError(f"{what} {value!r} cannot be used as a file name (no '/', '\\', NUL, '.' or '..')")
    return value


def derived_seed(seed: int, *parts: object) -> int:
    """A 63-bit generator seed from the run seed and ``parts`` (task id, candidate index)."""
    digest = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def write_atomic(path: Path, data: bytes, skip_if_same: bool = False) -> bool:
    """Write through a temporary file and a rename (a crash never leaves half a file); True if written."""
    if skip_if_same and path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def mean_or_none(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def check_run_identity(out_dir: Path, identity: dict[str, Any]) -> None:
    """Record what produced ``out_dir``; a later run with different settings there raises ValueError instead of
    mixing results of two editors (or judges) in one table."""
    path = out_dir / RUN_FILE
    if not path.exists():
        write_atomic(path, (json.dumps(identity, indent=2, sort_keys=True) + "\n").encode())
        return
    before = json.loads(path.read_text())
    for key, value in identity.items():
        if before.get(key) != value:
            raise ValueError(
                f"{out_dir} holds results of another run ({key}: {before.get(key)!r} there, {value!r} now); "
                "use another --out or the same settings"
            )


def prepare_out_dir(out_dir: Path, tasks: list[Task], identity: dict[str, Any], checkpoint: str | None) -> None:
    """Check what would fail later (names that cannot be files, a checkpoint path that is not one), then create
    ``out_dir`` and record or compare its identity."""
    for task in tasks:
        safe_name(task.task_id, "task_id")
        safe_name(task.task_type, "task_type")
    if checkpoint:
        checkpoint_kind(checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_run_identity(out_dir, identity)


def policy_identity(cfg: TopologyConfig, checkpoint: str | None, seed: int) -> dict[str, Any]:
    return {
        "policy_model": cfg.policy.model,
        "sampler": dataclasses.asdict(cfg.policy.sampler),
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
        "seed": seed,
        "judge": cfg.scorers.backend,
    }


def checkpoint_kind(path: str | Path) -> str:
    """``"published"`` (a weights/vNNNNNN dir with its DONE marker) or ``"file"`` (.safetensors); else ValueError.
    Checked before anything is recorded, so a mistyped path never becomes part of a run's identity."""
    from editrl.common.weights.file import DONE_FILE

    path = Path(path)
    if path.is_dir() and (path / DONE_FILE).is_file():
        return "published"
    if path.is_file() and path.suffix == ".safetensors":
        return "file"
    raise ValueError(f"--checkpoint {path}: expected a published weights/vNNNNNN directory or a .safetensors file")


def load_checkpoint_state(path: str | Path) -> dict[str, Any]:
    """LoRA weights from a published ``weights/vNNNNNN`` directory (DONE marker and checksum verified) or from a
    ``.safetensors`` file. Raises ValueError for anything else or a version that does not verify."""
    from safetensors.torch import load_file

    from editrl.common.weights.file import DONE_FILE, load_published
    from editrl.common.wire import WeightsInfo

    path = Path(path)
    if checkpoint_kind(path) == "file":
        return load_file(str(path))
    version = int(path.name[1:]) if re.fullmatch(r"v\d+", path.name) else 0
    return load_published(WeightsInfo(version, str(path), (path / DONE_FILE).read_text().strip(), "lora"))


class Editor:
    """The configured policy (plus optional checkpoint weights), loaded on first use: a fully resumed run never
    loads a model."""

    def __init__(self, cfg: TopologyConfig, checkpoint: str | None) -> None:
        self.cfg, self.checkpoint = cfg, checkpoint
        self.policy: Any = None

    def load(self) -> Any:
        if self.policy is None:
            import torch

            from editrl.common.families.base import build_tiny, load_policy
            from editrl.common.lora import load_lora_state_dict

            torch.set_num_threads(self.cfg.actors.threads)
            if self.cfg.policy.make_tiny:
                build_tiny(self.cfg.policy, seed=self.cfg.run.seed)
            policy = load_policy(self.cfg.policy, with_pipeline=True)
            if self.checkpoint:
                try:
                    load_lora_state_dict(policy.trainable_module(), load_checkpoint_state(self.checkpoint))
                except KeyError as exc:
                    msg = f"--checkpoint {self.checkpoint} does not fit {self.cfg.policy.model}: {exc}"
                    raise ValueError(msg) from None
            self.policy = policy
        return self.policy

    def edits(self, instruction: str, source: Any, count: int, seed: int) -> list[bytes]:
        """``count`` edits of ``source`` (one batched group, as an actor samples), as PNG bytes."""
        import torch

        from editrl.common.images import to_png

        policy = self.load()
        with torch.no_grad():
            rollout = policy.sample(instruction, source, count, torch.Generator().manual_seed(seed))
        return [to_png(image) for image in rollout.images]


class PoolScorer:
    """Scores groups of edits through the live broker + scorer pool (``CheckGroup`` -> ``CheckResult``, as
    ``editrl check``), up to ``concurrency`` groups in flight, one BrokerClient per thread (ZeroMQ sockets are not
    thread-safe).

    Failure model: a group without an answer after 2 x ``timeout_s`` raises TimeoutError from its future; a failed
    CURVE handshake raises HandshakeError; a reply for another group or of the wrong length raises RuntimeError.
    Unscored edits come back as ``Score.unscored`` with the judge's reason, never as a number.
    """

    def __init__(self, cfg: TopologyConfig, concurrency: int, timeout_s: float, identity: str) -> None:
        import zmq

        if concurrency < 1 or timeout_s <= 0:
            raise ValueError(f"concurrency must be >= 1 and timeout > 0, got {concurrency}, {timeout_s}")
        self.cfg, self.concurrency, self.timeout_s, self.identity = cfg, concurrency, timeout_s, identity
        self.ctx = zmq.Context()
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix=f"{identity}-score")
        self.local = threading.local()
        self.clients: list[Any] = []
        self.lock = threading.Lock()

    def submit(self, instruction: str, task_type: str, source_png: bytes, edit_pngs: list[bytes]) -> Future:
        """A future of one Score per edit, in order."""
        return self.pool.submit(self._score, instruction, task_type, source_png, list(edit_pngs))

    def _client(self) -> Any:
        client = getattr(self.local, "client", None)
        if client is None:
            from editrl.common.net import BrokerClient

            cfg = self.cfg
            client = BrokerClient(
                self.ctx, cfg.broker.endpoint, self.identity, self.timeout_s, cfg.security, role="tool"
            )
            self.local.client = client
            with self.lock:
                self.clients.append(client)
        return client

    def _score(self, instruction: str, task_type: str, source_png: bytes, edit_pngs: list[bytes]) -> list[Score]:
        from editrl.common import wire
        from editrl.common.net import new_id
        from editrl.scorer.backend import Score

        group = wire.CheckGroup(new_id(), new_id(), instruction, task_type, source_png, edit_pngs)
        reply = self._client().request(group, retries=1)  # one resend (same ids) survives a broker restart
        if not isinstance(reply, wire.CheckResult) or reply.group_id != group.group_id:
            raise RuntimeError(f"broker answered group {group.group_id} with {type(reply).__name__}")
        if (
            not len(reply.scored)
            == len(reply.overall)
            == len(reply.sub_scores)
            == len(reply.reasoning)
            == len(edit_pngs)
        ):
            raise RuntimeError(f"broker answered {len(reply.overall)} scores for {len(edit_pngs)} edits")
        scores = []
        for scored, overall, subs, why in zip(
            reply.scored, reply.overall, reply.sub_scores, reply.reasoning, strict=True
        ):
            if scored and overall is not None and math.isfinite(overall):
                scores.append(Score(True, float(overall), dict(subs), why))
            else:
                scores.append(Score.unscored(why or "unscored"))
        return scores

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for client in self.clients:
            client.close()
        self.ctx.destroy(linger=0)


def source_png_of(task: Task) -> bytes:
    """The task's source as the actor sends it (RGB PNG); MissingImageError when absent or unreadable."""
    from editrl.common.images import to_png
    from editrl.common.tasks import load_source_image

    return to_png(load_source_image(task))


def run_cli(command: str, body: Callable[[], int]) -> int:
    """Run a command body; bad input exits 2, no answer from the pool 1, a failed handshake 3, with one clear line."""
    from editrl.common.security import HandshakeError

    try:
        return body()
    except (ValueError, FileNotFoundError) as exc:  # a bad config, task file, checkpoint or output directory
        print(f"editrl {command}: {exc}", file=sys.stderr)
        return 2
    except TimeoutError as exc:
        print(f"editrl {command}: no answer from the broker or its scorers ({exc}); results so far are kept, re-run "
              "to resume", file=sys.stderr)  # fmt: skip
        return 1
    except HandshakeError as exc:
        print(f"editrl {command}: {exc}", file=sys.stderr)
        return 3


def load_cfg(path: str) -> TopologyConfig:
    from editrl.common.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise ValueError(f"config error: {exc}") from None


# ----------------------------------------------------------------------------------------------------- eval
