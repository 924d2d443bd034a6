"""Flow-matching sampler math shared by the flow editors (FLUX.1-Kontext, Qwen-Image-Edit).

Conventions (Flow-GRPO, see docs REFERENCE-MATH section 1): flow time runs sigma = 1 (noise) -> 0 (data),
dt = sigma_next - sigma < 0, one SDE step per sampler step, log-prob = Gaussian log-density of the stored next
latent averaged over all non-batch elements (one scalar per sample per step). Everything numeric is float32, or
float64 end to end when the transformer's weights are float64 (``policy.dtype: float64``: the reference-precision path
the golden-number test runs, so no CPU-specific float32 rounding reaches its recorded digits).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from editrl.common.families.flow_ode import ODE

__all__ = [
    "FlowSampler", "FlowStep", "STEPS", "WINDOW_SCHEDULES", "flow_sde_step", "flow_cps_step", "schedule_reason",
    "sde_window", "work_dtype",
]  # fmt: skip

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the step math runs in: float64 if any input is float64, else float32 (bf16/fp16 are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _per_sample(s: float | torch.Tensor, batch: int, ndim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Scalar / [] / [B] sigma -> tensor [B, 1, ..., 1] of ``dtype`` with `ndim` dims in total."""
    t = torch.as_tensor(s).reshape(-1).to(dtype)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"sigma has {t.numel()} values for a batch of {batch}")
    return t.reshape(batch, *([1] * (ndim - 1)))


def flow_sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Flow-GRPO SDE step with its Gaussian log-prob (float32 throughout; float64 if x or v is float64).

    Args:
        x: current latents [B, ...] (e.g. [B, L, C]); cast to the work dtype (:func:`work_dtype`).
        v: velocity prediction, same shape as x; cast likewise.
        sigma, sigma_next: python floats or tensors [] / [B]; broadcast over non-batch dims.
        noise_level: a in std_dev_t = a * sqrt(sigma / (1 - sigma)); must be > 0.
        prev_sample: the next latent to score [B, ...]; drawn as mean + std * eps when None.
        generator: RNG for eps (only used when prev_sample is None).

    Returns:
        prev_sample [B, ...], log_prob [B] (mean over non-batch elements of the Gaussian log-density of
        prev_sample.detach() under N(mean, std^2)), mean [B, ...], std [B, 1, ...] (per-element transition std =
        std_dev_t * sqrt(-dt)); all in the work dtype.

    Math: dt = sigma_next - sigma; std_dev_t = a * sqrt(sigma / (1 - s')) with s' = sigma, except at sigma == 1
    where s' = sigma_next. flow_grpo uses sigmas[1] (the schedule's second sigma) there, which is exactly
    sigma_next at the first step, the only step with sigma == 1.
    mean = x (1 + std_dev_t^2 / (2 sigma) dt) + v (1 + std_dev_t^2 (1 - sigma) / (2 sigma)) dt.
    Gradients flow only through mean (i.e. through v).
    """
    if noise_level <= 0:
        raise ValueError(f"noise_level must be > 0 for a log-prob, got {noise_level}")
    dtype = work_dtype(x, v)
    x, v = x.to(dtype), v.to(dtype)
    b, nd = x.shape[0], x.ndim
    s = _per_sample(sigma, b, nd, dtype).to(x.device)  # [B, 1, ...]
    s_next = _per_sample(sigma_next, b, nd, dtype).to(x.device)  # [B, 1, ...]
    dt = s_next - s
    denom_sigma = torch.where(s == 1.0, s_next, s)
    std_dev_t = noise_level * torch.sqrt(s / (1.0 - denom_sigma))
    mean = x * (1.0 + std_dev_t**2 / (2.0 * s) * dt) + v * (1.0 + std_dev_t**2 * (1.0 - s) / (2.0 * s)) * dt
    std = std_dev_t * torch.sqrt(-dt)
    if not bool(torch.all(std > 0)) or not bool(torch.all(torch.isfinite(std))):
        raise ValueError(f"transition std must be finite and > 0, got {std.flatten().tolist()}")
    if prev_sample is None:
        eps = torch.randn(x.shape, generator=generator, dtype=dtype, device=x.device)
        prev_sample = mean + std * eps
    prev_sample = prev_sample.to(dtype)
    lp = -((prev_sample.detach() - mean) ** 2) / (2.0 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    log_prob = lp.mean(dim=tuple(range(1, nd)))  # [B]
    return prev_sample, log_prob, mean, std


def flow_cps_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One coefficients-preserving (CPS) step, flow_grpo's ``sde_type='cps'`` (in the work dtype, as the SDE step).

    Same arguments and returns as :func:`flow_sde_step`. Math (REFERENCE-MATH 1.1):
    std = sigma_next * sin(a * pi / 2); x0 = x - sigma v; x1 = x + (1 - sigma) v;
    mean = x0 (1 - sigma_next) + x1 sqrt(sigma_next^2 - std^2); prev_sample = mean + std * eps.
    The "log-prob" is flow_grpo's: ``-mean((prev_sample - mean)^2)`` with every constant removed (no 1/(2 std^2), no
    log std), so it is NOT a Gaussian log-density and the ratio it gives is a tempered one -- reproduced exactly on
    purpose, so runs compare with the reference. With a = 0 the step is the ODE step x + v (sigma_next - sigma).
    """
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0 for CPS, got {noise_level}")
    dtype = work_dtype(x, v)
    x, v = x.to(dtype), v.to(dtype)
    b, nd = x.shape[0], x.ndim
    s = _per_sample(sigma, b, nd, dtype).to(x.device)
    s_next = _per_sample(sigma_next, b, nd, dtype).to(x.device)
    std = s_next * math.sin(noise_level * math.pi / 2.0)
    x0 = x - s * v
    x1 = x + (1.0 - s) * v
    mean = x0 * (1.0 - s_next) + x1 * torch.sqrt(torch.clamp(s_next**2 - std**2, min=0.0))
    if prev_sample is None:
        eps = torch.randn(x.shape, generator=generator, dtype=dtype, device=x.device)
        prev_sample = mean + std * eps
    prev_sample = prev_sample.to(dtype)
    log_prob = -((prev_sample.detach() - mean) ** 2).mean(dim=tuple(range(1, nd)))
    return prev_sample, log_prob, mean, std


STEPS = {"sde": flow_sde_step, "cps": flow_cps_step}


class FlowStep(NamedTuple):
    """One recomputed stochastic step of a stored trajectory, as a flow policy's ``recompute_steps`` yields it.

    ``recompute`` yields only ``(start, log_prob)`` of the same steps; objectives that need the transition itself
    (``grpo_guard``: the mean of both policies) read it here. Both come from one code path, so they cannot drift.
    """

    start: int  # the trained unit (column of the group's log_probs) this step is
    log_prob: torch.Tensor  # [G, 1] as recompute yields it (gradient through the model's velocity when it has one)
    mean: torch.Tensor  # [G, L, C] transition mean (same graph as log_prob)
    std: torch.Tensor  # [G, 1, 1] transition std: std_dev_t * sqrt(-dt) (SDE) or sigma_next * sin(a pi / 2) (CPS)
    dt: float  # sigma_next - sigma (< 0), in float64 from the stored sigmas


def schedule_reason(sigmas: np.ndarray, start: int, units: int, sde_type: str, noise_level: float) -> str | None:
    """None if the stored steps ``start .. start + units - 1`` of ``sigmas`` [N+1] can be recomputed with the
    ``sde_type`` step at ``noise_level``, else the reason (a static check for ``check_group``: the step's own argument
    checks run on zeros, the model never does)."""
    if sde_type not in STEPS:
        return f"params['sde_type'] = {sde_type!r} is not one of {sorted(STEPS)}"
    n = sigmas.shape[0] - 1
    if start < 0 or start + units > n:
        return f"params['start'] = {start} with {units} trained steps does not fit the {n} steps of cond['sigmas']"
    used = torch.from_numpy(np.array(sigmas[start : start + units + 1], dtype=np.float32))  # as the recompute reads
    if not (bool(torch.all(used >= 0)) and bool(torch.all(used <= 1)) and bool(torch.all(used[1:] < used[:-1]))):
        return f"cond['sigmas'] of the trained steps {used.tolist()} are not strictly decreasing in [0, 1]"
    zeros = torch.zeros(units, 1)
    try:
        STEPS[sde_type](zeros, zeros, used[:-1], used[1:], noise_level, prev_sample=zeros)
    except ValueError as exc:
        return f"params['noise_level'] / cond['sigmas']: {exc}"
    return None


WINDOW_SCHEDULES = ("random", "sliding")


def sde_window(
    num_steps: int, size: int, window_range: tuple[int, int] | None, rng: random.Random, schedule: str = "random",
    progress: int = 0, shift_every: int = 1,
) -> tuple[int, int]:  # fmt: skip
    """The (start, end) steps sampled stochastically and trained on; ODE steps outside it.

    ``size == 0``: every step but the last, ``(0, N - 1)`` (the last, near-noiseless step is never trained on).
    Otherwise, over ``window_range`` (default ``(0, N // 2)``), window ``(start, start + size)`` with
    ``schedule == "random"``: flow_grpo's Flow-GRPO-Fast rule, ``start = randint(lo, hi - size)``;
    ``schedule == "sliding"``: MixGRPO's moving window, ``start = lo + (progress // shift_every) mod (hi - size - lo
    + 1)``: it starts at the high-noise end and moves one step towards the data every ``shift_every`` policy versions
    (``progress``: the version the actor samples with), then starts over (MixGRPO's progressive strategy with
    roll-back); ``rng`` is not used then.
    """
    if size == 0:
        return 0, num_steps - 1
    lo, hi = window_range if window_range is not None else (0, num_steps // 2)
    if not (0 <= lo and hi <= num_steps - 1 and hi - lo >= size >= 1):
        raise ValueError(f"SDE window of {size} steps does not fit in range ({lo}, {hi}) of {num_steps} steps")
    if schedule == "sliding":
        start = lo + (max(0, progress) // max(1, shift_every)) % (hi - size - lo + 1)
    elif schedule == "random":
        start = rng.randint(lo, hi - size)
    else:
        raise ValueError(f"SDE window schedule must be one of {WINDOW_SCHEDULES}, got {schedule!r}")
    return start, start + size


@dataclass
class FlowSampler:
    """Sampler settings of the flow family (see :func:`sde_window` and :data:`STEPS`)."""

    num_steps: int = 4
    noise_level: float = 0.7
    guidance: float = 2.5
    sde_type: str = "sde"  # "sde" (Flow-GRPO), "cps" (coefficients-preserving) or "ode" (no noise: flow_ode, nft)
    sde_window: int = 0  # 0: every step stochastic, all but the last trained; K: a random K-step window, ODE outside
    sde_window_range: tuple[int, int] | None = None  # where the window may start/end; default (0, N // 2)
    sde_window_schedule: str = "random"  # "random" (Flow-GRPO-Fast) or "sliding" (MixGRPO), see sde_window
    sde_window_shift_every: int = 1  # sliding: policy versions per one-step move of the window

    def __post_init__(self) -> None:
        if self.sde_type not in (*STEPS, ODE):
            raise ValueError(f"sde_type must be one of {sorted(STEPS)} or {ODE!r}, got {self.sde_type!r}")
        if self.sde_type == ODE and self.sde_window:
            raise ValueError("sde_window must be 0 with the ODE sampler (no step is stochastic)")
