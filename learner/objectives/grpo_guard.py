"""GRPO-Guard (Wang et al. 2025, arXiv 2510.22319): Flow-GRPO's clipped ratio with the ratio normalised per step
(RatioNorm) and each step's loss reweighted by ``1/|dt|``, decoupled for staleness exactly as :mod:`.flow_grpo`.
Flow family, Flow-GRPO SDE sampler (``sde_type: sde``) only.

Terms, per trained unit = one SDE step of one sample, ``x -> x'`` with transition ``N(μ, s² I)`` over the D latent
elements (:func:`~editrl.common.families.flow.flow_sde_step`):

- ``s = std_dev_t · sqrt(-dt)``: the transition std. It depends on the schedule and the noise level only, so every
  policy has the same one at a given step;
- ``μ_θ`` (the current forward, with gradient) and ``μ_prox`` (the proximal policy, detached): transition means;
- ``θ``, ``prox``, ``behave``: log-probs as in :mod:`.flow_grpo` (the mean over D of the Gaussian log-density of the
  stored ``x'``).

RatioNorm (the normalised ratio ``r̂``), with ``mse = mean_D (μ_θ - μ_prox)²``::

    log r̂ = s · (θ - prox) + mse / (2 s)

What it is. With ``ε = (x' - μ_prox) / s`` and ``Δμ = μ_θ - μ_prox``, per element
``log N(x'; μ_θ, s²) - log N(x'; μ_prox, s²) = ((x' - μ_prox)² - (x' - μ_θ)²) / (2 s²) = ε Δμ / s - Δμ² / (2 s²)``
(the ``log s`` terms cancel: the std is shared). Averaged over D, ``θ - prox = mean_D(ε Δμ) / s - mse / (2 s²)``, so
exactly::

    log r̂ = mean_D(ε · Δμ)          (ε in units of s, Δμ in latent units: nothing is divided by s)

Under the proximal policy ``ε ~ N(0, I)``, so ``log r̂ ~ N(0, mean_D(Δμ²) / D)`` is centred on 0, whereas the plain
``θ - prox`` has mean ``-mse / (2 s²) < 0`` (the left shift GRPO-Guard reports, worst at the low-noise steps, small
s) and std ``rms(Δμ) / (s √D)``. The gradient ``∇ log r̂ = mean_D(ε · ∇μ_θ) = s · ∇θ`` is the plain one times s.

Gradient reweighting. The Flow-GRPO mean is ``μ_θ = x (…) + v_θ (1 + σ_t² (1 - t) / (2 t)) dt`` with
``σ_t² = a² t / (1 - t)``, so ``∇μ_θ = (1 + a²/2) dt ∇v_θ`` (at t = 1, the first step, the factor is 1) and
``∇ log r̂ ∝ |dt|``. Each step's policy loss is multiplied by ``δ = 1 / |dt|``, which leaves
``(1 + a²/2) mean_D(ε · ∇v_θ)``: the same scale at every step whatever its noise level (the plain ratio's gradient
``∝ sqrt(|dt|) / σ_t`` is dominated by the low-noise steps). The loss of a unit::

    loss_u = δ · w' · max(-A r̂, -A clamp(r̂, 1 - ε_low, 1 + ε_high))

with ``w'`` the detached importance weight ``exp(prox - behave)`` capped by ``iw_cap`` / ``iw_mode``: the same
function as flow_grpo computes it (:func:`~.flow_grpo.decoupled_loss` with ``log_ratio = log r̂``), and the same mean
over counted units. The optional KL to the reference (``kl_coef``) is flow_grpo's k3 on the log-probs, not reweighted.
With θ = prox, ``r̂ = 1`` exactly and the loss is ``-δ mean(A w')``; its gradient is ``s δ`` times flow_grpo's.

What "old" is here. GRPO-Guard's old policy is the one that sampled. In editrl's decoupled objective the ratio's
anchor is the *proximal* policy, the learner's weights at the start of the update; the behaviour policy's lag (the
actor's weights, possibly several versions old) is corrected only by the detached ``w'`` (samples of behave
reweighted to prox, under which ``ε ~ N(0, I)`` holds). RatioNorm is never applied to behave: the learner has no
means of the actor's weights. Where the proximal log-probs and means come from (``prox`` of :meth:`group_loss`):

- ``"forward"`` (one optimizer step per batch): the θ forward's own values, detached: ``r̂ = 1``, no extra pass;
- a :class:`GuardProx` from :meth:`GRPOGuard.proximal`, computed at the start of the update: the only correct source
  with several minibatches, because the weights move between them (a pass inside :meth:`group_loss` for a group of
  the second minibatch would give the moved weights' means, and the bias term would no longer cancel);
- a bare log-prob tensor (``prox_recompute: true`` with one minibatch): the means from a no-grad pass here, which has
  the start weights because nothing has stepped yet;
- ``"behave"`` (``prox_bypass`` on a step without a stale group, so behave = the start weights): the behaviour
  log-probs, and the θ forward's detached means.

The config therefore refuses ``grpo_guard`` with ``decoupled: false`` (the old means would be the actor's), with
``sde_type`` other than ``sde``, and, until the Updater passes :meth:`GRPOGuard.proximal`'s result as ``prox``, with
``minibatches > 1``.

References. The ratio: X-GenGroup/Flow-Factory@a0b2bc5, ``src/flow_factory/trainers/grpo.py``
``GRPOGuardTrainer.optimize`` (``exp((log_prob - old_log_prob) · s + mse / (2 s))``, ``s = sqrt(-dt) · std_dev_t``,
mse the mean over the latent of the squared mean difference); verl-project/verl-omni@073521e4
``verl_omni/trainer/diffusion/diffusion_algos.py`` ``GRPOGuardLoss`` computes the same. The reweighting: the paper's
``1/dt`` gradient reweighting as verl-omni implements it (the policy loss divided by ``sqrt(-dt)²``; its
``docs/algo/grpo_guard.md``@65e583b5). Flow-Factory has no separate reweighting (its ``guidance/algorithms.md`` counts
RatioNorm's s-scaling as the step reweighting); followed here: the paper / verl-omni.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from editrl.common import wire
from editrl.learner.objectives.flow_grpo import decoupled_loss, exactness_stats, k3, reduce_chunk_stats


@dataclass
class GuardProx:
    """The proximal policy of one group: its log-probs and transition means, at the start of the update."""

    log_probs: torch.Tensor  # [G, S]
    means: list[torch.Tensor]  # S x [G, L, C], detached


def normalized_log_ratio(
    log_prob: torch.Tensor, prox_log_prob: torch.Tensor, mean: torch.Tensor, prox_mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """``log r̂ = s (θ - prox) + mean_D(μ_θ - μ_prox)² / (2 s)`` [B, 1] (see the module docstring).

    log_prob, prox_log_prob: [B, 1] (or [B]); mean, prox_mean: [B, ...]; std: the transition std s, [B, 1, ...] or
    [B]. Gradient through ``log_prob`` and ``mean``; the prox values and s are detached.
    """
    b = log_prob.shape[0]
    s = std.detach().reshape(b, -1)[:, :1]  # [B, 1]
    mse = ((mean - prox_mean.detach()) ** 2).reshape(b, -1).mean(dim=1, keepdim=True)  # [B, 1]
    return (log_prob - prox_log_prob.detach()).reshape(b, 1) * s + mse / (2.0 * s)


def guard_loss(
    log_prob: torch.Tensor,
    prox_log_prob: torch.Tensor,
    behave_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mean: torch.Tensor,
    prox_mean: torch.Tensor,
    std: torch.Tensor,
    dt: float,
    *,
    clip_low: float,
    clip_high: float,
    iw_cap: float = float("inf"),
    iw_mode: str = "truncate",
    mask: torch.Tensor | None = None,
    ref_log_prob: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO-Guard loss of one step of B samples and its detached stats (see the module docstring).

    log_prob, prox_log_prob, behave_log_prob, ref_log_prob: [B, 1]; advantages: [B]; mean, prox_mean: [B, L, C];
    std: [B, 1, 1] (the transition std); dt: sigma_next - sigma (< 0); mask: [B, 1] of 0/1.
    Stats: flow_grpo's (:func:`~.flow_grpo.decoupled_loss`), with clip_frac and ratio_dev_max on ``r̂``.
    """
    if not dt < 0:
        raise ValueError(f"dt must be < 0 (sigma decreases), got {dt}")
    log_ratio = normalized_log_ratio(log_prob, prox_log_prob, mean, prox_mean, std)
    policy_loss, stats = decoupled_loss(
        log_prob, prox_log_prob, behave_log_prob, advantages, clip_low=clip_low, clip_high=clip_high, iw_cap=iw_cap,
        iw_mode=iw_mode, mask=mask, ref_log_prob=ref_log_prob, log_ratio=log_ratio,
    )  # fmt: skip
    loss = policy_loss / abs(dt)
    if ref_log_prob is not None and kl_coef:
        weight = torch.ones_like(log_prob) if mask is None else mask.to(log_prob.dtype).reshape(log_prob.shape)
        kl = k3(ref_log_prob.detach().reshape(log_prob.shape), log_prob)
        loss = loss + kl_coef * (kl * weight).sum() / weight.sum().clamp_min(1.0)
    return loss, stats


class GRPOGuard:
    """``learner.objective: grpo_guard``: RatioNorm and 1/|dt| step reweighting on the decoupled clipped ratio."""

    name = "grpo_guard"
    families = ("flow",)
    uses_log_probs = True  # the actor's behaviour log-probs are the staleness weight's denominator

    def proximal(self, up: Any, group: wire.RolloutGroup) -> GuardProx:
        """The proximal log-probs and means of ``group`` under the weights ``up`` holds now (no gradient). The Updater
        calls this at the start of an update with several minibatches, before any weight moves."""
        with torch.no_grad():
            steps = list(up.policy.recompute_steps(up.model, group.traj, group.cond, group.params))
        return GuardProx(torch.cat([s.log_prob for s in steps], dim=1), [s.mean for s in steps])

    def group_loss(
        self, up: Any, group: wire.RolloutGroup, adv: torch.Tensor, n_units: int,
        prox: GuardProx | torch.Tensor | str, ref: torch.Tensor | None, fresh: bool = False,
    ) -> dict[str, float]:  # fmt: skip
        """Forward/backward over every SDE step of one group, one step per chunk, each weighted ``1 / n_units``.

        ``prox``: ``"forward"``, ``"behave"``, a :class:`GuardProx` or a log-prob tensor [G, S] (see the module
        docstring for each). Exactness stats (``behave_dev_max``, ``logp_mismatch_max``) as flow_grpo's.
        """
        sde_type = group.params.get("sde_type")
        if sde_type != "sde":  # RatioNorm is derived for the Gaussian step; the CPS "log-prob" drops 1/(2 s²)
            raise ValueError(f"grpo_guard trains SDE groups (params['sde_type'] 'sde'), got {sde_type!r}")
        lcfg = up.cfg.learner
        bypassed = isinstance(prox, str) and prox == "behave"
        behave = torch.from_numpy(np.array(group.log_probs))  # [G, S]
        if isinstance(prox, torch.Tensor):  # one minibatch: nothing has stepped, so this pass has the start weights
            prox = GuardProx(prox, self.proximal(up, group).means)
        mask = group.traj.get("unit_mask")
        mask_t = torch.from_numpy(np.array(mask, dtype=np.float32)) if mask is not None else None
        out: dict[str, list[float]] = {}
        for step in up.policy.recompute_steps(up.model, group.traj, group.cond, group.params):
            cols = slice(step.start, step.start + 1)
            if isinstance(prox, GuardProx):
                prox_lp, prox_mean = prox.log_probs[:, cols], prox.means[step.start]
            else:
                prox_lp = behave[:, cols] if bypassed else step.log_prob.detach()
                prox_mean = step.mean.detach()
            chunk_mask = mask_t[:, cols] if mask_t is not None else None
            loss, stats = guard_loss(
                step.log_prob, prox_lp, behave[:, cols], adv, step.mean, prox_mean, step.std, step.dt,
                clip_low=lcfg.clip_range, clip_high=lcfg.clip_range_high or lcfg.clip_range, iw_cap=lcfg.iw_cap,
                iw_mode=lcfg.iw_mode, mask=chunk_mask, ref_log_prob=None if ref is None else ref[:, cols],
                kl_coef=lcfg.kl_coef,
            )  # fmt: skip
            up.engine.backward(loss * (1.0 / n_units))
            if not bypassed:
                stats.update(exactness_stats(prox_lp, behave[:, cols], chunk_mask, fresh))
            out.setdefault("loss", []).append(float(loss.detach()))
            for key, value in stats.items():
                out.setdefault(key, []).append(float(value))
        return reduce_chunk_stats(out)
