"""The decoupled off-policy GRPO objective (AReaL's decoupled PPO) for groups sampled by an older policy.

Three log-probs per trained unit (a denoising step or a token):

- ``behave``: stored by the actor with the weights that sampled it (possibly several versions old);
- ``prox``: the proximal policy, recomputed by the learner at the start of the update with its own dtype and
  batching (no gradient); the anchor of the trust region;
- ``θ``: the current forward, with gradients.

Per unit, with ``r = exp(θ - prox)`` and the detached importance weight ``w = exp(prox - behave)``::

    loss_u = w' · max(-A r, -A clamp(r, 1 - ε_low, 1 + ε_high))

where ``w'`` is ``w`` truncated at ``iw_cap`` (``iw_mode="truncate"``: ``min(w, cap)``) or masked beyond it
(``iw_mode="mask"``: ``w`` if ``w <= cap`` else 0, so such units contribute nothing). The loss is the mean over the
counted units (the normaliser is the original count, masked units included), the batch of samples and the units.
With ``prox == behave`` (no lag), ``w = 1`` and this is exactly Flow-GRPO's plain clipped loss.

Optional rollout correction for token samplers (``ar`` family; off by default): the engine that sampled a token
(vLLM, a KV-cached loop) computes its probability ``μ`` with other numerics than the trainer's full forward, whose
value is the stored behaviour ``π_behave``. With ``rho = exp(behave - sampler)`` per token (the trainer/sampler
mismatch ratio, detached), ``tis`` multiplies each unit's loss by ``min(rho, cap)`` (truncated importance sampling)
and ``mis`` by ``rho`` where ``rho <= cap`` and 0 elsewhere (masked). It composes multiplicatively with ``w'``:
``iw_cap``/``iw_mode`` bound the policy-lag ratio prox/behave, ``rollout_correction_cap`` the engine-mismatch ratio
behave/sampler; each is capped on its own, the product is not capped again.

Optional KL to the reference policy (the same model with its LoRA adapters disabled), estimated per unit from the
log-probs of the sampled units with Schulman's k3 estimator ``k3 = exp(ref - θ) - (ref - θ) - 1`` (non-negative,
zero with zero gradient when ``θ == ref``), added as ``kl_coef · mean(k3)``. For the flow and DDIM families a unit's
log-prob is a per-element mean, so this is a KL per latent element, in the same units as the ratio.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from editrl.common import wire

IW_MODES = ("truncate", "mask")


def k3(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(q || p) from samples of q: ``exp(log_p - log_q) - (log_p - log_q) - 1`` (>= 0)."""
    d = log_p - log_q
    return torch.exp(d) - d - 1.0


def decoupled_loss(
    log_prob: torch.Tensor,
    prox_log_prob: torch.Tensor,
    behave_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    iw_cap: float = float("inf"),
    iw_mode: str = "truncate",
    mask: torch.Tensor | None = None,
    ref_log_prob: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    rollout_weight: torch.Tensor | None = None,
    log_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The decoupled loss of one chunk of units and its detached stats (see the module docstring).

    log_prob, prox_log_prob, behave_log_prob, ref_log_prob: [B, k] (or [B]); advantages: [B]; mask: [B, k] of 0/1.
    Stats (over counted units): clip_frac, approx_kl (θ vs prox, 0.5·mean Δ²), ratio_dev_max, iw_mean, iw_max,
    iw_capped_frac (units with w > cap), mismatch_kl (k3 of behave vs prox), kl_ref (k3 of θ vs ref, when given).
    rollout_weight: [B, k] detached per-unit factor of the rollout correction (see :func:`rollout_weights`).
    log_ratio: [B, k] the log of the clipped ratio when it is not ``θ - prox`` (GRPO-Guard's normalised ratio); the
    clip stats follow it, approx_kl stays on ``θ - prox``.
    """
    if iw_mode not in IW_MODES:
        raise ValueError(f"iw_mode must be one of {IW_MODES}, got {iw_mode!r}")
    if log_prob.ndim == 1:
        log_prob, prox_log_prob, behave_log_prob = log_prob[:, None], prox_log_prob[:, None], behave_log_prob[:, None]
        ref_log_prob = None if ref_log_prob is None else ref_log_prob[:, None]
        mask = None if mask is None else mask.reshape(-1, 1)
    weight = torch.ones_like(log_prob) if mask is None else mask.to(log_prob.dtype)
    count = weight.sum().clamp_min(1.0)
    adv = advantages.reshape(-1, 1)
    prox, behave = prox_log_prob.detach(), behave_log_prob.detach()
    delta = log_prob - prox
    ratio = torch.exp(delta if log_ratio is None else log_ratio.reshape(delta.shape))
    surrogate = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high))
    iw = torch.exp(prox - behave)
    capped = iw > iw_cap
    iw_used = torch.clamp(iw, max=iw_cap) if iw_mode == "truncate" else torch.where(capped, torch.zeros_like(iw), iw)
    unit_weight = iw_used if rollout_weight is None else iw_used * rollout_weight.detach().reshape(iw_used.shape)
    loss = (surrogate * unit_weight * weight).sum() / count
    kl_ref = None
    if ref_log_prob is not None:
        kl_ref = k3(ref_log_prob.detach(), log_prob)
        if kl_coef:
            loss = loss + kl_coef * (kl_ref * weight).sum() / count
    with torch.no_grad():
        counted = weight > 0

        def mean(x: torch.Tensor) -> torch.Tensor:
            return (x.to(weight.dtype) * weight).sum() / count

        deviation = (ratio - 1.0).abs()
        outside = (ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high)
        stats = {
            "clip_frac": mean(outside),
            "approx_kl": mean(0.5 * delta**2),
            "ratio_dev_max": deviation[counted].max() if bool(counted.any()) else deviation.new_zeros(()),
            "iw_mean": mean(iw),
            "iw_max": iw[counted].max() if bool(counted.any()) else iw.new_zeros(()),
            "iw_capped_frac": mean(capped),
            "mismatch_kl": mean(k3(prox, behave)),
        }
        if kl_ref is not None:
            stats["kl_ref"] = mean(kl_ref)
    return loss, stats


ROLLOUT_CORRECTIONS = ("none", "tis", "mis")


def rollout_weights(behave: torch.Tensor, sampler: torch.Tensor, mode: str, cap: float) -> torch.Tensor:
    """Per-unit factor of the rollout correction (see the module docstring): from ``rho = exp(behave - sampler)``,
    ``min(rho, cap)`` for ``tis``, ``rho`` or 0 beyond ``cap`` for ``mis``, 1 for ``none``. Detached."""
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"rollout correction must be one of {ROLLOUT_CORRECTIONS}, got {mode!r}")
    rho = torch.exp(behave.detach() - sampler.detach())
    if mode == "none":
        return torch.ones_like(rho)
    if mode == "tis":
        return torch.clamp(rho, max=cap)
    return torch.where(rho > cap, torch.zeros_like(rho), rho)


_MAX_KEYS = ("ratio_dev_max", "iw_max", "behave_dev_max", "logp_mismatch_max", "sampler_logp_dev_max")


def exactness_stats(
    prox: torch.Tensor, behave: torch.Tensor, mask: torch.Tensor | None, fresh: bool
) -> dict[str, torch.Tensor]:
    """How far the measured prox log-probs [B, k] are from the behaviour ones (see :meth:`FlowGRPO.group_loss`):
    ``behave_dev_max`` and, for a ``fresh`` group, ``logp_mismatch_max`` (float64 difference). Over counted units."""
    deviation = (torch.exp(prox - behave) - 1.0).abs()
    mismatch = (prox.detach().double() - behave.double()).abs()
    if mask is not None:
        deviation, mismatch = deviation * mask, mismatch * mask.double()
    stats = {"behave_dev_max": deviation.max()}
    if fresh:
        stats["logp_mismatch_max"] = mismatch.max()
    return stats


def reduce_chunk_stats(out: dict[str, list[float]]) -> dict[str, float]:
    """A group's stats from its chunks' values: the max for ``*_max`` keys, else the mean."""
    return {k: max(v) if k in _MAX_KEYS else float(np.mean(v)) for k, v in out.items()}


class FlowGRPO:
    """``learner.objective: flow_grpo`` (the default): the decoupled clipped ratio above, for every family."""

    name = "flow_grpo"
    families = ("flow", "ddim", "ar")
    uses_log_probs = True  # the actor's behaviour log-probs are the anchor of the ratio

    def group_loss(
        self, up: Any, group: wire.RolloutGroup, adv: torch.Tensor, n_units: int, prox: torch.Tensor | str,
        ref: torch.Tensor | None, fresh: bool = False,
    ) -> dict[str, float]:  # fmt: skip
        """Forward/backward over every trained unit of one group, chunk by chunk as the family recomputes them.

        Each chunk's loss is the mean over its counted units; it is weighted by ``k / n_units`` (k units in the chunk,
        ``n_units`` in the whole batch), so every unit of the step weighs the same.

        Exactness stats, only when prox was measured (not bypassed): ``behave_dev_max`` = max |exp(prox - behave) - 1|
        and, for a ``fresh`` group (sampled by the weights the learner holds now, so prox must equal behave bit for
        bit), ``logp_mismatch_max`` = max |prox - behave| of the log-probs themselves, the float32 values differenced
        in float64 (an ulp shows; 0.0 means bit-identical).
        """
        bypassed = isinstance(prox, str) and prox == "behave"
        lcfg = up.cfg.learner
        behave = torch.from_numpy(np.array(group.log_probs))  # [G, S]
        if isinstance(prox, str):  # "behave": bypassed; "forward": the θ forward's detached value, chunk by chunk
            prox = behave if prox == "behave" else None
        mask = group.traj.get("unit_mask")
        mask_t = torch.from_numpy(np.array(mask, dtype=np.float32)) if mask is not None else None
        sampler = group.traj.get("sampler_log_probs")  # ar: the token engine's own log-probs, [G, T]
        sampler_t = torch.from_numpy(np.array(sampler, dtype=np.float32)) if sampler is not None else None
        out: dict[str, list[float]] = {}
        for start, log_prob in up.policy.recompute(up.model, group.traj, group.cond, group.params):
            cols = slice(start, start + log_prob.shape[1])
            chunk_mask = mask_t[:, cols] if mask_t is not None else None
            chunk_prox = log_prob.detach() if prox is None else prox[:, cols]
            chunk_rollout, sampler_stats = None, {}
            if sampler_t is not None:
                chunk_rollout, sampler_stats = self._sampler_mismatch(
                    up, behave[:, cols], sampler_t[:, cols], chunk_mask
                )
            loss, stats = decoupled_loss(
                log_prob, chunk_prox, behave[:, cols], adv,
                clip_low=lcfg.clip_range, clip_high=lcfg.clip_range_high or lcfg.clip_range, iw_cap=lcfg.iw_cap,
                iw_mode=lcfg.iw_mode, mask=chunk_mask, ref_log_prob=None if ref is None else ref[:, cols],
                kl_coef=lcfg.kl_coef, rollout_weight=chunk_rollout,
            )  # fmt: skip
            stats.update(sampler_stats)
            up.engine.backward(loss * (log_prob.shape[1] / n_units))
            if not bypassed:
                stats.update(exactness_stats(chunk_prox, behave[:, cols], chunk_mask, fresh))
            out.setdefault("loss", []).append(float(loss.detach()))
            for key, value in stats.items():
                out.setdefault(key, []).append(float(value))
        return reduce_chunk_stats(out)

    def _sampler_mismatch(
        self, up: Any, behave: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Sampler-vs-trainer mismatch of one chunk of tokens: ``sampler_kl`` (k3 estimate of KL(sampler || trainer)
        from the sampled tokens), ``sampler_logp_dev_max`` (max |behave - sampler|, float64 difference) and, with a
        correction, its per-unit factor and ``rollout_weight_mean``. Over counted units only."""
        lcfg = up.cfg.learner
        weight = torch.ones_like(behave) if mask is None else mask
        count = weight.sum().clamp_min(1.0)
        stats = {
            "sampler_kl": (k3(behave, sampler) * weight).sum() / count,
            "sampler_logp_dev_max": ((behave.double() - sampler.double()).abs() * weight.double()).max(),
        }
        if lcfg.rollout_correction == "none":
            return None, stats
        factor = rollout_weights(behave, sampler, lcfg.rollout_correction, lcfg.rollout_correction_cap)
        stats["rollout_weight_mean"] = (factor * weight).sum() / count
        return factor, stats
