"""Static checks of a received group against what a family's ``recompute`` reads (the shared part).

A learner calls ``policy.check_group(group)`` on every ``wire.RolloutGroup`` it receives, before any forward or
collective: the wire only guarantees well-typed frames, so a group whose latents the model cannot use, whose ``cond``
lacks the schedule or whose ``params`` lack a setting would make the recompute raise on one rank while the others
wait in a collective. ``check_group`` returns None when the recompute can use the group, else a short reason that
names the field (``"traj['latents'] shape (2, 3) is not [G, S+1, L, C] = [2, 5, 16, 16]"``).

Guarantees: a check never runs the model and never raises on a malformed group (an unexpected error becomes the
reason); every group the family's own ``sample`` produces passes. Terms: G = ``log_probs.shape[0]`` (the group
size every per-sample field must share), S = ``log_probs.shape[1]`` (trained units).

A family's check is a generator of reasons, so later checks may assume the earlier ones passed: :func:`first_reason`
takes the first reason of :func:`common_reasons` (this module: G consistency, log-prob layout, required keys and
their dtypes, finite floats, ``unit_mask``, params kinds) followed by the family's own (shapes from the loaded
model's config, the schedule, the sampler settings).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from editrl.common.wire import LOG_PROB_DTYPES

__all__ = [
    "GroupSpec", "FLOATS", "common_reasons", "first_reason", "shape_reason", "shapes_reasons", "param_reason",
    "units_reason",
]  # fmt: skip

FLOATS = LOG_PROB_DTYPES  # float32, or float64 from a float64 (reference-precision) actor
PARAM_KINDS = ("number", "integer", "string")


@dataclass(frozen=True)
class GroupSpec:
    """What a family's recompute reads: required array name -> allowed dtypes, required param name -> kind."""

    family: str
    traj: Mapping[str, tuple[str, ...]]
    cond: Mapping[str, tuple[str, ...]]
    params: Mapping[str, str]  # name -> "number" (finite int/float), "integer" (an integral number), "string"
    optional_cond: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # dtypes when present

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.params.items() if v not in PARAM_KINDS}
        if bad:
            raise ValueError(f"param kinds must be one of {PARAM_KINDS}, got {bad}")


def first_reason(reasons: Iterator[str]) -> str | None:
    """The first reason ``reasons`` yields (None if it yields none); an error while checking is a reason too."""
    try:
        return next(reasons, None)
    except Exception as exc:  # a malformed group must be refused, never crash the learner
        return f"unreadable group: {type(exc).__name__}: {exc}"


def shape_reason(label: str, arr: np.ndarray, dims: Sequence[tuple[str, int | None]]) -> str | None:
    """None if ``arr`` has ``dims`` (name, size; None = any size >= 1), else ``"<label> shape (..) is not [..] = [..]"``."""
    ok = arr.ndim == len(dims) and all(
        n >= 1 and (want is None or n == want) for n, (_, want) in zip(arr.shape, dims, strict=True)
    )
    if ok:
        return None
    names = ", ".join(name for name, _ in dims)
    sizes = ", ".join(name if want is None else str(want) for name, want in dims)
    return f"{label} shape {tuple(arr.shape)} is not [{names}] = [{sizes}]"


def shapes_reasons(where: str, arrays: Mapping[str, np.ndarray], table: Mapping[str, Sequence[Any]]) -> Iterator[str]:
    """:func:`shape_reason` of every ``arrays[name]`` against ``table[name]`` (the dims), in table order."""
    for name, dims in table.items():
        reason = shape_reason(f"{where}[{name!r}]", arrays[name], dims)
        if reason:
            yield reason


def units_reason(log_probs: np.ndarray, units: int, source: str) -> str | None:
    """None if ``log_probs`` is [G, ``units``], else the reason; ``source`` says where S comes from."""
    if log_probs.shape[1] == units:
        return None
    return f"log_probs shape {tuple(log_probs.shape)} is not [G, S] = [{log_probs.shape[0]}, {units}] ({source})"


def param_reason(params: Mapping[str, Any], name: str, kind: str) -> str | None:
    """None if ``params[name]`` is present and of ``kind`` (see :class:`GroupSpec`), else the reason."""
    if name not in params:
        return f"params[{name!r}] is missing"
    value = params[name]
    if kind == "string":
        return None if isinstance(value, str) else f"params[{name!r}] = {value!r} is not a string"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return f"params[{name!r}] = {value!r} is not a finite number"
    if kind == "integer" and not float(value).is_integer():
        return f"params[{name!r}] = {value!r} is not an integer"
    return None


def _arrays_reasons(
    where: str, arrays: Any, required: Mapping[str, tuple[str, ...]], optional: Mapping[str, tuple[str, ...]]
) -> Iterator[str]:
    if not isinstance(arrays, dict):
        yield f"{where} is not a map of arrays"
    for name in required:
        if name not in arrays:
            yield f"{where}[{name!r}] is missing"
    for name, arr in arrays.items():
        label = f"{where}[{name!r}]"
        if not isinstance(arr, np.ndarray):
            yield f"{label} is not an array"
        allowed = required.get(name) or optional.get(name)
        if allowed and arr.dtype.name not in allowed:
            yield f"{label} dtype {arr.dtype.name} is not {' or '.join(allowed)}"
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            yield f"{label} has NaN or inf"


def common_reasons(group: Any, spec: GroupSpec) -> Iterator[str]:
    """Reasons every family shares: family, ``log_probs`` [G, S] float32/float64 and finite, G edits, required
    traj/cond arrays present with allowed dtypes and finite, a leading G axis on every traj array, ``unit_mask``
    [G, S] of 0/1, required params present and of their kind."""
    if group.family != spec.family:
        yield f"family {group.family!r} is not this policy's {spec.family!r}"
    lp = group.log_probs
    if not isinstance(lp, np.ndarray) or lp.ndim != 2 or 0 in lp.shape:
        yield f"log_probs shape {getattr(lp, 'shape', None)} is not [G, S] with G, S >= 1"
    if lp.dtype.name not in LOG_PROB_DTYPES:
        yield f"log_probs dtype {lp.dtype.name} is not {' or '.join(LOG_PROB_DTYPES)}"
    if not np.isfinite(lp).all():
        yield "log_probs has NaN or inf"
    g = lp.shape[0]
    if len(group.edit_pngs) != g:
        yield f"edit_pngs holds {len(group.edit_pngs)} edits, log_probs G = {g}"
    yield from _arrays_reasons("traj", group.traj, spec.traj, {"unit_mask": FLOATS})
    yield from _arrays_reasons("cond", group.cond, spec.cond, spec.optional_cond)
    for name, arr in group.traj.items():
        if arr.shape[:1] != (g,):
            yield f"traj[{name!r}] shape {tuple(arr.shape)} does not lead with G = {g} (log_probs)"
    mask = group.traj.get("unit_mask")
    if mask is not None:
        if mask.shape != lp.shape:
            yield f"log_probs shape {tuple(lp.shape)} and traj['unit_mask'] shape {tuple(mask.shape)} differ"
        if not np.isin(mask, (0.0, 1.0)).all():
            yield "traj['unit_mask'] holds values other than 0 and 1"
    if not isinstance(group.params, dict):
        yield "params is not a map"
    for name, kind in spec.params.items():
        reason = param_reason(group.params, name, kind)
        if reason:
            yield reason
