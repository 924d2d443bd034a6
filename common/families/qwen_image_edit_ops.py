"""Qwen-Image-Edit's own computations, reproduced exactly so the sampler and the recompute match the pipeline: the
condition size (``calculate_dimensions`` of a condition area), the sigma/timestep schedule, the per-group condition
and the true-CFG guided velocity with its per-token norm rescale. The policy is :mod:`editrl.common.families.qwen_image_edit`.

Shapes: B = batch, G = group size, L = packed target tokens, L_img = packed condition-image tokens,
C = packed channels (4 x VAE z_dim), T / T_neg = prompt / negative prompt tokens, D = text width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from editrl.common.lora import param_dtype

__all__ = [
    "PIPELINE_CONDITION_AREA",
    "QwenEditCondition",
    "condition_size",
    "qwen_edit_schedule",
    "qwen_guided_velocity",
]

PIPELINE_CONDITION_AREA = 1024 * 1024  # pixels; QwenImageEditPipeline.__call__'s calculate_dimensions(1024 * 1024, ...)


def condition_size(source_size: tuple[int, int], area: int, multiple_of: int) -> tuple[int, int, int, int]:
    """``(cond_width, cond_height, width, height)`` in pixels exactly as the pipeline derives them.

    cond = ``calculate_dimensions(area, w / h)`` (sides rounded to multiples of 32), the size the source is resized to;
    (width, height) = cond rounded down to ``multiple_of`` (2 x vae_scale_factor), the size of the edit.
    """
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    w0, h0 = source_size
    cond_w, cond_h, _ = calculate_dimensions(area, w0 / h0)
    width, height = cond_w // multiple_of * multiple_of, cond_h // multiple_of * multiple_of
    if width < multiple_of or height < multiple_of:
        raise ValueError(f"condition area {area} px gives a {cond_w}x{cond_h} image for a {w0}x{h0} source")
    return int(cond_w), int(cond_h), int(width), int(height)


def qwen_edit_schedule(
    num_steps: int, image_seq_len: int, scheduler_config: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigmas [N+1], timesteps [N])`` float32 exactly as QwenImageEditPipeline builds them (final 0 included)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))
    cfg = scheduler.config
    mu = calculate_shift(
        image_seq_len,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.15),
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    sigmas = scheduler.sigmas.to(torch.float32).cpu()
    timesteps = scheduler.timesteps.to(torch.float32).cpu()
    if sigmas.shape[0] != num_steps + 1 or timesteps.shape[0] != num_steps:
        raise RuntimeError(
            f"unexpected schedule lengths {sigmas.shape[0]} / {timesteps.shape[0]} for {num_steps} steps"
        )
    return sigmas, timesteps


@dataclass
class QwenEditCondition:
    """One (instruction, source image) pair as the transformer sees it; stored once per group (float32 tensors).

    prompt_embeds [T, D] and prompt_mask [T] (1 = token; the pipeline passes no mask when all ones), the same for
    the negative prompt (None without true CFG), image_latents [L_img, C] (packed, normalised), img_shapes [2, 3]
    int64 rows (1, h, w) of the target and of the condition in packed tokens.
    """

    prompt_embeds: torch.Tensor
    prompt_mask: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    negative_prompt_mask: torch.Tensor | None
    image_latents: torch.Tensor
    img_shapes: torch.Tensor

    _FLOATS = ("prompt_embeds", "prompt_mask", "negative_prompt_embeds", "negative_prompt_mask", "image_latents")

    @property
    def seq_len(self) -> int:
        """L, the number of generated tokens."""
        return int(self.img_shapes[0, 1] * self.img_shapes[0, 2])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """float32 numpy copies (img_shapes int64); absent negative fields are left out."""
        out = {k: getattr(self, k) for k in self._FLOATS if getattr(self, k) is not None}
        out = {k: v.detach().to(torch.float32).cpu().numpy() for k, v in out.items()}
        return {**out, "img_shapes": self.img_shapes.to(torch.int64).cpu().numpy()}

    @classmethod
    def from_arrays(cls, d: dict[str, np.ndarray], device: torch.device | str = "cpu") -> QwenEditCondition:
        """Inverse of to_arrays (writable copies: arrays decoded from the wire are read-only views)."""
        kw: dict[str, Any] = {
            k: torch.from_numpy(np.array(d[k], dtype=np.float32)).to(device) if k in d else None for k in cls._FLOATS
        }
        return cls(**kw, img_shapes=torch.from_numpy(np.array(d["img_shapes"], dtype=np.int64)))


def _branch(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    timestep: torch.Tensor,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    cond: QwenEditCondition,
) -> torch.Tensor:
    """One transformer forward of the whole batch for one prompt; float32 prediction [B, L, C] on generated tokens."""
    b, dtype = hidden.shape[0], hidden.dtype
    text = embeds.to(dtype=dtype).unsqueeze(0).expand(b, -1, -1)  # [B, T, D]
    text_mask = None if bool(mask.all()) else mask.to(torch.long).unsqueeze(0).expand(b, -1)  # as encode_prompt
    shapes = [tuple(int(n) for n in row) for row in cond.img_shapes.tolist()]
    out = model(
        hidden_states=hidden,
        timestep=timestep,
        guidance=None,
        encoder_hidden_states_mask=text_mask,
        encoder_hidden_states=text,
        img_shapes=[shapes] * b,
        return_dict=False,
    )[0]
    return out[:, : cond.seq_len].to(torch.float32)


def qwen_guided_velocity(
    model: torch.nn.Module,
    latents: torch.Tensor,
    t: float | torch.Tensor,
    cond: QwenEditCondition,
    true_cfg_scale: float,
) -> torch.Tensor:
    """Guided velocity v [B, L, C] float32 for latents [B, L, C] at scheduler timestep t (= 1000 sigma; [] or [B]).

    The pipeline's denoising step: hidden = cat([latents, image_latents]) on tokens, timestep t / 1000, one forward per
    branch, and with ``true_cfg_scale > 1`` (needs negative embeddings) ``comb = v_neg + g (v_pos - v_neg)`` rescaled
    per token to the conditional prediction's norm. Gradients flow through both branches.
    """
    b, dtype = latents.shape[0], param_dtype(model)
    img = cond.image_latents.to(dtype=dtype).unsqueeze(0).expand(b, -1, -1)  # [B, L_img, C]
    hidden = torch.cat([latents.to(dtype), img], dim=1)  # [B, L + L_img, C]
    timestep = torch.as_tensor(t, dtype=torch.float32, device=latents.device).reshape(-1).expand(b) / 1000
    v_pos = _branch(model, hidden, timestep, cond.prompt_embeds, cond.prompt_mask, cond)
    if true_cfg_scale <= 1:
        return v_pos
    if cond.negative_prompt_embeds is None or cond.negative_prompt_mask is None:
        raise ValueError(f"true_cfg_scale {true_cfg_scale} > 1 needs negative prompt embeddings in the condition")
    v_neg = _branch(model, hidden, timestep, cond.negative_prompt_embeds, cond.negative_prompt_mask, cond)
    comb = v_neg + true_cfg_scale * (v_pos - v_neg)
    cond_norm = torch.norm(v_pos, dim=-1, keepdim=True)
    comb_norm = torch.norm(comb, dim=-1, keepdim=True)
    return comb * (cond_norm / comb_norm)
