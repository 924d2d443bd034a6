"""The actor's loop: ``lease → maybe_load_weights → sample → send``, one group at a time."""

from __future__ import annotations

import time
from typing import Any

import torch
import zmq

from editrl.common import wire
from editrl.common.config import TopologyConfig
from editrl.common.families.base import load_policy, rollout_message
from editrl.common.lora import load_lora_state_dict
from editrl.common.net import BrokerClient, new_id
from editrl.common.tasks import MissingImageError, Task, load_source_image
from editrl.common.weights.stream_client import FetchStopped, load_weights
from editrl.common.weights.stream_server import WeightsVersionGone


class Actor:
    def __init__(self, cfg: TopologyConfig, actor_id: int, log: Any, ctx: zmq.Context | None = None) -> None:
        self.cfg, self.log = cfg, log
        self.actor_id = f"actor-{actor_id}"
        self.ctx = ctx or zmq.Context()
        t0 = time.monotonic()
        self.policy = load_policy(cfg.policy, with_pipeline=True)
        log.info("policy_loaded", model=cfg.policy.model, seconds=round(time.monotonic() - t0, 2))
        self.client = BrokerClient(
            self.ctx, cfg.broker.endpoint, self.actor_id, cfg.timers.request_timeout_s, cfg.security, role="actor"
        )
        self.version = 0
        self.generator = torch.Generator().manual_seed(cfg.run.seed * 1000 + actor_id)
        self.n_groups = 0
        self.wait_s = 0.0
        self.started = time.monotonic()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(cfg.run_dir / "tb" / self.actor_id))  # actor/idle_ratio, actor/groups_per_s
        self.should_stop: Any = lambda: False

    def run(self, should_stop: Any, max_groups: int = 0) -> None:
        self.should_stop = should_stop
        while not should_stop() and not (max_groups and self.n_groups >= max_groups):
            reply = self.client.request(wire.LeaseRequest(self.actor_id, new_id()), should_stop=should_stop)
            self.maybe_load_weights(reply.weights)
            if isinstance(reply, wire.Wait):
                self.wait_s += reply.retry_after_s
                time.sleep(reply.retry_after_s)
                continue
            group = self.sample(reply)
            if group is None:
                continue
            self.log.info("group_attempt", group_id=group.group_id, task_id=group.task_id)
            ack = self.send_group(group)
            if not ack.ok:
                self.log.error("group_rejected", group_id=group.group_id, detail=ack.detail)
                continue
            self.n_groups += 1
            self.log.info(
                "group_sent",
                group_id=group.group_id,
                task_id=group.task_id,
                version=group.policy_version,
                detail=ack.detail,
                n_groups=self.n_groups,
                wait_s=round(self.wait_s, 2),  # cumulative time told to wait (back-pressure from admission control)
                idle_ratio=round(self.idle_ratio(), 4),
            )
            self.writer.add_scalar("actor/idle_ratio", self.idle_ratio(), self.n_groups)
            self.writer.add_scalar(
                "actor/groups_per_s", self.n_groups / (time.monotonic() - self.started), self.n_groups
            )
            self.maybe_load_weights(ack.weights)

    def idle_ratio(self) -> float:
        """Fraction of this actor's life spent told to wait for a lease (admission control: the learner is behind)."""
        return min(1.0, self.wait_s / max(time.monotonic() - self.started, 1e-9))

    def send_group(self, group: wire.RolloutGroup) -> wire.Ack:
        """Send until the broker acknowledges the commit. Resends carry the same ids, so a group is stored once."""
        while True:
            ack = self.client.request(group, should_stop=self.should_stop)
            if ack.ok or ack.detail.startswith("rejected"):  # rejected: permanent (e.g. too large), never resent
                return ack
            self.log.warning("group_not_acknowledged", group_id=group.group_id, detail=ack.detail)
            time.sleep(self.cfg.timers.storage_retry_s)
            if self.should_stop():
                raise TimeoutError("stopped before the group was acknowledged")

    def maybe_load_weights(self, weights: dict[str, Any], attempts: int = 5) -> None:
        """Load a newer published version before generating anything else. A version that does not verify yet (a
        shared file system still propagating it) is retried; after that the actor keeps the version it has, and
        every group records the version that really generated it."""
        info = wire.weights_from_dict(weights)
        if info.version <= self.version:
            return
        t0 = time.monotonic()
        for attempt in range(attempts):
            try:
                # a stream fetch uses the topology's request timeout and gives up at once when the actor stops
                state = load_weights(info, timeout_s=self.cfg.timers.request_timeout_s, should_stop=self.should_stop)
                load_lora_state_dict(self.policy.trainable_module(), state)
                break
            except WeightsVersionGone as exc:  # superseded while we fetched: the next announcement brings a newer one
                self.log.warning("weights_version_gone", version=info.version, held=exc.held)
                return
            except FetchStopped:
                return
            except (ValueError, KeyError, OSError) as exc:
                self.log.warning("weights_load_failed", version=info.version, attempt=attempt, error=str(exc)[:200])
                if self.should_stop():
                    return
                time.sleep(0.2 * (attempt + 1))
        else:
            return
        self.version = info.version
        self.policy.progress = info.version  # a sliding SDE window moves with the version (flow sampler)
        self.log.info("weights_loaded", version=info.version, seconds=round(time.monotonic() - t0, 3))

    def sample(self, lease: wire.Lease) -> wire.RolloutGroup | None:
        task = Task(lease.task_id, lease.instruction, tuple(lease.input_images), lease.task_type)
        try:
            source = load_source_image(task)
        except MissingImageError as exc:
            self.log.warning("task_skipped_missing_image", task_id=task.task_id, error=str(exc))
            skip = wire.SkipTask(new_id(), lease.lease_id, task.task_id, self.actor_id, "missing_image")
            self.client.request(skip, should_stop=self.should_stop)
            return None
        t0 = time.monotonic()
        with torch.no_grad():
            rollout = self.policy.sample(task.instruction, source, self.cfg.data.group_size, self.generator)
        self.log.debug("group_sampled", task_id=task.task_id, seconds=round(time.monotonic() - t0, 3),
                       version=self.version, start=rollout.params.get("start"))  # fmt: skip
        return rollout_message(
            rollout, source, request_id=new_id(), group_id=new_id(), lease_id=lease.lease_id, task_id=task.task_id,
            actor_id=self.actor_id, policy_version=self.version, instruction=task.instruction, task_type=task.task_type,
        )  # fmt: skip

    def close(self) -> None:
        self.client.close()
        self.writer.close()
