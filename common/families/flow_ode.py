"""The deterministic (ODE) rollout of the flow editors, for the likelihood-free objective (``learner.objective: nft``).

DiffusionNFT trains on the final clean latent of each edit and its condition only: no trajectory, no behaviour
log-probs. So with ``policy.sampler.sde_type: ode`` (which the config sets for ``nft``) the actor samples with the
plain Euler ODE on the model's velocity over the same schedule as the SDE sampler, no noise after the initial latent:

    x_{i+1} = x_i + v(x_i, σ_i) (σ_{i+1} − σ_i),   i = 0 .. N−1,   σ_0 = 1 (noise) ... σ_N = 0 (the edit)

An *ODE group* (``params['sde_type'] == "ode"``) carries:

- ``traj['x0']`` [G, L, C]: the final latent x_N, what the edits decode from (float32; float64 on the float64 path),
  and nothing per step (a group is N + 1 times smaller than an SDE group's latents);
- ``log_probs`` [G, 1] of zeros: a placeholder, because the wire's groups always have S >= 1 units
  (``codec._check_group``); one unit per edit, which is also how the learner counts the group (``n_units``);
- ``cond['sigmas']`` [N+1] (the schedule the actor used, from which the objective draws its noise levels) beside the
  family's usual condition arrays, and ``params`` with the velocity's settings (guidance) but no noise level.

A learner configured for ``nft`` accepts ODE groups only, and a log-prob objective refuses them
(:func:`mode_reasons`): each kind lacks what the other's loss reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from editrl.common.families.check import shape_reason

__all__ = ["ODE", "mode_reasons", "ode_reasons", "ode_rollout", "ode_sample"]

ODE = "ode"  # policy.sampler.sde_type of the deterministic sampler (params['sde_type'] of its groups)


def ode_sample(
    velocity: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor
) -> torch.Tensor:
    """The Euler ODE from ``x`` [G, L, C] (the initial noise) over ``sigmas`` [N+1]; ``velocity(x, i)`` is the model's
    velocity at step i. Returns the final latent [G, L, C] in the velocity's dtype (as the SDE sampler's ODE steps)."""
    for i in range(sigmas.shape[0] - 1):
        v = velocity(x, i)
        x = x.to(v.dtype) + v * (sigmas[i + 1] - sigmas[i])
    return x


def ode_rollout(final: torch.Tensor) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``(traj, log_probs)`` of an ODE group from its final latents [G, L, C]: ``{'x0': final}`` and the [G, 1] zeros
    placeholder, both float64 when ``final`` is, else float32."""
    dtype = np.float64 if final.dtype == torch.float64 else np.float32
    x0 = np.ascontiguousarray(final.detach().cpu().numpy().astype(dtype, copy=False))
    return {"x0": x0}, np.zeros((final.shape[0], 1), dtype=dtype)


def mode_reasons(group: Any, ode: bool) -> Iterator[str]:
    """A reason when the group's kind is not the one this learner trains: ODE groups for ``nft`` (``ode``), SDE/CPS
    groups with log-probs otherwise."""
    sde_type = group.params.get("sde_type") if isinstance(group.params, dict) else None
    if ode and sde_type != ODE:
        yield f"params['sde_type'] = {sde_type!r}: this learner trains nft on ODE groups (sde_type {ODE!r})"
    if not ode and sde_type == ODE:
        yield f"params['sde_type'] = {ODE!r}: an ODE group has no log-probs; only learner.objective nft trains on it"


def ode_reasons(group: Any, dtype: str, seq: int, channels: int) -> Iterator[str]:
    """Reasons an ODE group is unusable, beyond :func:`~editrl.common.families.check.common_reasons` and the family's
    condition checks: ``traj`` = exactly ``x0`` [G, L, C] of ``dtype``, ``log_probs`` the [G, 1] zeros placeholder of
    ``dtype``, ``cond['sigmas']`` a schedule [N+1] strictly decreasing in [0, 1] (σ_0 .. σ_{N-1} > 0)."""
    traj, lp = group.traj, group.log_probs
    extra = sorted(set(traj) - {"x0"})
    if extra:
        yield f"traj holds {extra}: an ODE group carries traj['x0'] only"
    for label, arr in {"traj['x0']": traj["x0"], "log_probs": lp}.items():
        if arr.dtype.name != dtype:
            yield f"{label} dtype {arr.dtype.name} is not the model's {dtype}"
    g = lp.shape[0]
    reason = shape_reason("traj['x0']", traj["x0"], [("G", g), ("L", seq), ("C", channels)])
    if reason:
        yield reason
    if lp.shape != (g, 1) or bool(np.any(lp != 0)):
        yield f"log_probs of an ODE group must be the [G, 1] = [{g}, 1] zeros placeholder, got shape {tuple(lp.shape)}"
    sigmas = group.cond["sigmas"]
    reason = shape_reason("cond['sigmas']", sigmas, [("N+1", None)])
    if reason:
        yield reason
    s = np.asarray(sigmas, dtype=np.float64)
    if not (s.shape[0] >= 2 and np.all(s >= 0) and np.all(s <= 1) and np.all(s[1:] < s[:-1])):
        yield f"cond['sigmas'] {s.tolist()} is not a schedule of >= 2 values strictly decreasing in [0, 1]"
