"""Checkpoint state without pickle: tensors in safetensors, everything else in JSON.

``write_state(path, {"model": {...}, "optim": {...}})`` walks the nested dicts (keys joined by ``/``; parameter
names contain dots, never slashes) and writes ``path/state.safetensors`` (every tensor leaf) and ``path/state.json``
(every other leaf, whole: numbers, strings, booleans, None, empty dicts and lists -- the optimizer's param groups are
one JSON list; a tuple comes back as a list, which AdamW accepts). ``read_state`` rebuilds the nested dicts.
A value that is neither a tensor nor JSON-able raises TypeError at save time, so a checkpoint never silently drops
state. Written to a temporary directory and renamed, so a crash mid-write leaves no half checkpoint under ``path``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

TENSORS, OTHERS = "state.safetensors", "state.json"


def write_state(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    others: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                if "/" in str(key):
                    raise ValueError(f"checkpoint key {key!r} contains '/'")
                walk(f"{prefix}/{key}", value)
        elif isinstance(node, torch.Tensor):
            tensors[prefix] = node.detach().cpu().contiguous()
        else:
            others[prefix] = node

    for section, state in sections.items():
        walk(section, state)
    text = json.dumps(others, sort_keys=True, allow_nan=False)  # TypeError/ValueError for anything else
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / TENSORS))
    (tmp / OTHERS).write_text(text)
    for name in (TENSORS, OTHERS):
        with open(tmp / name, "rb") as handle:
            os.fsync(handle.fileno())
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def read_state(path: Path) -> dict[str, dict[str, Any]]:
    from safetensors.torch import load_file

    root: dict[str, Any] = {}
    items = {**load_file(str(path / TENSORS)), **json.loads((path / OTHERS).read_text())}
    for name, value in items.items():
        *parents, leaf = name.split("/")
        node = root
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return root
