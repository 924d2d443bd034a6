"""Weights back to the actors over a file system: safetensors in a version directory with a DONE marker.

Writer (learner rank 0): write ``<run_dir>/weights/v000007.tmp/adapter.safetensors``, fsync, rename the directory to
``v000007``, then write ``DONE`` holding the file's sha256. Reader (actor): accept a version only when DONE exists
and the sha256 matches, so a half-written version is never loaded. Only safetensors; never ``torch.load``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from editrl.common.wire import WeightsInfo

WEIGHTS_FILE = "adapter.safetensors"
DONE_FILE = "DONE"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def publish_file(weights_dir: str | Path, version: int, state_dict: dict[str, torch.Tensor], kind: str) -> WeightsInfo:
    weights_dir = Path(weights_dir)
    final = weights_dir / f"v{version:06d}"
    tmp = weights_dir / f"v{version:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    path = tmp / WEIGHTS_FILE
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    digest = sha256_file(path)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (final / DONE_FILE).write_text(digest + "\n")
    return WeightsInfo(version=version, uri=str(final), sha256=digest, kind=kind)


def load_published(info: WeightsInfo) -> dict[str, torch.Tensor]:
    """Load a published version after checking its DONE marker and checksum. Raises ValueError if not intact."""
    final = Path(info.uri)
    done = final / DONE_FILE
    if not done.exists():
        raise ValueError(f"weights v{info.version} at {final} have no DONE marker")
    path = final / WEIGHTS_FILE
    digest = sha256_file(path)
    if digest != info.sha256 or done.read_text().strip() != digest:
        raise ValueError(f"weights v{info.version} at {final}: checksum mismatch")
    return load_file(str(path))
