"""DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117) for the flow editors: ``learner.objective: nft``.

A likelihood-free objective on the *forward* process: no behaviour log-probs, no SDE, CFG-free as the paper runs it
(the velocity trained is the one the actor sampled with: FLUX-Kontext's guidance embedding, Qwen-Image-Edit's true CFG
only if ``policy.sampler.guidance > 1``; the paper's recipe is 1). The actor samples with the deterministic ODE and
stores each edit's final clean latent x0 (:mod:`editrl.common.families.flow_ode`); the reward only says how much of
each edit to imitate (positive) or to move away from (negative).

Terms, per group of G edits: x0 [G, L, C] (``traj['x0']``), the advantages A [G] (already clipped to ±c with
c = ``learner.adv_clip_max``), the sampler's schedule σ_0 = 1 > ... > σ_{N-1} > σ_N = 0 (``cond['sigmas']``),
β = ``learner.nft_beta``, K = ``learner.nft_timesteps`` (0: N - 1).

- **Reward in [0, 1]**: ``r = clamp((clamp(A, -c, c) / c) / 2 + 1/2, 0, 1)`` (A = 0 gives 1/2).
- **Draws**: per edit, K distinct noise levels from σ_0 .. σ_{N-1} (the first K of a random permutation) and a fresh
  ε ~ N(0, I) per (edit, level); ``x_σ = (1 - σ) x0 + σ ε``. The generator is seeded from (group id, learner version),
  so a rerun of a step draws the same numbers and the same group trained at another step draws new ones.
- **Velocities**: v_θ (with gradient) and v_old (none) at x_σ, through the family's ``velocity`` hook (the transformer
  call of its recompute).
- **Implicit policies**: ``v+ = β v_θ + (1 - β) v_old``, ``v- = (1 + β) v_old - β v_θ`` (i.e. v_old ± β (v_θ - v_old));
  ``x0± = x_σ - σ v±``.
- **Adaptively weighted regression** per edit (means over the L·C elements; the weight in float64, no gradient)::

      L± = mean((x0± - x0)^2) / max(mean(|x0± - x0|), 1e-5)

- **Loss** per draw: ``c · mean_G((r L+ + (1 - r) L-) / β)``, plus ``kl_coef · mean((v_θ - v_ref)^2)`` with v_ref the
  model with its LoRA adapters disabled when ``learner.kl_coef > 0`` (the reference's v-based KL, its default 1e-4).
  A group's loss is the mean over its K draws; a group is one unit of the step (its ``log_probs`` is the [G, 1]
  placeholder), so the step's loss is the mean over groups.
- [derived] At v_θ = v_old the gradient with respect to v_θ is ``(2 r - 1)`` times that of the plain weighted x0
  regression ``c · L`` on v_θ (β-independent): r = 1 pulls v_θ's x0 prediction toward x0, r = 0 pushes it away, and
  an edit at the group mean (r = 1/2) contributes no gradient.

Reference followed (re-implemented, not copied): the authors' ``scripts/train_nft_sd3.py`` and ``config/nft.py``
(NVlabs/DiffusionNFT, read from the mirror pkuhxy/DiffusionNFT@619456a; config/base.py from
sebastian-stapf/DiffusionNFT@646f410), checked against Flow-Factory ``src/flow_factory/trainers/nft.py``@d21d1fb and
``trainers/rl/nft.py``@b30dc00. Their choices kept: the constant factor c (``adv_clip_max``), the 1e-5 floor, the
float64 weight, σ from the sampler's discrete schedule with K = int(0.99 N) = N - 1 per edit (Flow-Factory also
offers logit-normal continuous σ; not here), fresh noise per (edit, level), β = 1 default (0.1 in their OCR config).
The authors sample with a deterministic second-order solver; here the pipeline's own Euler ODE (the loss does not
depend on the solver).

**The old policy in an asynchronous learner.** In the reference v_old (and the sampler) is an EMA "old" adapter,
``old ← d·old + (1 - d)·θ`` once per sampling round, with d ramping from 0 to 0.5 (or 0.999 for OCR). Here v_old is
the learner's weights at the start of the update, the reference's d = 0 regime and Flow-Factory's default
(``off_policy: false``: v_old and the sampler are the current weights): with ``learner.minibatches: 1`` it is
the θ forward's own value, detached (no extra pass, bit-equal); with several minibatches the weights move between them,
so :meth:`NFT.proximal` computes it first, without gradient, for the same draws. The data (x0) may come from a version
up to η = ``broker.max_staleness`` older: a group of version v - η is still a valid sample of edits for this
reward-weighted forward loss, nothing is importance-weighted (there are no likelihoods), and staleness only makes the
data older, the positive/negative split then being relative to the current weights on edits of an earlier policy.
The reference tolerates that much and more (its EMA sampler lags ~d/(1 - d) = 1 round at d = 0.5, ~1000 at 0.999),
so η = 1 (the default) to a few suits nft; docs/ASYNC.md says the same.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from editrl.common import wire

WEIGHT_FLOOR = 1e-5  # the adaptive weight's floor (the reference's clip(min=0.00001))
STAT_KEYS = ("loss", "nft_loss_pos", "nft_loss_neg", "nft_r01_mean", "nft_old_dev", "nft_kl_v")


def reward01(adv: torch.Tensor, clip: float) -> torch.Tensor:
    """The advantage mapped to [0, 1]: ``clamp((clamp(A, -clip, clip) / clip) / 2 + 1/2, 0, 1)``; A [G] -> r [G]."""
    return torch.clamp((torch.clamp(adv, -clip, clip) / clip) / 2.0 + 0.5, 0.0, 1.0)


def nft_loss(
    v_theta: torch.Tensor, v_old: torch.Tensor, x_sigma: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor,
    r01: torch.Tensor, beta: float, scale: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """The DiffusionNFT loss of one draw (see the module docstring) and its detached stats.

    v_theta (with gradient), v_old (detached here), x_sigma, x0: [B, ...]; sigma, r01: [B]; scale: the constant factor
    (c = adv_clip_max in the reference). Stats: ``nft_loss_pos`` / ``nft_loss_neg`` (mean L+ / L-), ``nft_old_dev``
    (mean (v_θ - v_old)^2, 0 when v_old is θ's own value).
    """
    dims = tuple(range(1, x0.ndim))
    s = sigma.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))  # [B, 1, ...]
    v_old = v_old.detach()
    v_pos = beta * v_theta + (1.0 - beta) * v_old
    v_neg = (1.0 + beta) * v_old - beta * v_theta

    def weighted_error(v: torch.Tensor) -> torch.Tensor:  # [B]
        err = x_sigma - s * v - x0  # x0± - x0
        with torch.no_grad():
            weight = err.double().abs().mean(dim=dims, keepdim=True).clamp_min(WEIGHT_FLOOR).to(err.dtype)
        return (err**2 / weight).mean(dim=dims)

    loss_pos, loss_neg = weighted_error(v_pos), weighted_error(v_neg)
    r = r01.to(loss_pos.dtype)
    loss = scale * ((r * loss_pos + (1.0 - r) * loss_neg) / beta).mean()
    with torch.no_grad():
        stats = {
            "nft_loss_pos": loss_pos.mean(),
            "nft_loss_neg": loss_neg.mean(),
            "nft_old_dev": ((v_theta - v_old) ** 2).mean(),
        }
    return loss, stats


def draw_seed(group_id: str, version: int) -> int:
    """The generator seed of a group's draws at a learner version (stable across processes and runs)."""
    digest = hashlib.sha256(f"nft:{group_id}:{version}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class Draws:
    """A group's forward-process draws: x0 [G, L, C] and, per draw k, sigma [G] and noise [G, L, C] (work dtype, on
    the model's device); ``v_old`` per draw when :meth:`NFT.proximal` computed it ahead of the update."""

    x0: torch.Tensor
    sigmas: list[torch.Tensor]
    noises: list[torch.Tensor]
    v_old: list[torch.Tensor] = field(default_factory=list)

    def x_sigma(self, k: int) -> torch.Tensor:
        """``(1 - σ) x0 + σ ε`` of draw k, [G, L, C]."""
        s = self.sigmas[k].reshape(-1, *([1] * (self.x0.ndim - 1)))
        return (1.0 - s) * self.x0 + s * self.noises[k]


class NFT:
    """``learner.objective: nft``: the DiffusionNFT loss above, for ODE groups of the flow family."""

    name = "nft"
    families = ("flow",)
    uses_log_probs = False  # no prox/behave/ref log-probs: update.py must not recompute them (see proximal)
    stat_keys = STAT_KEYS

    def __init__(self, lcfg: Any) -> None:
        self.beta, self.timesteps = float(lcfg.nft_beta), int(lcfg.nft_timesteps)
        self.clip, self.kl_coef = float(lcfg.adv_clip_max), float(lcfg.kl_coef)

    def draws(self, up: Any, group: wire.RolloutGroup) -> Draws:
        """The group's draws at the learner version ``up.version`` (see the module docstring)."""
        device = next(up.model.parameters()).device
        x0_np = group.traj["x0"]
        dtype = torch.float64 if x0_np.dtype == np.float64 else torch.float32
        x0 = torch.from_numpy(np.array(x0_np, dtype=x0_np.dtype))  # [G, L, C], a writable copy
        levels = torch.from_numpy(np.array(group.cond["sigmas"][:-1], dtype=np.float64)).to(dtype)  # [N] σ_0..σ_{N-1}
        n, g = levels.shape[0], x0.shape[0]
        k = min(self.timesteps or n - 1, n) or 1
        version = int(getattr(up, "version", 0))  # Updater.version: the learner version train_step was given
        gen = torch.Generator().manual_seed(draw_seed(group.group_id, version))
        picks = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(g)], dim=1)  # [K, G]
        noises = [torch.randn(x0.shape, generator=gen, dtype=dtype).to(device) for _ in range(k)]
        return Draws(x0.to(device), [levels[p].to(device) for p in picks], noises)

    def proximal(self, up: Any, group: wire.RolloutGroup) -> Draws:
        """The draws with v_old computed now, without gradient, for an update whose weights move before this group's
        loss (several minibatches; the Updater calls it as for grpo_guard). The result is :meth:`group_loss`'s
        ``prox``."""
        d = self.draws(up, group)
        with torch.no_grad():
            d.v_old = [self._velocity(up, group, d, k).detach() for k in range(len(d.sigmas))]
        return d

    def _velocity(self, up: Any, group: wire.RolloutGroup, d: Draws, k: int) -> torch.Tensor:
        return up.policy.velocity(up.model, d.x_sigma(k), d.sigmas[k], group.cond, group.params).to(d.x0.dtype)

    def group_loss(
        self, up: Any, group: wire.RolloutGroup, adv: torch.Tensor, n_units: int, prox: Any, ref: Any,
        fresh: bool = False,
    ) -> dict[str, float]:  # fmt: skip
        """Forward/backward of every draw of one group (one transformer forward of the G edits per draw), each
        weighted ``1 / (K n_units)`` (the group is one unit). ``prox``: :class:`Draws` from :meth:`proximal`, or a
        string (``"forward"``): v_old is then the θ forward's detached value. ``ref`` and ``fresh`` are not used (the
        KL, when on, runs its own reference forward at the same x_σ)."""
        if not isinstance(prox, Draws | str):
            raise TypeError(f"nft: prox must be proximal's Draws or 'forward', got {type(prox).__name__}")
        d = prox if isinstance(prox, Draws) else self.draws(up, group)
        r01 = reward01(adv.to(device=d.x0.device, dtype=d.x0.dtype), self.clip)  # [G]
        k_draws, units = len(d.sigmas), group.log_probs.shape[1]
        out: dict[str, list[float]] = {"nft_r01_mean": [float(r01.mean())]}
        for k in range(k_draws):
            v = self._velocity(up, group, d, k)
            loss, stats = nft_loss(v, d.v_old[k] if d.v_old else v.detach(), d.x_sigma(k), d.x0, d.sigmas[k], r01,
                                   self.beta, self.clip)  # fmt: skip
            if self.kl_coef > 0:
                kl = ((v - self._reference_velocity(up, group, d, k)) ** 2).mean()
                loss, stats["nft_kl_v"] = loss + self.kl_coef * kl, kl.detach()
            up.engine.backward(loss * (units / (k_draws * n_units)))
            out.setdefault("loss", []).append(float(loss.detach()))
            for key, value in stats.items():
                out.setdefault(key, []).append(float(value))
        return {key: float(np.mean(values)) for key, values in out.items()}

    def _reference_velocity(self, up: Any, group: wire.RolloutGroup, d: Draws, k: int) -> torch.Tensor:
        from editrl.learner.update import adapters_disabled  # update.py imports this package: import when used

        with torch.no_grad(), adapters_disabled(up.model):
            return self._velocity(up, group, d, k)
