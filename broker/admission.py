"""What the broker accepts from its peers, decided without knowing a model.

A ``RolloutGroup`` that decodes (the codec checked framing, types, dtypes and sizes) can still be nonsense a learner
cannot train: no lease behind it, zero edits, edits that are not images, a version from the future, another editor
family. :class:`GroupRules` refuses those at ingest with a short reason (counted by the broker as
``rejected/<reason>`` and sent back in ``Ack(ok=False, detail="rejected: <reason>: ...")``). The lease check is the
broker's (it knows its leases); everything a group carries by itself is checked here. What only the model knows
(latent shapes, the schedule a family needs) is the learner's family check (``policy.check_group``).

A ``PublishWeights`` is checked by :meth:`GroupRules.check_publish`: versions only move forward one at a time, and the
uri must be the run's own weights directory (file transport) or the learner's stream endpoint.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editrl.common import wire

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR = struct.Struct(">I4sII")  # chunk length, b"IHDR", width, height (right after the 8-byte signature)


class Refused(Exception):
    """A well-formed message the broker will not act on; ``reason`` is the counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR header, without decoding; ``Refused("not_png")`` if it is not one."""
    if len(data) < len(PNG_SIGNATURE) + _IHDR.size or not data.startswith(PNG_SIGNATURE):
        raise Refused("not_png", f"{len(data)} bytes starting {bytes(data[:8])!r}")
    length, tag, width, height = _IHDR.unpack_from(data, len(PNG_SIGNATURE))
    if tag != b"IHDR" or length != 13:
        raise Refused("not_png", "the first chunk is not a 13-byte IHDR")
    return width, height


@dataclass(frozen=True)
class GroupRules:
    """Limits a group must respect to be stored. ``None`` leaves a check out (unit tests of other parts)."""

    max_group_size: int | None = None  # data.group_size: G must be in 1..this
    family: str | None = None  # policy.family of the topology
    max_text_chars: int = 4096  # broker.max_instruction_chars: instruction, task type and each string param
    min_image_side: int = 8  # broker.min_image_side
    max_image_side: int = 4096  # broker.max_image_side
    weights_dir: Path | None = None  # <run_dir>/weights: where file-transport uris must lie
    stream_endpoint: str | None = None  # learner.weights_endpoint (tcp://HOST:PORT, port 0 = any port on HOST)

    @classmethod
    def from_config(cls, cfg: Any) -> GroupRules:
        return cls(
            max_group_size=cfg.data.group_size,
            family=cfg.policy.family,
            max_text_chars=cfg.broker.max_instruction_chars,
            min_image_side=cfg.broker.min_image_side,
            max_image_side=cfg.broker.max_image_side,
            weights_dir=cfg.run_dir / "weights",
            stream_endpoint=cfg.learner.weights_endpoint if cfg.learner.weights_transport == "stream" else None,
        )

    def check_group(self, g: wire.RolloutGroup, latest_version: int) -> None:
        """Raise :class:`Refused` for a group no learner could train; the lease is checked by the broker."""
        n = len(g.edit_pngs)
        if n < 1 or (self.max_group_size is not None and n > self.max_group_size):
            raise Refused("bad_group_size", f"{n} edits, allowed 1..{self.max_group_size}")
        if g.policy_version < 0 or g.policy_version > latest_version:
            raise Refused("version_not_published", f"policy_version {g.policy_version}, latest {latest_version}")
        if self.family is not None and g.family != self.family:
            raise Refused("wrong_family", f"{g.family!r}, this topology trains {self.family!r}")
        self._check_text("instruction", g.instruction)
        self._check_text("task_type", g.task_type)
        for key, value in g.params.items():
            if isinstance(value, str):
                self._check_text(f"params[{key!r}]", value)
        if g.log_probs.ndim != 2 or g.log_probs.shape[0] != n:
            raise Refused("bad_log_probs", f"log_probs shape {g.log_probs.shape}, expected [{n}, S]")
        for name, arr in g.traj.items():
            if arr.ndim < 1 or arr.shape[0] != n:
                raise Refused("bad_traj", f"traj[{name!r}] shape {arr.shape}, expected leading axis {n}")
        self._check_image("source_png", g.source_png)
        for i, png in enumerate(g.edit_pngs):
            self._check_image(f"edit_pngs[{i}]", png)

    def _check_text(self, what: str, text: str) -> None:
        if len(text) > self.max_text_chars:
            raise Refused("text_too_long", f"{what} has {len(text)} characters, limit {self.max_text_chars}")

    def _check_image(self, what: str, data: bytes) -> None:
        try:
            width, height = png_size(data)
        except Refused as exc:
            raise Refused(exc.reason, f"{what}: {exc}") from None
        lo, hi = self.min_image_side, self.max_image_side
        if not (lo <= width <= hi and lo <= height <= hi):
            raise Refused("image_size", f"{what} is {width}x{height}, each side must be in {lo}..{hi}")

    def check_publish(self, info: wire.WeightsInfo, latest_version: int) -> None:
        """Versions move forward one at a time (also after a learner resume: it numbers above the broker's latest);
        the uri is the run's weights directory or the learner's stream endpoint."""
        if info.version != latest_version + 1:
            raise Refused("version_not_next", f"version {info.version}, latest published {latest_version}")
        if info.kind not in ("lora", "full"):
            raise Refused("bad_weights_kind", info.kind)
        if info.uri.startswith("stream://"):
            if self.stream_endpoint is None or not _same_endpoint(info.uri, self.stream_endpoint):
                raise Refused("weights_uri", f"{info.uri} is not the learner's weight server ({self.stream_endpoint})")
        elif self.weights_dir is not None:
            if not info.uri or not Path(info.uri).resolve().is_relative_to(self.weights_dir.resolve()):
                raise Refused("weights_uri", f"{info.uri} is not under the run's weights directory {self.weights_dir}")


def _same_endpoint(uri: str, endpoint: str) -> bool:
    """``stream://HOST:PORT`` against the configured ``tcp://HOST:PORT`` (port 0 there: the port is chosen at start).
    A wildcard bind (``*``, ``0.0.0.0``) advertises some host of this machine: only the port is compared then."""
    host, _, port = uri.removeprefix("stream://").rpartition(":")
    want_host, _, want_port = endpoint.removeprefix("tcp://").rpartition(":")
    host_ok = want_host in ("*", "0.0.0.0", "[::]") or host == want_host
    return host_ok and (want_port in ("0", "*") or port == want_port)
