"""The learner's loop: ``sample groups → advantages → clipped GRPO loss per unit → optimizer step → maybe publish``.

Each torchrun rank requests its own complete groups from the broker. The model is the policy's trained module (a
flow transformer, a DDIM UNet or an AR decoder; see :mod:`editrl.common.family`) with LoRA adapters, sharded with
FSDP2 (``fully_shard``; gloo on CPU). Every rank runs the same number of forward/backward passes per step
(zero-variance groups are still run with zero advantage when world size > 1) so the FSDP collectives stay aligned.

Exactness: the family's ``recompute`` runs the whole group in ONE forward per unit chunk, in float32, at the stored
tensors, exactly as the actor batched it, so with unchanged weights the ratio θ/behave is exactly 1.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import zmq
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from editrl.common import wire
from editrl.common.config import TopologyConfig
from editrl.common.family import load_policy
from editrl.common.flow import lora_key
from editrl.common.net import BrokerClient, new_id
from editrl.common.weights import sha256_file
from editrl.common.weights_stream import FilePublisher, WeightServer
from editrl.learner.loss import clipped_policy_loss, group_advantages


def is_lora_key(name: str) -> bool:
    return "lora_" in name


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
        mesh = init_device_mesh("cpu", (self.world,))
        for block in self.policy.shard_units():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=lcfg.lr, betas=(0.9, 0.999), weight_decay=lcfg.weight_decay, eps=1e-8
        )
        self.step, self.version = 0, 0
        self.ckpt_dir = cfg.run_dir / "checkpoints"
        self._resume()
        self.client = BrokerClient(
            ctx or zmq.Context(), cfg.broker.endpoint, f"learner-{self.rank}", security=cfg.security
        )
        self._skip_reused_versions()
        self.writer = None
        self.publisher: Any = None
        if self.rank == 0:
            if lcfg.weights_transport == "stream":  # actors pull chunks from this process; no shared file system
                self.publisher = WeightServer(lcfg.weights_endpoint, log=log)
            else:
                self.publisher = FilePublisher(cfg.run_dir / "weights")
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(cfg.run_dir / "tb"))
            self.metrics_file = open(cfg.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        self.first_reward: float | None = None
        self.should_stop: Any = lambda: False

    # -- loop --------------------------------------------------------------------------------------------------

    def run(self, should_stop: Any, max_steps: int = 0) -> None:
        self.should_stop = should_stop
        while not should_stop() and not (max_steps and self.step >= max_steps):
            t0 = time.monotonic()
            groups, rewards, wait_s = self.sample_batch(should_stop)
            stats = self.train_step(groups, rewards)
            self.step += 1
            self.log.info("batch_trained", step=self.step, rank=self.rank, group_ids=[g.group_id for g in groups])
            if self.step % self.cfg.learner.publish_every == 0:
                self.publish()
            if self.step % self.cfg.learner.checkpoint_every == 0:
                self.checkpoint()
            stats.update(wait_s=wait_s, step_s=time.monotonic() - t0)
            self.report(stats)

    def sample_batch(self, should_stop: Any) -> tuple[list[wire.RolloutGroup], list[np.ndarray], float]:
        """This rank's share of complete groups, none older than ``version - η``."""
        groups: list[wire.RolloutGroup] = []
        rewards: list[np.ndarray] = []
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
            for record, r in zip(reply.groups, reply.rewards, strict=True):
                groups.append(wire.decode(wire.decode_record(record)))
                rewards.append(np.asarray(r, dtype=np.float32))
        return groups, rewards, wait_s

    def train_step(self, groups: list[wire.RolloutGroup], rewards: list[np.ndarray]) -> dict[str, float]:
        lcfg = self.cfg.learner
        global_std = torch.tensor(float(np.concatenate(rewards).std())) if lcfg.global_std else None
        n_units = sum(g.log_probs.shape[1] for g in groups)
        agg: dict[str, list[float]] = {"loss": [], "clip_frac": [], "approx_kl": [], "ratio_dev_max": []}
        zero_var = 0
        for group, r in zip(groups, rewards, strict=True):
            adv = group_advantages(torch.from_numpy(r), clip=lcfg.adv_clip_max, global_std=global_std)
            if not adv.abs().any():
                zero_var += 1
                if self.world == 1:
                    continue  # contributes nothing; multi-rank still runs it to keep collectives aligned
            for key, value in self.group_loss(group, adv, n_units).items():
                agg[key].append(value)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, lcfg.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        all_r = np.concatenate(rewards)
        staleness = [self.version - g.policy_version for g in groups]
        local = {
            "reward/mean": float(all_r.mean()),
            "reward/std": float(all_r.std()),
            "learner/staleness_mean": float(np.mean(staleness)),
            "learner/staleness_max": float(np.max(staleness)),
            "learner/zero_variance_groups": float(zero_var),
            "learner/grad_norm": float(grad_norm),
        }
        for key, values in agg.items():
            local[f"learner/{key}"] = float(np.mean(values)) if values else 0.0
        return self._all_reduce_mean(local)

    def group_loss(self, group: wire.RolloutGroup, adv: torch.Tensor, n_units: int) -> dict[str, float]:
        """Forward/backward over every trained unit of one group, chunk by chunk as the family recomputes them.

        Each chunk's loss is the mean over its counted units; it is weighted by ``k / n_units`` (k units in the chunk,
        ``n_units`` in the whole batch), so every unit of the step weighs the same.
        """
        behave = torch.from_numpy(np.array(group.log_probs))  # [G, S]
        mask = group.traj.get("unit_mask")
        mask_t = torch.from_numpy(np.array(mask, dtype=np.float32)) if mask is not None else None
        out: dict[str, list[float]] = {"loss": [], "clip_frac": [], "approx_kl": [], "ratio_dev_max": []}
        for start, log_prob in self.policy.recompute(self.model, group.traj, group.cond, group.params):
            k = log_prob.shape[1]
            chunk_mask = mask_t[:, start : start + k] if mask_t is not None else None
            loss, stats = clipped_policy_loss(
                log_prob, behave[:, start : start + k], adv, self.cfg.learner.clip_range, chunk_mask
            )
            (loss * (k / n_units)).backward()
            out["loss"].append(float(loss))
            for key, value in stats.items():
                out[key].append(float(value))
        return {k: float(np.mean(v)) if k != "ratio_dev_max" else float(np.max(v)) for k, v in out.items()}

    def _all_reduce_mean(self, stats: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return stats
        keys = sorted(stats)
        t = torch.tensor([stats[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist(), strict=True)}

    # -- weights and checkpoints -------------------------------------------------------------------------------

    def publish(self) -> None:
        """Gather the LoRA weights on rank 0 (collective), write them, announce them through the broker."""
        t0 = time.monotonic()
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        self.version += 1
        if self.rank == 0:
            lora = {lora_key(k): v for k, v in full.items() if is_lora_key(k)}
            info = self.publisher.publish(self.version, lora, kind="lora")
            message = wire.PublishWeights(new_id(), self.step, wire.weights_dict(info))
            while not isinstance(self.client.request(message, should_stop=self.should_stop), wire.Ack):
                time.sleep(wire.STORAGE_RETRY_S)  # the broker could not record it: admission depends on it
            self.log.info("weights_published", version=self.version, seconds=round(time.monotonic() - t0, 3))
        dist.barrier()

    def checkpoint(self) -> None:
        """DCP checkpoint of the trainable parameters, optimizer, step and version (all ranks)."""
        path = self.ckpt_dir / f"step_{self.step:06d}"
        opts = StateDictOptions(ignore_frozen_params=True)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=opts)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
        norm = self.trainable_norm()
        if self.rank == 0:
            meta = {
                "step": self.step,
                "version": self.version,
                "path": str(path),
                "param_norm": norm,
                # DCP's .metadata is a pickle: its checksum lets the resume refuse a file this learner did not write
                "metadata_sha256": sha256_file(path / ".metadata"),
            }
            tmp = self.ckpt_dir / "latest.json.tmp"
            tmp.write_text(json.dumps(meta))
            tmp.replace(self.ckpt_dir / "latest.json")
            self.log.info("checkpoint_saved", **meta)
        dist.barrier()

    def _resume(self) -> None:
        latest = self.ckpt_dir / "latest.json"
        if not latest.exists():
            return
        meta = json.loads(latest.read_text())
        digest = sha256_file(Path(meta["path"]) / ".metadata")
        if digest != meta.get("metadata_sha256"):
            raise RuntimeError(f"checkpoint {meta['path']}: .metadata checksum mismatch; refusing to unpickle it")
        opts = StateDictOptions(ignore_frozen_params=True)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=opts)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=meta["path"])
        # The checkpoint holds only the trainable (LoRA) parameters: load non-strictly, then insist that every
        # trainable parameter was restored.
        result = set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(ignore_frozen_params=True, strict=False),
        )
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        missing = trainable & set(getattr(result, "missing_keys", []))
        if missing:
            raise RuntimeError(f"checkpoint {meta['path']} lacks trainable parameters: {sorted(missing)[:5]}")
        self.step, self.version = int(meta["step"]), int(meta["version"])
        self.log.info("checkpoint_resumed", step=self.step, version=self.version, param_norm=self.trainable_norm())

    def trainable_norm(self) -> float:
        """L2 norm of all trainable parameters across shards (collective): a cheap fingerprint for resume checks."""
        local = sum(
            float((p.to_local() if hasattr(p, "to_local") else p).detach().double().pow(2).sum()) for p in self.params
        )
        t = torch.tensor([local], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(t)
        return float(t.sqrt())

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
        assert self.writer is not None
        for key, value in stats.items():
            if "/" in key:
                self.writer.add_scalar(key, value, self.step)
        self.writer.flush()
        self.metrics_file.write(json.dumps({"step": self.step, "version": self.version, "time": time.time(), **stats}))
        self.metrics_file.write("\n")
        self.metrics_file.flush()
        print(
            f"step {self.step:4d} | reward {stats['reward/mean']:.3f} (first {self.first_reward:.3f}) "
            f"| staleness {stats['learner/staleness_mean']:.2f} | {groups_per_s:.2f} groups/s "
            f"| clip {stats['learner/clip_frac']:.2f} | v{self.version}",
            flush=True,
        )
        self.log.info(
            "learner_step", step=self.step, version=self.version, **{k: round(v, 5) for k, v in stats.items()}
        )

    def close(self) -> None:
        self.client.close()
        if self.publisher is not None:
            self.publisher.close()
        if self.writer is not None:
            self.writer.close()
            self.metrics_file.close()
