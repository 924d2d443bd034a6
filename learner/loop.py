"""The learner's loop: ``sample groups → prox (and ref) log-probs → decoupled GRPO loss per unit → optimizer step →
maybe publish``.

Each torchrun rank requests its own complete groups from the broker, none older than η versions (older ones are
dropped there, counted). The model is the policy's trained module (a flow transformer, a DDIM UNet or an AR decoder;
see :mod:`editrl.common.families.base`) with LoRA adapters, sharded by the training engine (FSDP2 or DeepSpeed ZeRO-3, see
:mod:`editrl.learner.engines`). Every rank runs the same number of forward/backward passes per step (zero-variance
groups are still run with zero advantage when world size > 1, and the prox bypass is decided for all ranks at once)
so the collectives stay aligned.

Objective (:mod:`editrl.learner.objectives`): at the start of each update the learner recomputes the proximal
log-probs of every stored unit with its own dtype and batching (no gradient), unless ``learner.prox_bypass`` is on
and no group of the batch is stale (then prox = behave); the PPO clip is taken on θ/prox and the detached importance
weight prox/behave is truncated or masked at ``learner.iw_cap``. ``learner.kl_coef > 0`` adds a k3 KL to the
reference policy (the LoRA adapters disabled).

Held-out check: with ``scorers.gold`` the broker sends each edit's gold score with the batch; per step the loop logs
``reward/gold`` and ``reward/gap`` over the gold-scored groups (absent when there were none) and runs the
reward-hacking alarm (:mod:`editrl.learner.gold`): ``reward/hacking_alarm`` and one ``reward_hacking_suspected``
warning per transition.

Exactness: the family's ``recompute`` runs the whole group in ONE forward per unit chunk, in float32, at the stored
tensors, exactly as the actor batched it, so with the actor's weights prox == behave bit for bit
(``learner/behave_dev_max`` is 0).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import zmq

from editrl.common import codec, wire
from editrl.common.config import TopologyConfig
from editrl.common.families.base import load_policy
from editrl.common.net import BrokerClient, new_id
from editrl.common.weights.stream_server import FilePublisher, WeightServer
from editrl.learner.engines import DeepSpeedEngine, FSDP2Engine, TrainEngine, is_lora_key
from editrl.learner.gold import HackingAlarm, group_pair, load_history
from editrl.learner.update import Updater


class Learner:
    def __init__(self, cfg: TopologyConfig, log: Any, ctx: zmq.Context | None = None) -> None:
        self.cfg, self.log = cfg, log
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        lcfg = cfg.learner
        self.groups_per_rank = lcfg.groups_per_step // self.world
        self.policy = load_policy(cfg.policy, with_pipeline=False)
        model = self.policy.trainable_module()
        model.eval()  # no dropout: the recomputed log-prob must match the actor's
        for name, p in model.named_parameters():
            p.requires_grad_(is_lora_key(name))
        self.engine: TrainEngine
        if lcfg.engine == "deepspeed":
            self.engine = DeepSpeedEngine(model, lcfg.lr, lcfg.weight_decay, lcfg.max_grad_norm)
        else:
            self.engine = FSDP2Engine(model, self.policy.shard_units(), lcfg.lr, lcfg.weight_decay)
        self.model = self.engine.model
        self.params = self.engine.params
        self.updater = Updater(cfg, self.policy, self.engine)
        self.dropped_stale = 0
        self.groups_refused = 0  # groups this rank's family check refused (quarantined at the broker)
        self.step, self.version = 0, 0
        self.ckpt_dir = cfg.run_dir / "checkpoints"
        self._resume()
        self.client = BrokerClient(
            ctx or zmq.Context(), cfg.broker.endpoint, f"learner-{self.rank}", cfg.timers.request_timeout_s,
            security=cfg.security, role="learner",
        )  # fmt: skip
        self._skip_reused_versions()
        self.writer = None
        self.wandb: Any = None
        self.publisher: Any = None
        if self.rank == 0:
            if lcfg.weights_transport == "stream":  # actors pull chunks from this process; no shared file system
                self.publisher = WeightServer(lcfg.weights_endpoint, log=log)
            else:
                self.publisher = FilePublisher(cfg.run_dir / "weights")
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(cfg.run_dir / "tb"))
            if cfg.run.wandb:  # optional sink with the same keys; offline unless WANDB_MODE/API key say otherwise
                import wandb

                wandb.init(project="editrl", name=cfg.run.name, dir=str(cfg.run_dir), config={"run": cfg.run.name})
                self.wandb = wandb
            self.metrics_file = open(cfg.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        self.first_reward: float | None = None
        self.should_stop: Any = lambda: False
        gold = cfg.scorers.gold
        self.alarm = None
        if gold is not None and self.rank == 0:  # the history of the run so far, if this is a restart
            self.alarm = HackingAlarm(gold.window, gold.min_rise, gold.min_fall)
            for step, n, train, gold_mean in load_history(cfg.run_dir / "metrics.jsonl", self.step):
                self.alarm.add(step, n, train, gold_mean)

    # -- loop --------------------------------------------------------------------------------------------------

    def run(self, should_stop: Any, max_steps: int = 0) -> None:
        self.should_stop = should_stop
        while not should_stop() and not (max_steps and self.step >= max_steps):
            t0 = time.monotonic()
            groups, rewards, gold, wait_s = self.sample_batch(should_stop)
            stats = self.train_step(groups, rewards, gold)
            self.step += 1
            self.log.info("batch_trained", step=self.step, rank=self.rank, group_ids=[g.group_id for g in groups])
            if self.step % self.cfg.learner.publish_every == 0:
                self.publish()
            if self.step % self.cfg.learner.checkpoint_every == 0:
                self.checkpoint()
            stats.update(wait_s=wait_s, step_s=time.monotonic() - t0)
            self.report(stats)
            if self.rank == 0 and self.cfg.run.image_every and self.step % self.cfg.run.image_every == 0:
                self.log_images(groups, rewards)

    def sample_batch(
        self, should_stop: Any
    ) -> tuple[list[wire.RolloutGroup], list[np.ndarray], list[list[float | None]], float]:
        """This rank's share of complete groups, none older than ``version - η``, with their rewards and each edit's
        held-out gold score (None where the gold scorer did not score it)."""
        groups: list[wire.RolloutGroup] = []
        rewards: list[np.ndarray] = []
        gold: list[list[float | None]] = []
        wait_s = 0.0
        min_version = self.version - self.cfg.broker.max_staleness
        while len(groups) < self.groups_per_rank:
            request = wire.SampleRequest(
                new_id(), self.rank, self.step + 1, len(groups), self.groups_per_rank - len(groups), min_version
            )
            reply = self.client.request(request, should_stop=should_stop)
            if isinstance(reply, wire.Wait):
                wait_s += reply.retry_after_s
                time.sleep(reply.retry_after_s)
                if should_stop():
                    raise TimeoutError("stopped while waiting for groups")
                continue
            self.dropped_stale += reply.dropped_stale
            refused: dict[str, str] = {}
            for i, (record, r) in enumerate(zip(reply.groups, reply.rewards, strict=True)):
                group = codec.decode(codec.decode_record(record))
                reason = self.policy.check_group(group)
                if reason is None and len(r) != len(group.edit_pngs):
                    reason = f"{len(r)} rewards for {len(group.edit_pngs)} edits"
                if reason is not None:
                    refused[group.group_id] = reason
                    continue
                groups.append(group)
                rewards.append(np.asarray(r, dtype=np.float32))
                gold.append(list(reply.gold[i]) if reply.gold else [None] * len(r))
            if refused:  # before any forward (a raise mid-forward on one rank would hang the others' collectives)
                self.refuse(refused, should_stop)
        return groups, rewards, gold, wait_s

    def refuse(self, refused: dict[str, str], should_stop: Any) -> None:
        """Groups of this step's batch the family cannot train: the broker quarantines them and takes them out of
        this rank's assignment, so the next request tops the batch up."""
        for group_id, reason in refused.items():
            self.log.error("group_refused", group_id=group_id, step=self.step + 1, rank=self.rank, reason=reason)
        message = wire.RejectGroups(new_id(), self.rank, self.step + 1, list(refused), list(refused.values()))
        while True:
            reply = self.client.request(message, should_stop=should_stop)
            if isinstance(reply, wire.Ack) and reply.ok:
                self.groups_refused += len(refused)
                return
            if isinstance(reply, wire.Ack) and reply.detail.startswith("rejected"):
                raise RuntimeError(f"the broker refused our RejectGroups: {reply.detail}")
            time.sleep(self.cfg.timers.storage_retry_s)  # storage unavailable: the same request again

    def train_step(
        self, groups: list[wire.RolloutGroup], rewards: list[np.ndarray], gold: list[list[float | None]] | None = None
    ) -> dict[str, float]:
        stats = self.updater.train_step(groups, rewards, self.version)
        stats["learner/dropped_stale"] = float(self.dropped_stale)
        stats["learner/groups_refused"] = float(self.groups_refused)
        if self.cfg.scorers.gold is not None:
            stats.update(self.gold_stats(rewards, gold or [[None] * len(r) for r in rewards]))
        return stats

    def gold_stats(self, rewards: list[np.ndarray], gold: list[list[float | None]]) -> dict[str, float]:
        """``reward/gold``, ``reward/gap`` and ``reward/gold_groups`` over the gold-scored groups of every rank
        (collective); {} when no group of the step had a gold score: never a 0 standing in for "none"."""
        pairs = [p for r, g in zip(rewards, gold, strict=True) if (p := group_pair(r, g)) is not None]
        sums = torch.tensor([len(pairs), sum(t for t, _ in pairs), sum(g for _, g in pairs)], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(sums)
        n, train, gold_sum = sums.tolist()
        if n < 1:
            return {}
        return {"reward/gold": gold_sum / n, "reward/gap": (train - gold_sum) / n, "reward/gold_groups": n}

    def publish(self) -> None:
        """Gather the LoRA weights on rank 0 (collective), publish them, announce them through the broker."""
        t0 = time.monotonic()
        lora = self.engine.lora_state_dict()
        self.version += 1
        if self.rank == 0:
            info = self.publisher.publish(self.version, lora, kind="lora")
            message = wire.PublishWeights(new_id(), self.step, wire.weights_dict(info))
            while not isinstance(reply := self.client.request(message, should_stop=self.should_stop), wire.Ack):
                time.sleep(self.cfg.timers.storage_retry_s)  # the broker could not record it: admission depends on it
            if not reply.ok:  # our own weights refused (not the next version, uri outside the run): a bug, say so
                raise RuntimeError(f"the broker refused weights v{self.version}: {reply.detail}")
            self.log.info("weights_published", version=self.version, seconds=round(time.monotonic() - t0, 3))
        dist.barrier()

    def checkpoint(self) -> None:
        """Checkpoint of the trainable parameters, optimizer, step and version (all ranks)."""
        path = self.ckpt_dir / f"step_{self.step:06d}"
        files = self.engine.save(path)
        norm = self.trainable_norm()
        if self.rank == 0:
            meta = {
                "step": self.step,
                "version": self.version,
                "path": str(path),
                "engine": self.cfg.learner.engine,
                "param_norm": norm,
                # DeepSpeed's format contains pickles: these checksums let the resume refuse files it did not write
                "checksums": files,
            }
            tmp = self.ckpt_dir / "latest.json.tmp"
            tmp.write_text(json.dumps(meta))
            tmp.replace(self.ckpt_dir / "latest.json")
            self.log.info("checkpoint_saved", **{k: v for k, v in meta.items() if k != "checksums"})
        dist.barrier()

    def _resume(self) -> None:
        latest = self.ckpt_dir / "latest.json"
        if not latest.exists():
            return
        meta = json.loads(latest.read_text())
        if meta.get("engine", "fsdp2") != self.cfg.learner.engine:
            raise RuntimeError(f"checkpoint {meta['path']} was written by engine {meta.get('engine')}, not "
                               f"{self.cfg.learner.engine}")  # fmt: skip
        self.engine.load(Path(meta["path"]), meta.get("checksums", {}))
        self.step, self.version = int(meta["step"]), int(meta["version"])
        self.log.info("checkpoint_resumed", step=self.step, version=self.version, param_norm=self.trainable_norm())

    def trainable_norm(self) -> float:
        """L2 norm of all trainable parameters across shards (collective): a cheap fingerprint for resume checks."""
        return self.engine.trainable_norm()

    def _skip_reused_versions(self) -> None:
        """After a resume, versions published after the checkpoint by the lost run still exist (actors may run them):
        continue numbering above the broker's latest version so no version number means two different weights."""
        reply = self.client.request(wire.StatusRequest(new_id()))
        published = int(reply.weights.get("version", 0))
        if published > self.version:
            self.log.warning("version_fast_forward", checkpoint_version=self.version, broker_version=published)
            self.version = published

    # -- reporting ---------------------------------------------------------------------------------------------

    def report(self, stats: dict[str, float]) -> None:
        if self.rank != 0:
            return
        groups_per_s = self.cfg.learner.groups_per_step / max(stats["step_s"], 1e-9)
        stats["learner/groups_per_s"] = groups_per_s
        stats["learner/idle_ratio"] = min(1.0, stats["wait_s"] / max(stats["step_s"], 1e-9))
        if self.first_reward is None:
            self.first_reward = stats["reward/mean"]
        if self.alarm is not None and "reward/gold" in stats:
            self.check_alarm(stats)
        assert self.writer is not None
        for key, value in stats.items():
            if "/" in key and math.isfinite(value):  # a NaN/inf is named in metrics.jsonl's non_finite, not plotted
                self.writer.add_scalar(key, value, self.step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in stats.items() if "/" in k}, step=self.step)
        lags = [lag for lag in range(self.cfg.broker.max_staleness + 2) if f"learner/staleness_{lag}" in stats]
        counts = [round(stats[f"learner/staleness_{lag}"] * self.world) for lag in lags]  # summed back over ranks
        if sum(counts):
            self.writer.add_histogram(
                "learner/staleness", np.repeat(np.array(lags, dtype=np.float64), counts), self.step
            )
        self.writer.flush()
        self.metrics_file.write(metrics_line(self.step, self.version, time.time(), stats))
        self.metrics_file.write("\n")
        self.metrics_file.flush()
        gold = f" | gold {stats['reward/gold']:.3f} gap {stats['reward/gap']:+.3f}" if "reward/gold" in stats else ""
        print(
            f"step {self.step:4d} | reward {stats['reward/mean']:.3f} (first {self.first_reward:.3f}) "
            f"| staleness {stats['learner/staleness_mean']:.2f} | {groups_per_s:.2f} groups/s "
            f"| iw {_fmt(stats, 'learner/iw_mean', '.3f')} | clip {_fmt(stats, 'learner/clip_frac', '.2f')} "
            f"| v{self.version}{gold}",
            flush=True,
        )
        self.log.info(
            "learner_step", step=self.step, version=self.version, **{k: round(v, 5) for k, v in stats.items()}
        )

    def check_alarm(self, stats: dict[str, float]) -> None:
        """Feed this step's gold-scored groups to the reward-hacking alarm; ``reward/hacking_alarm`` into ``stats``
        and one log line (and console line) per transition."""
        assert self.alarm is not None
        gold = stats["reward/gold"]
        verdict = self.alarm.add(self.step, int(stats["reward/gold_groups"]), gold + stats["reward/gap"], gold)
        stats["reward/hacking_alarm"] = float(verdict.active)
        if not verdict.changed:
            return
        recent, ref = verdict.recent, verdict.reference
        assert recent is not None
        numbers = {
            "step": self.step, "train_recent": round(recent.train, 4), "gold_recent": round(recent.gold, 4),
            "recent_steps": [recent.first_step, recent.last_step], "recent_groups": recent.n,
        }  # fmt: skip
        if ref is not None:
            numbers.update(
                train_reference=round(ref.train, 4), gold_reference=round(ref.gold, 4),
                reference_steps=[ref.first_step, ref.last_step], train_rise=round(recent.train - ref.train, 4),
                gold_fall=round(ref.gold - recent.gold, 4),
            )  # fmt: skip
        if verdict.active:
            assert ref is not None
            self.log.warning("reward_hacking_suspected", **numbers)
            print(
                f"editrl: reward hacking suspected at step {self.step}: since steps {ref.first_step}-{ref.last_step} "
                f"the training reward rose {ref.train:.2f} -> {recent.train:.2f} while the held-out gold score fell "
                f"{ref.gold:.2f} -> {recent.gold:.2f}",
                flush=True,
            )
        else:
            self.log.info("reward_hacking_cleared", **numbers)

    def log_images(self, groups: list[wire.RolloutGroup], rewards: list[np.ndarray]) -> None:
        """TensorBoard (and W&B) image grid of this rank's best and worst group of the step, rewards under the edits."""
        from editrl.common.images import group_strip, stack_rows

        order = np.argsort([float(np.mean(r)) for r in rewards])
        rows = []
        for label, i in (("best", order[-1]), ("worst", order[0])):
            g = groups[i]
            rows.append(group_strip(g.source_png, g.edit_pngs, list(rewards[i]), f"{label} {np.mean(rewards[i]):.2f}"))
        grid = np.asarray(stack_rows(rows))
        assert self.writer is not None
        self.writer.add_image("groups/best_and_worst", grid, self.step, dataformats="HWC")
        self.writer.flush()
        if self.wandb is not None:
            self.wandb.log({"groups/best_and_worst": self.wandb.Image(grid)}, step=self.step)

    def close(self) -> None:
        self.client.close()
        if self.publisher is not None:
            self.publisher.close()
        if self.writer is not None:
            self.writer.close()
            self.metrics_file.close()
        if self.wandb is not None:
            self.wandb.finish()  # explicitly: the process ends with os._exit (editrl.common.entry.exit_now)


def _fmt(stats: dict[str, float], key: str, spec: str) -> str:
    """A console figure, or "-" when the step did not measure it."""
    return format(stats[key], spec) if key in stats else "-"


def metrics_line(step: int, version: int, now: float, stats: dict[str, float]) -> str:
    """One metrics.jsonl line, strict JSON: a non-finite value is left out and its key listed under ``non_finite``."""
    bad = sorted(k for k, v in stats.items() if isinstance(v, float) and not math.isfinite(v))
    row: dict[str, Any] = {"step": step, "version": version, "time": now}
    row.update({k: v for k, v in stats.items() if k not in bad})
    if bad:
        row["non_finite"] = bad
    return json.dumps(row, allow_nan=False)
