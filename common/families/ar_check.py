"""The Emu3-style token editor's group check (:meth:`Emu3EditPolicy.check_group`): what its ``recompute`` reads, in
the dtypes its ``sample`` stores, checked without running the model (see :mod:`editrl.common.families.check`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from editrl.common import wire
from editrl.common.families.check import GroupSpec, shapes_reasons, units_reason

GROUP_SPEC = GroupSpec(
    family="ar",
    traj={"tokens": ("int64",)},
    cond={"prompt_ids": ("int64",)},
    params={"temperature": "number", "top_k": "integer"},
)


def token_reasons(group: wire.RolloutGroup, vocab: int, allowed_ids: Sequence[int] | np.ndarray) -> Iterator[str]:
    """Token ids within the language model's vocabulary ``[0, vocab)``, counted tokens within the sampler's
    ``allowed_ids`` (else their recomputed log-prob is -inf), the sampler settings."""
    from editrl.common.families.ar import check_sampling  # ar imports this module

    traj, cond, params = group.traj, group.cond, group.params
    if group.log_probs.dtype != np.float32:
        yield f"log_probs dtype {group.log_probs.dtype.name} is not float32"
    yield from shapes_reasons("traj", traj, {"tokens": [("G", group.log_probs.shape[0]), ("T", None)]})
    tokens = traj["tokens"]
    reason = units_reason(group.log_probs, tokens.shape[1], f"T = {tokens.shape[1]} tokens in traj['tokens']")
    if reason:
        yield reason
    yield from shapes_reasons("cond", cond, {"prompt_ids": [("P", None)]})
    for label, ids in (("traj['tokens']", tokens), ("cond['prompt_ids']", cond["prompt_ids"])):
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            yield f"{label} holds ids outside the vocabulary [0, {vocab})"
    mask = traj.get("unit_mask")
    counted = tokens if mask is None else tokens[mask > 0]
    outside = int((~np.isin(counted, allowed_ids)).sum())
    if outside:
        yield f"traj['tokens'] holds {outside} counted tokens outside the sampler's allowed ids"
    try:
        check_sampling(float(params["temperature"]), int(params["top_k"]))
    except ValueError as exc:
        yield f"params: {exc}"
