"""The value rules of a topology (:func:`check`): every bad value is a :class:`ConfigError` naming its dotted field.
The schema (sections, fields, defaults) and the loader are :mod:`editrl.common.config`."""

from __future__ import annotations

from typing import Any

from editrl.common.config import OBJECTIVES, ConfigError, GoldConfig, TopologyConfig

_FAMILIES = ("flow", "ddim", "ar")
_POSITIVE = {
    "data.group_size",
    "actors.count",
    "actors.threads",
    "scorers.count",
    "scorers.threads",
    "scorers.batch",
    "learner.nproc",
    "learner.threads",
    "learner.groups_per_step",
    "learner.publish_every",
    "learner.checkpoint_every",
    "policy.sampler.num_steps",
    "policy.lora.rank",
    "broker.replay_capacity",
    "broker.map_size_bytes",
    "broker.lease_timeout_s",
    "broker.score_deadline_s",
    "broker.max_job_attempts",
    "broker.max_instruction_chars",
    "broker.min_image_side",
    "broker.max_image_side",
    "timers.heartbeat_interval_s",
    "timers.scorer_liveness_s",
    "timers.request_timeout_s",
    "timers.storage_retry_s",
    "timers.restart_backoff_s",
}


def check(cfg: TopologyConfig) -> None:
    for dotted in _POSITIVE:
        obj: Any = cfg
        for part in dotted.split("."):
            obj = getattr(obj, part)
        if obj <= 0:
            raise ConfigError(f"{dotted}: must be > 0, got {obj}")
    if cfg.policy.family not in _FAMILIES:
        raise ConfigError(f"policy.family: {cfg.policy.family!r} is not one of {_FAMILIES}")
    from editrl.common.families.base import PIPELINES

    if cfg.policy.pipeline and cfg.policy.pipeline not in PIPELINES:
        raise ConfigError(f"policy.pipeline: {cfg.policy.pipeline!r} is not one of {sorted(PIPELINES)}")
    if cfg.policy.pipeline and PIPELINES[cfg.policy.pipeline][0] != cfg.policy.family:
        raise ConfigError(
            f"policy.pipeline: {cfg.policy.pipeline} belongs to family {PIPELINES[cfg.policy.pipeline][0]}"
        )
    sampler = cfg.policy.sampler
    if sampler.sde_type not in ("sde", "cps", "ode"):
        raise ConfigError(f"policy.sampler.sde_type: must be 'sde', 'cps' or 'ode', got {sampler.sde_type!r}")
    if (sampler.sde_type == "ode") != (cfg.learner.objective == "nft" and cfg.policy.family == "flow"):
        raise ConfigError(f"policy.sampler.sde_type: 'ode' (no log-probs) is the sampler of learner.objective nft, "
                          f"and nft's only; got {sampler.sde_type!r} with {cfg.learner.objective!r}")  # fmt: skip
    if sampler.sde_type == "ode" and (sampler.sde_window or cfg.learner.nft_beta <= 0):
        raise ConfigError("policy.sampler.sde_window / learner.nft_beta: nft needs sde_window 0 and nft_beta > 0")
    if not 0 <= cfg.learner.nft_timesteps <= sampler.num_steps:
        raise ConfigError(f"learner.nft_timesteps: must be in [0, policy.sampler.num_steps = {sampler.num_steps}]")
    if sampler.sde_window < 0 or sampler.sde_window >= sampler.num_steps:
        raise ConfigError("policy.sampler.sde_window: must be in [0, num_steps - 1]")
    if sampler.sde_window_schedule not in ("random", "sliding"):
        raise ConfigError(f"policy.sampler.sde_window_schedule: must be 'random' or 'sliding', got "
                          f"{sampler.sde_window_schedule!r}")  # fmt: skip
    if sampler.sde_window_shift_every < 1:
        raise ConfigError("policy.sampler.sde_window_shift_every: must be >= 1")
    if sampler.sde_window_range and (
        len(sampler.sde_window_range) != 2
        or not 0 <= sampler.sde_window_range[0] <= sampler.sde_window_range[1] - sampler.sde_window
        or sampler.sde_window_range[1] > sampler.num_steps - 1
    ):
        raise ConfigError(
            "policy.sampler.sde_window_range: must be [lo, hi] with lo + sde_window <= hi <= num_steps - 1"
        )
    if cfg.policy.dtype not in ("float32", "float64"):
        raise ConfigError(f"policy.dtype: must be 'float32' or 'float64', got {cfg.policy.dtype!r}")
    if cfg.policy.tiny_recipe not in ("random", "trained"):
        raise ConfigError(f"policy.tiny_recipe: must be 'random' or 'trained', got {cfg.policy.tiny_recipe!r}")
    if sampler.engine not in ("transformers", "vllm"):
        raise ConfigError(f"policy.sampler.engine: must be 'transformers' or 'vllm', got {sampler.engine!r}")
    if cfg.policy.family == "ddim" and sampler.eta <= 0:
        raise ConfigError("policy.sampler.eta: must be > 0 (DDIM needs noise for a log-prob)")
    if not cfg.policy.model:
        raise ConfigError("policy.model: required (a diffusers model directory or id)")
    if not cfg.data.tasks:
        raise ConfigError("data.tasks: required (a jsonl task file)")
    if cfg.broker.min_image_side > cfg.broker.max_image_side:
        raise ConfigError("broker.min_image_side: must be <= broker.max_image_side")
    if cfg.broker.max_staleness < 0:
        raise ConfigError(f"broker.max_staleness: must be >= 0, got {cfg.broker.max_staleness}")
    if not 0 < cfg.policy.sampler.noise_level:
        raise ConfigError("policy.sampler.noise_level: must be > 0 (the SDE needs noise for a log-prob)")
    if cfg.policy.sampler.num_steps < 2:
        raise ConfigError("policy.sampler.num_steps: must be >= 2 (the last step is never trained on)")
    if cfg.data.group_size < 2:
        raise ConfigError("data.group_size: must be >= 2 (group advantages need at least two edits)")
    if cfg.learner.publish_every > cfg.broker.max_staleness + 1:
        # admission grants (η + 1 + last published step)·B groups: a longer publish interval starves the learner
        raise ConfigError(
            f"learner.publish_every: must be <= broker.max_staleness + 1 = {cfg.broker.max_staleness + 1}, "
            f"got {cfg.learner.publish_every}"
        )
    if cfg.learner.groups_per_step % cfg.learner.nproc:
        raise ConfigError("learner.groups_per_step: must be divisible by learner.nproc")
    if cfg.learner.minibatches < 1 or (cfg.learner.groups_per_step // cfg.learner.nproc) % cfg.learner.minibatches:
        raise ConfigError("learner.minibatches: must be >= 1 and divide groups_per_step / nproc")
    if not cfg.broker.endpoint.startswith(("tcp://", "ipc://")):
        raise ConfigError(f"broker.endpoint: expected tcp://HOST:PORT or ipc://PATH, got {cfg.broker.endpoint!r}")
    if not 0 <= cfg.learner.master_port <= 65535:
        raise ConfigError(
            f"learner.master_port: must be 0 (pick a free port) or a TCP port, got {cfg.learner.master_port}"
        )
    if cfg.learner.weights_transport not in ("file", "stream"):
        raise ConfigError(
            f"learner.weights_transport: must be 'file' or 'stream' (nccl: see docs/WEIGHTS.md), "
            f"got {cfg.learner.weights_transport!r}"
        )
    if cfg.learner.weights_transport == "stream" and cfg.security.curve:
        raise ConfigError("learner.weights_transport: 'stream' with security.curve is not supported yet; use 'file'")
    if not cfg.learner.weights_endpoint.startswith("tcp://"):
        raise ConfigError(f"learner.weights_endpoint: expected tcp://HOST:PORT, got {cfg.learner.weights_endpoint!r}")
    if cfg.learner.engine not in ("fsdp2", "deepspeed"):
        raise ConfigError(f"learner.engine: must be 'fsdp2' or 'deepspeed', got {cfg.learner.engine!r}")
    if cfg.learner.rollout_correction not in ("none", "tis", "mis"):
        raise ConfigError(
            f"learner.rollout_correction: must be 'none', 'tis' or 'mis', got {cfg.learner.rollout_correction!r}"
        )
    if cfg.learner.rollout_correction != "none" and cfg.policy.family != "ar":
        raise ConfigError("learner.rollout_correction: corrects a token sampler's log-probs; only for policy.family ar")
    if not cfg.learner.rollout_correction_cap >= 1.0:
        raise ConfigError(f"learner.rollout_correction_cap: must be >= 1, got {cfg.learner.rollout_correction_cap}")
    if cfg.learner.iw_mode not in ("truncate", "mask"):
        raise ConfigError(f"learner.iw_mode: must be 'truncate' or 'mask', got {cfg.learner.iw_mode!r}")
    if not cfg.learner.iw_cap >= 1.0:
        raise ConfigError(f"learner.iw_cap: must be >= 1 (w = 1 when the group is fresh), got {cfg.learner.iw_cap}")
    if cfg.learner.objective not in OBJECTIVES:
        raise ConfigError(f"learner.objective: {cfg.learner.objective!r} is not one of {sorted(OBJECTIVES)}")
    if cfg.policy.family not in OBJECTIVES[cfg.learner.objective]:
        raise ConfigError(f"learner.objective: {cfg.learner.objective} trains {OBJECTIVES[cfg.learner.objective]} "
                          f"editors, not policy.family {cfg.policy.family!r}")  # fmt: skip
    guard, need = (sampler.sde_type, cfg.learner.decoupled), ("sde", True)  # see learner/objectives/grpo_guard.py
    if cfg.learner.objective == "grpo_guard" and guard != need:
        raise ConfigError(f"learner.objective: grpo_guard needs (sde_type, decoupled) {need}, not {guard}")
    if cfg.learner.clip_range_high < 0 or cfg.learner.kl_coef < 0:
        raise ConfigError("learner.clip_range_high / learner.kl_coef: must be >= 0")
    if cfg.timers.scorer_liveness_s < 2 * cfg.timers.heartbeat_interval_s:
        raise ConfigError(
            f"timers.scorer_liveness_s: must be >= 2 x timers.heartbeat_interval_s "
            f"({2 * cfg.timers.heartbeat_interval_s}), got {cfg.timers.scorer_liveness_s}"
        )
    if cfg.learner.lr <= 0 or cfg.learner.clip_range <= 0:
        raise ConfigError("learner.lr / learner.clip_range: must be > 0")
    if cfg.scorers.gold is not None:
        _check_gold(cfg.scorers.gold)


def _check_gold(gold: GoldConfig) -> None:
    if not gold.backend:
        raise ConfigError("scorers.gold.backend: required (the held-out scorer, e.g. metric, vlm, editscore)")
    if not 0 < gold.share <= 1:
        raise ConfigError(f"scorers.gold.share: must be in (0, 1], got {gold.share}")
    if gold.window < 1:
        raise ConfigError(f"scorers.gold.window: must be >= 1, got {gold.window}")
    for name in ("min_rise", "min_fall"):
        if getattr(gold, name) < 0:
            raise ConfigError(f"scorers.gold.{name}: must be >= 0, got {getattr(gold, name)}")
