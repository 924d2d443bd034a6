"""Qwen-Image-Edit as a ``flow``-family policy: a thin adapter over diffusers' QwenImageEditPipeline.

Everything model-specific is the pipeline's own code path (diffusers ``pipeline_qwenimage_edit.py``); this module
only re-orders it into Flow-GRPO steps:

- Condition: the source image is resized to ``calculate_dimensions(condition_area, aspect)`` (the pipeline
  hard-codes ``condition_area = 1024 * 1024``), fed to the VL text encoder with the instruction through the
  pipeline's ``encode_prompt`` (and the negative prompt, default ``" "``, the same way), and VAE-encoded (mode,
  normalised by latents_mean / latents_std) and packed by ``prepare_latents``. The edit is generated at that size too
  (the pipeline's default when height / width are not given).
- Transformer input: ``cat([x_t, image_latents], dim=1)`` along the token sequence, ``img_shapes`` =
  ``[(1, h, w) of the target, (1, h, w) of the condition]`` in packed-token units, timestep ``t / 1000`` with
  ``t = 1000 sigma``; the prediction is cut to the first L (generated) tokens.
- Guidance: TRUE classifier-free guidance, two transformer forwards per step (conditional, then negative), each on
  the whole group (batch G, as the pipeline runs ``num_images_per_prompt = G``), then the pipeline's per-token norm
  rescale: ``comb = v_neg + g (v_pos - v_neg); v = comb * ||v_pos|| / ||comb||`` (L2 over the channel axis).
  Separate forwards, not one 2G batch: the two prompts have different lengths and the pipeline never pads them, so
  this keeps the numbers identical to the pipeline's. The combination runs in float32.
- Schedule: ``sigmas = linspace(1, 1/N, N)``, ``mu = calculate_shift(L, ...)`` from the scheduler config, then
  ``set_timesteps(sigmas=..., mu=...)`` (Qwen-Image: exponential time shift, terminal sigma 0.02, final 0 appended).
- Sampler (Flow-GRPO, REFERENCE-MATH 1.1/1.6): steps 0..N-2 are SDE steps (:func:`~editrl.common.families.flow.flow_sde_step`)
  and are the trained units; the last, near-noiseless step N-1 is a deterministic Euler (ODE) step, as flow_grpo's
  Qwen pipelines do with their default SDE window (0, N-1). So ``log_probs`` is ``[G, N-1]`` and ``latents`` holds all
  N+1 states ``x_0`` (noise) .. ``x_N`` (decoded).

CPU budget (2-core test machine; tiny checkpoint of :mod:`editrl.common.families.tiny.qwen_image_edit`, 64x64 source, 4 steps,
true CFG): the stock pipeline call takes 7-10 s, and the resize itself (PIL + preprocessing) is milliseconds. The
cost is what the 1024x1024 area implies downstream: VAE encode of the condition ~1.8 s and decode of the 1024x1024
edit ~2.9 s (conv3d + the VAE mid-block attention over 128x128 positions), 8 transformer forwards over 4096 generated
+ 4096 condition tokens ~2.3 s. The VL encoder is not it (0.01 s; 0.24 s even with the real 12.8 MP pixel budget):
its own image processor config bounds the vision tokens. A wider tiny VAE makes it much worse (base_dim 32: ~45 s
for one 1 MP encode + decode), consistent with the ~50 s seen for a naive tiny assembly. With ``condition_area =
64 * 64`` the edit takes ~0.1 s. ``condition_area`` defaults to the pipeline's 1024 * 1024 and is lowered only
explicitly or by a checkpoint declaring it in ``editrl_tiny.json`` (only the tiny one does), so real models run
exactly as the pipeline does.

Shapes: G = group size, N = sampler steps, L = generated packed tokens, L_img = condition packed tokens,
C = packed channels (4 x VAE z_dim), T / T_neg = prompt / negative prompt tokens, D = text width. The pipeline's
computations reproduced here (condition size, schedule, guided velocity) are in
:mod:`editrl.common.families.qwen_image_edit_ops`.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch

from editrl.common import wire
from editrl.common.families.base import Rollout
from editrl.common.families.check import GroupSpec, common_reasons, first_reason, shapes_reasons, units_reason
from editrl.common.families.flow import STEPS, FlowStep, schedule_reason, sde_window
from editrl.common.families.flow_ode import ODE, mode_reasons, ode_reasons, ode_rollout, ode_sample
from editrl.common.families.qwen_image_edit_ops import (
    PIPELINE_CONDITION_AREA,
    QwenEditCondition,
    condition_size,
    qwen_edit_schedule,
    qwen_guided_velocity,
)
from editrl.common.hf_processors import load_image_text_processor
from editrl.common.lora import LoraSpec, add_lora

__all__ = ["QWEN_LORA_TARGETS", "QwenImageEditPolicy", "load_edit_processor", "load_qwen_image_edit"]


# Attention projections (image and text streams) and both MLPs of every QwenImageTransformerBlock. The model drops the
# last block's text-stream output, so that block's add_q_proj / to_add_out / txt_mlp adapters never get a gradient
# (they stay at B = 0: harmless, suffix matching cannot exclude one block).
QWEN_LORA_TARGETS: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)

_TINY_MARKER = (
    "editrl_tiny.json"  # written by editrl.common.families.tiny.qwen_image_edit; never present in a real checkpoint
)


def load_edit_processor(path: str | Path, subfolder: str = "processor") -> Any:
    """The pipeline's ``processor`` component (a ``Qwen2VLProcessor``), image-only where torchvision is missing."""
    from transformers import Qwen2VLProcessor

    return load_image_text_processor(path, subfolder=subfolder, processor_class=Qwen2VLProcessor)


def _checkpoint_condition_area(path: str | Path) -> int:
    """The area a local checkpoint declares in ``editrl_tiny.json`` (tiny models only), else the pipeline's."""
    marker = Path(path) / _TINY_MARKER
    if marker.is_file():
        declared = json.loads(marker.read_text()).get("condition_area")
        if declared is not None:
            return int(declared)
    return PIPELINE_CONDITION_AREA


class QwenImageEditPolicy:
    """Qwen-Image-Edit with the Flow-GRPO SDE sampler and true CFG, as a stochastic policy over latent trajectories.

    Implements both ActorPolicy and LearnerPolicy (common/families/base.py). The actor loads the whole pipeline and uses its
    encoders, VAE and transformer; the learner loads only the transformer and the scheduler config
    (``with_pipeline=False``). ``recompute`` reads the sampler settings from the rollout's params and cond, never from
    this object, so the actor's settings always win.
    """

    family = "flow"
    progress = 0  # the policy version the actor samples with (set by the actor): moves a sliding SDE window

    def __init__(
        self,
        transformer: torch.nn.Module,
        scheduler_config: dict[str, Any],
        pipeline: Any | None = None,
        *,
        num_steps: int = 10,
        noise_level: float = 0.7,
        true_cfg_scale: float = 4.0,
        negative_prompt: str = " ",
        condition_area: int = PIPELINE_CONDITION_AREA,
        sde_type: str = "sde",
        sde_window_size: int = 0,
        sde_window_range: tuple[int, int] | None = None,
        sde_window_schedule: str = "random",
        sde_window_shift_every: int = 1,
    ) -> None:
        if sde_type not in (*STEPS, ODE) or (sde_type == ODE and sde_window_size):
            raise ValueError(f"sde_type must be one of {sorted(STEPS)} or {ODE!r} (no window), got {sde_type!r}")
        if num_steps < 2:
            raise ValueError(f"num_steps must be >= 2 (the last step is never trained on), got {num_steps}")
        if noise_level <= 0:
            raise ValueError(f"noise_level must be > 0 (the SDE needs noise for a log-prob), got {noise_level}")
        if true_cfg_scale < 0:
            raise ValueError(f"true_cfg_scale must be >= 0 (<= 1 disables true CFG), got {true_cfg_scale}")
        if condition_area < 32 * 32:
            raise ValueError(
                f"condition_area must be >= 1024 px (default {PIPELINE_CONDITION_AREA}), got {condition_area}"
            )
        if getattr(transformer.config, "guidance_embeds", False):
            raise ValueError("guidance-distilled Qwen-Image transformers (guidance_embeds=True) are not supported")
        self.model = transformer
        self.scheduler_config = dict(scheduler_config)
        self.pipeline = pipeline
        self.num_steps = int(num_steps)
        self.noise_level = float(noise_level)
        self.true_cfg_scale = float(true_cfg_scale)
        self.negative_prompt = negative_prompt
        self.condition_area = int(condition_area)
        self.sde_type, self.sde_window_size, self.sde_window_range = sde_type, int(sde_window_size), sde_window_range
        self.sde_window_schedule, self.sde_window_shift_every = sde_window_schedule, int(sde_window_shift_every)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        with_pipeline: bool = True,
        lora: LoraSpec | None = None,
        num_steps: int = 10,
        noise_level: float = 0.7,
        true_cfg_scale: float = 4.0,
        torch_dtype: torch.dtype = torch.float32,
        negative_prompt: str = " ",
        condition_area: int | None = None,
        sde_type: str = "sde",
        sde_window_size: int = 0,
        sde_window_range: tuple[int, int] | None = None,
        sde_window_schedule: str = "random",
        sde_window_shift_every: int = 1,
    ) -> QwenImageEditPolicy:
        """Load from a diffusers directory or model id; LoRA, if given, is injected into the transformer with B = 0.

        Pass ``LoraSpec(target_modules=list(QWEN_LORA_TARGETS))`` (LoraSpec's default targets are FLUX's).
        ``condition_area`` (pixels): None = what a local checkpoint declares in ``editrl_tiny.json`` (only the tiny
        test checkpoint does), else the pipeline's ``PIPELINE_CONDITION_AREA``.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageTransformer2DModel

        sched_cfg = dict(FlowMatchEulerDiscreteScheduler.load_config(str(path), subfolder="scheduler"))
        pipe = None
        if with_pipeline:
            processor = load_edit_processor(path)
            pipe = QwenImageEditPipeline.from_pretrained(str(path), processor=processor, dtype=torch_dtype)
            pipe.set_progress_bar_config(disable=True)
            transformer = pipe.transformer
        else:
            transformer = QwenImageTransformer2DModel.from_pretrained(
                str(path), subfolder="transformer", dtype=torch_dtype
            )
        transformer.eval()
        if lora is not None:
            add_lora(transformer, lora)
        return cls(
            transformer,
            sched_cfg,
            pipe,
            num_steps=num_steps,
            noise_level=noise_level,
            true_cfg_scale=true_cfg_scale,
            negative_prompt=negative_prompt,
            condition_area=_checkpoint_condition_area(path) if condition_area is None else condition_area,
            sde_type=sde_type,
            sde_window_size=sde_window_size,
            sde_window_range=sde_window_range,
            sde_window_schedule=sde_window_schedule,
            sde_window_shift_every=sde_window_shift_every,
        )

    # ------------------------------------------------------------------------------------------- both sides

    def trainable_module(self) -> torch.nn.Module:
        """The LoRA transformer."""
        return self.model

    def shard_units(self) -> list[torch.nn.Module]:
        """The dual-stream transformer blocks, to ``fully_shard`` one by one before the root."""
        return list(self.model.transformer_blocks)

    @property
    def device(self) -> torch.device:
        """Device of the transformer parameters."""
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------------------- actor

    def _pipe(self) -> Any:
        if self.pipeline is None:
            raise RuntimeError("this policy was loaded with with_pipeline=False")
        return self.pipeline

    @torch.no_grad()
    def encode_condition(self, instruction: str, source: Any) -> tuple[QwenEditCondition, int, int]:
        """``(condition, height, width)`` for a PIL source: the pipeline's preprocessing and encoders, see module doc."""
        pipe = self._pipe()
        device = self.device
        cond_w, cond_h, width, height = condition_size(source.size, self.condition_area, pipe.vae_scale_factor * 2)
        image = pipe.image_processor.resize(source, cond_h, cond_w)  # also the VL encoder's prompt image
        pixels = pipe.image_processor.preprocess(image, cond_h, cond_w).unsqueeze(2)  # [1, 3, 1, H, W] in [-1, 1]

        def encode(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
            embeds, mask = pipe.encode_prompt(prompt=prompt, image=image, device=device)  # [1, T, D], [1, T] | None
            mask = torch.ones(embeds.shape[:2], device=device) if mask is None else mask
            return embeds[0].to(torch.float32), mask[0].to(torch.float32)

        prompt_embeds, prompt_mask = encode(instruction)
        negative_embeds = negative_mask = None
        if self.true_cfg_scale > 1:
            negative_embeds, negative_mask = encode(self.negative_prompt)
        c = self.model.config.in_channels
        m, f = pipe.vae_scale_factor * 2, pipe.vae_scale_factor
        dummy = torch.zeros(1, (height // m) * (width // m), c, device=device)  # latents given: no RNG is consumed
        _, image_latents = pipe.prepare_latents(
            pixels, 1, c // 4, height, width, pipe.text_encoder.dtype, device, None, dummy
        )
        img_shapes = torch.tensor([[1, height // f // 2, width // f // 2], [1, cond_h // f // 2, cond_w // f // 2]])
        cond = QwenEditCondition(
            prompt_embeds=prompt_embeds,
            prompt_mask=prompt_mask,
            negative_prompt_embeds=negative_embeds,
            negative_prompt_mask=negative_mask,
            image_latents=image_latents[0].to(torch.float32),
            img_shapes=img_shapes,
        )
        return cond, height, width

    def initial_noise(
        self, cond: QwenEditCondition, group_size: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """x_0 [G, L, C] float32 drawn like the pipeline's prepare_latents (randn [G, 1, C/4, 2h, 2w], then packed)."""
        from diffusers import QwenImageEditPipeline

        c = self.model.config.in_channels
        _, h, w = (int(n) for n in cond.img_shapes[0])
        noise = torch.randn((group_size, 1, c // 4, 2 * h, 2 * w), generator=generator, dtype=torch.float32)
        return QwenImageEditPipeline._pack_latents(noise, group_size, c // 4, 2 * h, 2 * w).to(self.device)

    @torch.no_grad()
    def sample(self, instruction: str, source: Any, group_size: int, generator: torch.Generator) -> Rollout:
        """G trajectories of one (instruction, source) pair and the decoded edits.

        Stochastic ``sde_type`` steps inside the window (default ``(0, N - 1)``: every step but the near-noiseless
        last one, flow_grpo's Qwen default), deterministic ODE steps outside it; only the window's latents are stored.
        """
        cond, height, width = self.encode_condition(instruction, source)
        sigmas, timesteps = qwen_edit_schedule(self.num_steps, cond.seq_len, self.scheduler_config)
        if self.sde_type == ODE:  # the nft objective's groups (editrl.common.families.flow_ode)
            x, scale = self.initial_noise(cond, group_size, generator), self.true_cfg_scale  # [G, L, C]
            final = ode_sample(lambda x, i: qwen_guided_velocity(self.model, x, timesteps[i], cond, scale), x, sigmas)
            final = final.cpu()
            traj, log_probs = ode_rollout(final)
            params = {"true_cfg_scale": self.true_cfg_scale, "sde_type": ODE, "height": height, "width": width}
            arrays = {**cond.to_arrays(), "sigmas": sigmas.numpy(), "timesteps": timesteps.numpy()}
            images = self.decode(final, height, width)
            return Rollout(self.family, traj=traj, log_probs=log_probs, cond=arrays, params=params, images=images)
        start, end = 0, self.num_steps - 1
        if self.sde_window_size:  # draws from the generator only then: the plain sampler's noise is the pipeline's
            rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            start, end = sde_window(self.num_steps, self.sde_window_size, self.sde_window_range, rng,
                                    self.sde_window_schedule, self.progress, self.sde_window_shift_every)  # fmt: skip
        step = STEPS[self.sde_type]
        x = self.initial_noise(cond, group_size, generator)  # [G, L, C]
        xs, lps = [], []
        for i in range(self.num_steps):
            v = qwen_guided_velocity(self.model, x, timesteps[i], cond, self.true_cfg_scale)
            if start <= i < end:
                if i == start:
                    xs.append(x)
                x, lp, _, _ = step(x, v, sigmas[i], sigmas[i + 1], self.noise_level, generator=generator)
                xs.append(x)
                lps.append(lp)
            else:  # ODE outside the window (always for the last step)
                x = x + v * (sigmas[i + 1] - sigmas[i])
        latents = torch.stack(xs, dim=1).cpu()  # [G, K+1, L, C]
        return Rollout(
            family=self.family,
            traj={"latents": latents.numpy()},
            log_probs=torch.stack(lps, dim=1).cpu().numpy(),  # [G, K]
            cond={**cond.to_arrays(), "sigmas": sigmas.numpy(), "timesteps": timesteps.numpy()},
            params={
                "noise_level": self.noise_level,
                "true_cfg_scale": self.true_cfg_scale,
                "sde_type": self.sde_type,
                "start": start,
                "steps": end - start,
                "height": height,
                "width": width,
            },
            images=self.decode(x.cpu(), height, width),
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> list[Any]:
        """Packed latents [B, L, C] -> list of PIL images, as the pipeline decodes (un-normalise, VAE, postprocess)."""
        pipe = self._pipe()
        vae = pipe.vae
        z = pipe._unpack_latents(latents.to(device=self.device, dtype=vae.dtype), height, width, pipe.vae_scale_factor)
        mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(z.device, z.dtype)
        image = vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]  # [B, 3, H, W] in ~[-1, 1]
        return pipe.image_processor.postprocess(image, output_type="pil")

    # ------------------------------------------------------------------------------------------- learner

    def recompute(
        self, model: torch.nn.Module, traj: dict[str, np.ndarray], cond: dict[str, np.ndarray], params: dict[str, Any]
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Chunks ``(u, log_prob [G, 1])`` for the stored stochastic steps (step ``start + u``), with gradients
        through ``model``.

        Same batching (G per branch, two branches per step), dtype and inputs as `sample`, so with the actor's weights
        the result equals the stored log-probs bit for bit.
        """
        for step in self.recompute_steps(model, traj, cond, params):
            yield step.start, step.log_prob

    def recompute_steps(
        self, model: torch.nn.Module, traj: dict[str, np.ndarray], cond: dict[str, np.ndarray], params: dict[str, Any]
    ) -> Iterator[FlowStep]:
        """:meth:`recompute` with each step's transition (mean [G, L, C], std, dt): one code path for both."""
        device = next(model.parameters()).device
        latents = torch.from_numpy(np.array(traj["latents"], dtype=np.float32)).to(device)  # [G, K+1, L, C]
        condition = QwenEditCondition.from_arrays(cond, device)
        sigmas = torch.from_numpy(np.array(cond["sigmas"], dtype=np.float32))  # [N+1]
        timesteps = torch.from_numpy(np.array(cond["timesteps"], dtype=np.float32))  # [N]
        n, start, k = timesteps.shape[0], int(params["start"]), int(params["steps"])
        if sigmas.shape[0] != n + 1 or latents.shape[1] != k + 1 or not 0 <= start < start + k <= n:
            raise ValueError(
                f"{latents.shape[1]} latents for {k} steps from step {start}, {sigmas.shape[0]} sigmas for {n} steps"
            )
        noise_level, true_cfg_scale = float(params["noise_level"]), float(params["true_cfg_scale"])
        step = STEPS[params["sde_type"]]
        for u in range(latents.shape[1] - 1):
            j = start + u
            v = qwen_guided_velocity(model, latents[:, u], timesteps[j], condition, true_cfg_scale)
            _, lp, mean, std = step(
                latents[:, u], v, sigmas[j], sigmas[j + 1], noise_level, prev_sample=latents[:, u + 1]
            )
            yield FlowStep(u, lp.unsqueeze(1), mean, std, float(sigmas[j + 1]) - float(sigmas[j]))

    def velocity(
        self, model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, np.ndarray],
        params: dict[str, Any],
    ) -> torch.Tensor:  # fmt: skip
        """The guided velocity [B, L, C] of ``model`` at latents ``x`` [B, L, C] and noise levels ``sigma`` [B]
        (timestep 1000 sigma) with a stored group's condition and true-CFG scale (the ``nft`` objective's hook)."""
        condition = QwenEditCondition.from_arrays(cond, x.device)
        t = 1000 * torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        return qwen_guided_velocity(model, x, t, condition, float(params["true_cfg_scale"]))

    def check_group(self, group: wire.RolloutGroup) -> str | None:
        """None if :meth:`recompute` can use ``group``, else a short reason naming the field. Static: shapes from the
        transformer's config and the stored ``img_shapes`` (the target and condition token counts), the schedule,
        the negative prompt true CFG needs; the model never runs (see :mod:`editrl.common.families.check`). With the
        ODE sampler (``nft``) only ODE groups pass, and only SDE/CPS groups without it."""
        ode = self.sde_type == ODE
        reasons = (mode_reasons(group, ode), common_reasons(group, _ODE_SPEC if ode else _GROUP_SPEC))
        return first_reason(chain(*reasons, self._group_reasons(group, ode)))

    def _group_reasons(self, group: wire.RolloutGroup, ode: bool) -> Iterator[str]:
        cfg, traj, cond, params = self.model.config, group.traj, group.cond, group.params
        if group.log_probs.dtype != np.float32:
            yield f"log_probs dtype {group.log_probs.dtype.name} is not float32"
        yield from shapes_reasons("cond", cond, {"img_shapes": [("target, condition", 2), ("(1, h, w)", 3)]})
        shapes = cond["img_shapes"]
        if not (np.all(shapes[:, 0] == 1) and np.all(shapes >= 1)):
            yield f"cond['img_shapes'] {shapes.tolist()} are not rows (1, h, w) with h, w >= 1"
        seq, seq_img = int(shapes[0, 1] * shapes[0, 2]), int(shapes[1, 1] * shapes[1, 2])
        c, d = cfg.in_channels, cfg.joint_attention_dim
        yield from shapes_reasons("cond", cond, {"prompt_embeds": [("T", None), ("D", d)]})
        yield from shapes_reasons("cond", cond, {"prompt_mask": [("T", cond["prompt_embeds"].shape[0])]})
        if float(params["true_cfg_scale"]) > 1:
            for name in ("negative_prompt_embeds", "negative_prompt_mask"):
                if name not in cond:
                    yield f"cond[{name!r}] is missing (true_cfg_scale {params['true_cfg_scale']} > 1 needs it)"
            yield from shapes_reasons("cond", cond, {"negative_prompt_embeds": [("T_neg", None), ("D", d)]})
            t_neg = cond["negative_prompt_embeds"].shape[0]
            yield from shapes_reasons("cond", cond, {"negative_prompt_mask": [("T_neg", t_neg)]})
        yield from shapes_reasons("cond", cond, {"image_latents": [("L_img", seq_img), ("C", c)]})
        yield from shapes_reasons("cond", cond, {"timesteps": [("N", None)]})
        yield from shapes_reasons("cond", cond, {"sigmas": [("N+1", cond["timesteps"].shape[0] + 1)]})
        if ode:
            yield from ode_reasons(group, "float32", seq, c)
            return
        g, k = group.log_probs.shape[0], int(params["steps"])
        yield from shapes_reasons("traj", traj, {"latents": [("G", g), ("steps+1", k + 1), ("L", seq), ("C", c)]})
        reason = units_reason(group.log_probs, k, f"params['steps'] = {k}")
        if reason:
            yield reason
        reason = schedule_reason(cond["sigmas"], int(params["start"]), k, params["sde_type"], params["noise_level"])
        if reason:
            yield reason


_F32 = ("float32",)
# What QwenImageEditPolicy.recompute reads, in the dtypes sample stores (the shapes are checked by check_group itself).
_GROUP_SPEC = GroupSpec(
    family="flow",
    traj={"latents": _F32},
    cond={
        "prompt_embeds": _F32, "prompt_mask": _F32, "image_latents": _F32, "img_shapes": ("int64",),
        "sigmas": _F32, "timesteps": _F32,
    },
    params={"noise_level": "number", "true_cfg_scale": "number", "sde_type": "string", "start": "integer",
            "steps": "integer"},
    optional_cond={"negative_prompt_embeds": _F32, "negative_prompt_mask": _F32},
)  # fmt: skip
# An ODE group (sde_type "ode", the nft objective): the final latents, no noise level or window.
_ODE_SPEC = dataclasses.replace(
    _GROUP_SPEC, traj={"x0": _F32}, params={"true_cfg_scale": "number", "sde_type": "string"}
)


def load_qwen_image_edit(policy_cfg: Any, *, with_pipeline: bool) -> QwenImageEditPolicy:
    """The Qwen-Image-Edit policy for a ``config.PolicyConfig`` (see :func:`editrl.common.families.base.load_policy`).

    ``policy.sampler.guidance`` is the true-CFG scale.
    """
    s = policy_cfg.sampler
    lora = LoraSpec(rank=policy_cfg.lora.rank, alpha=policy_cfg.lora.alpha, target_modules=list(QWEN_LORA_TARGETS))
    return QwenImageEditPolicy.from_pretrained(
        policy_cfg.model,
        with_pipeline=with_pipeline,
        lora=lora,
        num_steps=s.num_steps,
        noise_level=s.noise_level,
        true_cfg_scale=s.guidance,
        sde_type=s.sde_type,
        sde_window_size=s.sde_window,
        sde_window_range=tuple(s.sde_window_range) if s.sde_window_range else None,
        sde_window_schedule=s.sde_window_schedule,
        sde_window_shift_every=s.sde_window_shift_every,
    )
