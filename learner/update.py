"""One learner update, independent of the broker: ``prox (and ref) log-probs → decoupled GRPO loss per unit →
optimizer step`` (see :mod:`editrl.learner.loop` for the loop around it and :mod:`editrl.learner.objective` for the
loss). Used by the learner process and, on fixed groups, by the golden-number regression test.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from editrl.common import wire
from editrl.common.config import TopologyConfig
from editrl.learner.engines import TrainEngine
from editrl.learner.loss import group_advantages
from editrl.learner.objective import decoupled_loss, k3, rollout_weights

STAT_KEYS = (
    "loss", "clip_frac", "approx_kl", "ratio_dev_max", "iw_mean", "iw_max", "iw_capped_frac", "mismatch_kl",
    "behave_dev_max", "kl_ref", "logp_mismatch_max", "sampler_kl", "sampler_logp_dev_max", "rollout_weight_mean",
)  # fmt: skip
_MAX_KEYS = ("ratio_dev_max", "iw_max", "behave_dev_max", "logp_mismatch_max", "sampler_logp_dev_max")
# Every per-step statistic a rank may report; a key absent on every rank is absent from the step (never 0.0).
_STEP_KEYS = (
    "reward/mean", "reward/std", "learner/staleness_mean", "learner/staleness_max", "learner/zero_variance_groups",
    "learner/grad_norm", "learner/prox_bypassed", *(f"learner/{k}" for k in STAT_KEYS),
)  # fmt: skip


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The reference policy: every LoRA layer of ``model`` bypassed for the duration."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class Updater:
    """The update of one learner rank: ``policy`` recomputes log-probs through ``engine.model``; ``engine`` applies
    the gradients. Every rank of a multi-rank learner calls :meth:`train_step` with its own groups."""

    def __init__(self, cfg: TopologyConfig, policy: Any, engine: TrainEngine) -> None:
        self.cfg, self.policy, self.engine = cfg, policy, engine
        self.model = engine.model
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    def train_step(self, groups: list[wire.RolloutGroup], rewards: list[np.ndarray], version: int) -> dict[str, float]:
        """One optimizer step on these groups (this rank's share) with learner weights ``version``; the stats are
        averaged over ranks (collective)."""
        lcfg = self.cfg.learner
        global_std = torch.tensor(float(np.concatenate(rewards).std())) if lcfg.global_std else None
        staleness = [version - g.policy_version for g in groups]
        bypass = not lcfg.decoupled or (lcfg.prox_bypass and self._all_reduce_max(float(max(staleness))) == 0)
        # The proximal log-probs are those of the weights at the start of the update. With one optimizer step per
        # batch (minibatches: 1) that is exactly the θ forward's own value, detached ("forward"): no extra pass.
        # With several minibatches the weights move between them, so prox is recomputed for every group first.
        separate = not bypass and (lcfg.minibatches > 1 or lcfg.prox_recompute)
        prox: list[Any] = ["behave" if bypass else self.log_probs(g) if separate else "forward" for g in groups]
        ref = [self.log_probs(g, reference=True) if lcfg.kl_coef > 0 else None for g in groups]
        agg: dict[str, list[float]] = {key: [] for key in STAT_KEYS}
        zero_var, norms = 0, []
        size = len(groups) // lcfg.minibatches
        for first in range(0, len(groups), size):
            batch = range(first, first + size)
            n_units = sum(groups[i].log_probs.shape[1] for i in batch)
            for i in batch:
                adv = group_advantages(torch.from_numpy(rewards[i]), clip=lcfg.adv_clip_max, global_std=global_std)
                if not adv.abs().any():
                    zero_var += 1
                    if self.world == 1:
                        continue  # contributes nothing; multi-rank still runs it to keep collectives aligned
                fresh = staleness[i] == 0
                for key, value in self.group_loss(groups[i], adv, n_units, prox[i], ref[i], fresh).items():
                    agg[key].append(value)
            norm = self.engine.step(lcfg.max_grad_norm)
            if norm is not None:
                norms.append(norm)
        all_r = np.concatenate(rewards)
        hist = np.bincount(np.clip(staleness, 0, self.cfg.broker.max_staleness + 1),
                           minlength=self.cfg.broker.max_staleness + 2)  # fmt: skip
        local = {
            "reward/mean": float(all_r.mean()),
            "reward/std": float(all_r.std()),
            "learner/staleness_mean": float(np.mean(staleness)),
            "learner/staleness_max": float(np.max(staleness)),
            "learner/zero_variance_groups": float(zero_var),
            "learner/prox_bypassed": float(bypass),
            **{f"learner/staleness_{lag}": float(n) for lag, n in enumerate(hist)},
        }
        if norms:  # DeepSpeed may not report a norm: then the key is absent, not 0
            local["learner/grad_norm"] = float(np.mean(norms))
        for key, values in agg.items():
            if values:  # no value: not measured this step (every group skipped, prox bypassed, no KL): absent
                local[f"learner/{key}"] = max(values) if key in _MAX_KEYS else float(np.mean(values))
        return self._reduce_stats(local)

    def log_probs(self, group: wire.RolloutGroup, reference: bool = False) -> torch.Tensor:
        """The current (or, with ``reference``, adapter-free) log-probs of every stored unit, [G, S], no gradient."""
        context = adapters_disabled(self.model) if reference else contextlib.nullcontext()
        with torch.no_grad(), context:
            chunks = [lp for _, lp in self.policy.recompute(self.model, group.traj, group.cond, group.params)]
        return torch.cat(chunks, dim=1)

    def group_loss(
        self, group: wire.RolloutGroup, adv: torch.Tensor, n_units: int, prox: torch.Tensor | str,
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
        lcfg = self.cfg.learner
        behave = torch.from_numpy(np.array(group.log_probs))  # [G, S]
        if isinstance(prox, str):  # "behave": bypassed; "forward": the θ forward's detached value, chunk by chunk
            prox = behave if prox == "behave" else None
        mask = group.traj.get("unit_mask")
        mask_t = torch.from_numpy(np.array(mask, dtype=np.float32)) if mask is not None else None
        sampler = group.traj.get("sampler_log_probs")  # ar: the token engine's own log-probs, [G, T]
        sampler_t = torch.from_numpy(np.array(sampler, dtype=np.float32)) if sampler is not None else None
        out: dict[str, list[float]] = {}
        for start, log_prob in self.policy.recompute(self.model, group.traj, group.cond, group.params):
            cols = slice(start, start + log_prob.shape[1])
            chunk_mask = mask_t[:, cols] if mask_t is not None else None
            chunk_prox = log_prob.detach() if prox is None else prox[:, cols]
            chunk_rollout, sampler_stats = None, {}
            if sampler_t is not None:
                chunk_rollout, sampler_stats = self._sampler_mismatch(behave[:, cols], sampler_t[:, cols], chunk_mask)
            loss, stats = decoupled_loss(
                log_prob, chunk_prox, behave[:, cols], adv,
                clip_low=lcfg.clip_range, clip_high=lcfg.clip_range_high or lcfg.clip_range, iw_cap=lcfg.iw_cap,
                iw_mode=lcfg.iw_mode, mask=chunk_mask, ref_log_prob=None if ref is None else ref[:, cols],
                kl_coef=lcfg.kl_coef, rollout_weight=chunk_rollout,
            )  # fmt: skip
            stats.update(sampler_stats)
            self.engine.backward(loss * (log_prob.shape[1] / n_units))
            if not bypassed:
                deviation = (torch.exp(chunk_prox - behave[:, cols]) - 1.0).abs()
                mismatch = (chunk_prox.detach().double() - behave[:, cols].double()).abs()
                if chunk_mask is not None:
                    deviation, mismatch = deviation * chunk_mask, mismatch * chunk_mask.double()
                stats["behave_dev_max"] = deviation.max()
                if fresh:
                    stats["logp_mismatch_max"] = mismatch.max()
            out.setdefault("loss", []).append(float(loss.detach()))
            for key, value in stats.items():
                out.setdefault(key, []).append(float(value))
        return {k: max(v) if k in _MAX_KEYS else float(np.mean(v)) for k, v in out.items()}

    def _sampler_mismatch(
        self, behave: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Sampler-vs-trainer mismatch of one chunk of tokens: ``sampler_kl`` (k3 estimate of KL(sampler || trainer)
        from the sampled tokens), ``sampler_logp_dev_max`` (max |behave - sampler|, float64 difference) and, with a
        correction, its per-unit factor and ``rollout_weight_mean``. Over counted units only."""
        lcfg = self.cfg.learner
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

    def _all_reduce_max(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def _reduce_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """Across ranks: the mean of each statistic over the ranks that measured it (the max for ``*_max`` keys); a
        statistic no rank measured stays absent. Staleness counts are averaged over every rank."""
        if self.world == 1:
            return stats
        keys = sorted(set(_STEP_KEYS) | {k for k in stats if k.startswith("learner/staleness_")})
        present = torch.tensor([k in stats for k in keys], dtype=torch.float64)
        # an absent key adds 0 to the sum AND 0 to its count; a key no rank measured (count 0) stays absent below
        values = torch.tensor([stats.get(k, 0.0) for k in keys], dtype=torch.float64)
        maxes = torch.tensor([stats.get(k, -math.inf) for k in keys], dtype=torch.float64)
        packed = torch.stack([values, present])
        dist.all_reduce(packed)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
        out: dict[str, float] = {}
        for j, key in enumerate(keys):
            count = float(packed[1, j])
            if count == 0:
                continue
            if key.endswith("_max") and key.startswith("learner/"):
                out[key] = float(maxes[j])
            elif key.startswith("learner/staleness_") and key[len("learner/staleness_") :].isdigit():
                out[key] = float(packed[0, j]) / self.world
            else:
                out[key] = float(packed[0, j]) / count
        return out

    # -- weights and checkpoints -------------------------------------------------------------------------------
