"""One learner update, independent of the broker: ``prox (and ref) log-probs → decoupled GRPO loss per unit →
optimizer step`` (see :mod:`editrl.learner.loop` for the loop around it and :mod:`editrl.learner.objectives` for the
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
from editrl.learner.objectives import make_objective

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
        self.objective = make_objective(cfg.learner)
        extra = tuple(k for k in getattr(self.objective, "stat_keys", ()) if k not in STAT_KEYS)
        self.stat_keys = (*STAT_KEYS, *extra)  # every statistic the objective's group_loss may report
        self.version = 0  # the learner version of the current train_step (nft seeds its noise draws with it)

    def train_step(self, groups: list[wire.RolloutGroup], rewards: list[np.ndarray], version: int) -> dict[str, float]:
        """One optimizer step on these groups (this rank's share) with learner weights ``version``; the stats are
        averaged over ranks (collective)."""
        lcfg, self.version = self.cfg.learner, version
        global_std = torch.tensor(float(np.concatenate(rewards).std())) if lcfg.global_std else None
        staleness = [version - g.policy_version for g in groups]
        bypass = not lcfg.decoupled or (lcfg.prox_bypass and self._all_reduce_max(float(max(staleness))) == 0)
        # The proximal log-probs are those of the weights at the start of the update. With one optimizer step per
        # batch (minibatches: 1) that is exactly the θ forward's own value, detached ("forward"): no extra pass.
        # With several minibatches the weights move between them, so prox is recomputed for every group first.
        proximal = getattr(self.objective, "proximal", None)  # grpo_guard: prox log-probs AND the steps' means
        if proximal is not None and lcfg.minibatches > 1:
            bypass = False  # its ratio needs the start weights' means even for fresh groups (the weights move)
        separate = not bypass and (lcfg.minibatches > 1 or lcfg.prox_recompute)
        prox_of = proximal if proximal is not None else Updater.log_probs
        prox: list[Any] = ["behave" if bypass else prox_of(self, g) if separate else "forward" for g in groups]
        kl = lcfg.kl_coef > 0 and self.objective.uses_log_probs  # nft: a velocity-space KL inside its own loss
        ref = [self.log_probs(g, reference=True) if kl else None for g in groups]
        agg: dict[str, list[float]] = {key: [] for key in self.stat_keys}
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
        """Forward/backward over one group with the configured objective (:mod:`editrl.learner.objectives`)."""
        return self.objective.group_loss(self, group, adv, n_units, prox, ref, fresh)

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
        keys = set(_STEP_KEYS) | {f"learner/{k}" for k in self.stat_keys}  # the same on every rank (collective)
        keys = sorted(keys | {k for k in stats if k.startswith("learner/staleness_")})
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
