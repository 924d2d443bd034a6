"""Editor families behind one interface: what an actor records per group and what the learner recomputes from it.

A *family* is a way of sampling an edit as a sequence of stochastic decisions with tractable log-probs:

- ``flow``: flow-matching editors (FLUX.1-Kontext, Qwen-Image-Edit); each SDE/CPS denoising step is a decision.
- ``ddim``: epsilon-prediction diffusion editors (InstructPix2Pix) sampled with DDIM (eta > 0); each step is a decision.
- ``ar``: autoregressive token editors (Emu3-style); each generated image token is a decision.

The actor side (:class:`ActorPolicy`) turns (instruction, source image) into a :class:`Rollout` of G edits; the
learner side (:class:`LearnerPolicy`) recomputes, with gradients, the log-probs of exactly the stored decisions.
Everything between them is family-agnostic: the rollout travels as ``wire.RolloutGroup`` (arrays + scalars), the
broker never looks inside, and the learner's GRPO loss only sees ``[G, k]`` log-prob chunks and a mask.

Contract every family keeps (tested per family as "ratio exactly 1"):

- ``Rollout.log_probs`` is ``[G, S]`` float32: the behaviour log-prob of each of the S *trained units*, computed on
  the stored (float32) tensors, not on in-memory values that the store would round. With ``policy.dtype: float64``
  (the reference-precision path, :data:`FLOAT64_PIPELINES` only) the stored tensors and log-probs are float64.
- ``LearnerPolicy.recompute`` yields chunks ``(start, log_prob)`` with ``log_prob`` ``[G, k]`` for units
  ``start .. start + k - 1``, covering 0..S-1 exactly once, in order. With the actor's weights it reproduces
  ``Rollout.log_probs`` bit for bit in float32: same batching (the whole group in one forward, as the actor did),
  same dtype, same inputs (bit for bit in float64 on the float64 path).
- ``traj["unit_mask"]`` (optional, ``[G, S]`` float32 of 0/1) marks units that do not count (e.g. AR padding after
  the end of an image); absent means every unit counts.
- Per-group tensors (prompt embeddings, source latents, schedules) go in ``Rollout.cond`` once, never per sample.
- ``LearnerPolicy.check_group`` tells, without running the model, whether ``recompute`` can use a received group
  (shapes from the loaded model's config, dtypes, schedule, params); it accepts every group ``sample`` produces.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from editrl.common import wire
from editrl.common.wire import FAMILIES, LOG_PROB_DTYPES

if TYPE_CHECKING:  # torch is not imported at run time here: the config check reads PIPELINES in every process,
    import torch  # and the broker and the scorers have no use for torch (1.1 s of start-up each)

__all__ = ["Rollout", "ActorPolicy", "LearnerPolicy", "FAMILIES", "PIPELINES", "load_policy", "detect_pipeline"]


@dataclass
class Rollout:
    """One sampled group, ready for the wire: arrays are float32/int numpy, scalars plain floats."""

    family: str
    traj: dict[str, np.ndarray]  # per-sample arrays, leading axis G (e.g. latents [G, S+1, ...], tokens [G, T])
    log_probs: np.ndarray  # [G, S] float32 behaviour log-probs of the trained units
    cond: dict[str, np.ndarray]  # per-group arrays (conditioning, schedule), stored once
    params: dict[str, Any]  # plain sampler settings the recompute needs (numbers, strings: noise_level, eta, ...)
    images: list[Any] = field(default_factory=list)  # the G decoded edits (PIL images), not stored by the learner

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; allowed: {FAMILIES}")
        if self.log_probs.ndim != 2 or self.log_probs.dtype.name not in LOG_PROB_DTYPES:
            raise ValueError(
                f"log_probs must be [G, S] float32 (float64), got {self.log_probs.shape} {self.log_probs.dtype}"
            )
        g = self.log_probs.shape[0]
        for name, value in self.traj.items():
            if value.shape[:1] != (g,):
                raise ValueError(f"traj[{name!r}] must have leading axis G={g}, got shape {value.shape}")
        mask = self.traj.get("unit_mask")
        if mask is not None and mask.shape != self.log_probs.shape:
            raise ValueError(f"traj['unit_mask'] must be {self.log_probs.shape}, got {mask.shape}")


@runtime_checkable
class ActorPolicy(Protocol):
    """The actor's view of an editor: sample groups, take new trainable weights between groups."""

    family: str

    def sample(self, instruction: str, source: Any, group_size: int, generator: torch.Generator) -> Rollout:
        """G edits of ``source`` following ``instruction``, with everything the learner needs to recompute."""
        ...

    def trainable_module(self) -> torch.nn.Module:
        """The module whose LoRA (or full) weights the learner trains and publishes."""
        ...


@runtime_checkable
class LearnerPolicy(Protocol):
    """The learner's view of an editor: the trained module and the recompute of stored decisions."""

    family: str
    model: torch.nn.Module  # LoRA injected, base frozen; wrapped by FSDP2 in place

    def shard_units(self) -> list[torch.nn.Module]:
        """Submodules to ``fully_shard`` one by one before the root (transformer blocks, decoder layers)."""
        ...

    def recompute(
        self, model: torch.nn.Module, traj: dict[str, np.ndarray], cond: dict[str, np.ndarray], params: dict[str, Any]
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Chunks ``(start, log_prob [G, k])`` over the trained units, with gradients through ``model``."""
        ...

    def check_group(self, group: wire.RolloutGroup) -> str | None:
        """None if :meth:`recompute` can use ``group``, else a short reason naming the field. Static and cheap (the
        model never runs), it never raises; every group this family's ``sample`` produces passes. The learner runs it
        on each received group before any forward or collective (see :mod:`editrl.common.families.check`)."""
        ...


# ----------------------------------------------------------------------------------------------------- registry

# pipeline name -> (family, module, loader function); modules are imported only when that pipeline is used.
PIPELINES: dict[str, tuple[str, str, str]] = {
    "flux_kontext": ("flow", "editrl.common.families.flux_kontext", "load_flux_kontext"),
    "qwen_image_edit": ("flow", "editrl.common.families.qwen_image_edit", "load_qwen_image_edit"),
    "instruct_pix2pix": ("ddim", "editrl.common.families.ddim", "load_instruct_pix2pix"),
    "emu3": ("ar", "editrl.common.families.ar", "load_emu3"),
}
# pipeline name -> (module, function(out_dir, seed=...)) building a tiny random-weight checkpoint locally.
TINY_BUILDERS: dict[str, tuple[str, str]] = {
    "flux_kontext": ("editrl.common.families.tiny.flux_kontext", "build_tiny_flux_kontext"),
    "qwen_image_edit": ("editrl.common.families.tiny.qwen_image_edit", "build_tiny_qwen_image_edit"),
    "instruct_pix2pix": ("editrl.common.families.tiny.instruct_pix2pix", "build_tiny_instruct_pix2pix"),
    "emu3": ("editrl.common.families.tiny.emu3", "build_tiny_emu3"),
}
# pipelines whose sampler and recompute run in float64 end to end with `policy.dtype: float64` (the golden test's path)
FLOAT64_PIPELINES = ("flux_kontext",)
DEFAULT_PIPELINE = {"flow": "flux_kontext", "ddim": "instruct_pix2pix", "ar": "emu3"}
_DIFFUSERS_CLASSES = {
    "FluxKontextPipeline": "flux_kontext",
    "QwenImageEditPipeline": "qwen_image_edit",
    "StableDiffusionInstructPix2PixPipeline": "instruct_pix2pix",
}


def detect_pipeline(model: str | Path) -> str | None:
    """The pipeline name of a local checkpoint (diffusers ``model_index.json`` class, or an Emu3 ``config.json``);
    None when it cannot be told locally (a hub id: set ``policy.pipeline``)."""
    root = Path(model)
    index = root / "model_index.json"
    if index.exists():
        return _DIFFUSERS_CLASSES.get(json.loads(index.read_text()).get("_class_name", ""))
    config = root / "config.json"
    if config.exists() and json.loads(config.read_text()).get("model_type") == "emu3":
        return "emu3"
    return None


def pipeline_of(policy_cfg: Any) -> str:
    """``policy.pipeline`` if set, else what the checkpoint says, else the family's default (a tiny model to build)."""
    if policy_cfg.pipeline:
        return policy_cfg.pipeline
    return detect_pipeline(policy_cfg.model) or DEFAULT_PIPELINE[policy_cfg.family]


def load_policy(policy_cfg: Any, *, with_pipeline: bool) -> Any:
    """The policy object (ActorPolicy and LearnerPolicy) for ``policy_cfg`` (a config.PolicyConfig).

    ``with_pipeline=True`` for actors (encoders, VAE/decoder, sampler); False for the learner (the trained module
    only). Raises ValueError when the checkpoint's pipeline does not belong to ``policy.family``.
    """
    name = pipeline_of(policy_cfg)
    family, module, loader = PIPELINES[name]
    if family != policy_cfg.family:
        raise ValueError(f"policy.family: {policy_cfg.model} is a {name} ({family}) model, not {policy_cfg.family}")
    _check_dtype(policy_cfg, name)
    return getattr(importlib.import_module(module), loader)(policy_cfg, with_pipeline=with_pipeline)


def _check_dtype(policy_cfg: Any, name: str) -> None:
    if policy_cfg.dtype != "float32" and name not in FLOAT64_PIPELINES:
        raise ValueError(f"policy.dtype: {policy_cfg.dtype} is supported by {FLOAT64_PIPELINES} only, not {name}")


def build_tiny(policy_cfg: Any, seed: int = 0) -> bool:
    """Build the tiny checkpoint ``policy.make_tiny`` asks for at ``policy.model`` unless one is there; True if built."""
    if detect_pipeline(policy_cfg.model) is not None:
        return False
    name = pipeline_of(policy_cfg)
    _check_dtype(policy_cfg, name)
    if policy_cfg.tiny_recipe == "trained":
        if name != "flux_kontext" or policy_cfg.dtype != "float32":
            raise ValueError(f"policy.tiny_recipe: 'trained' builds a float32 flux_kontext editor, not {name}")
        from editrl.common.families.tiny.train_editor import train_tiny_editor

        train_tiny_editor(policy_cfg.model, seed=seed)
        return True
    module, function = TINY_BUILDERS[name]
    extra = {"dtype": policy_cfg.dtype} if policy_cfg.dtype != "float32" else {}  # FLOAT64_PIPELINES' builders
    getattr(importlib.import_module(module), function)(policy_cfg.model, seed=seed, **extra)
    return True


def rollout_message(rollout: Rollout, source: Any, **ids: Any) -> Any:
    """The ``wire.RolloutGroup`` carrying ``rollout``: ``ids`` are request_id, group_id, lease_id, task_id, actor_id,
    policy_version, instruction and task_type; the source and the edits travel as PNG."""
    from editrl.common import wire
    from editrl.common.images import to_png

    return wire.RolloutGroup(
        **ids,
        source_png=to_png(source),
        edit_pngs=[to_png(im) for im in rollout.images],
        family=rollout.family,
        traj={k: np.ascontiguousarray(v) for k, v in rollout.traj.items()},
        log_probs=np.ascontiguousarray(rollout.log_probs),
        cond={k: np.ascontiguousarray(v) for k, v in rollout.cond.items()},
        params=dict(rollout.params),
    )


def through_wire(rollout: Rollout, source: Any, policy_version: int = 0) -> Any:
    """What a learner receives for ``rollout``: its RolloutGroup encoded and decoded (the stored float/int64 frames);
    for tests and tools that check recompute exactness."""
    from editrl.common import codec

    msg = rollout_message(
        rollout, source, request_id="r", group_id="g", lease_id="l", task_id="t", actor_id="a",
        policy_version=policy_version, instruction="edit", task_type="edit",
    )  # fmt: skip
    return codec.decode([bytes(f) for f in codec.encode(msg)])
