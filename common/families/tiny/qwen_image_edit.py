"""Tiny random-weight Qwen-Image-Edit pipeline assembled from configs (no download).

`build_tiny_qwen_image_edit(out_dir)` writes a directory laid out like the Hub repository `Qwen/Qwen-Image-Edit`
(`model_index.json`, `transformer/`, `vae/`, `scheduler/`, `text_encoder/`, `tokenizer/`, `processor/`), so it loads
with the call a real id uses: `QwenImageEditPipeline.from_pretrained(out_dir)` (works with `HF_HUB_OFFLINE=1`).

Processor caveat (same as :mod:`editrl.common.families.tiny.qwen2_5_vl`): `Qwen2VLProcessor` cannot be built or saved without
torchvision (its video processor), so `processor/` holds what the real repository's folder holds minus the video
processor: the tokenizer files and `preprocessor_config.json`. Without torchvision, loading the `processor`
component fails in the same way for this directory and for the real id;
:func:`editrl.common.families.qwen_image_edit.load_edit_processor` loads it image-only for both, and the policy passes it to
`from_pretrained(..., processor=...)`.

Sizes (64x64 RGB image):
- VAE (`AutoencoderKLQwenImage`): base 8 channels, 3 spatial downsamples -> vae_scale_factor 8, z_dim 4 ->
  latent [4, 1, 8, 8] -> 16 packed tokens of 16 channels; non-trivial latents_mean / latents_std.
- Transformer (`QwenImageTransformer2DModel`): 2 dual-stream blocks, 2 heads x 16 dims (inner 32), RoPE axes
  (4, 6, 6), joint_attention_dim 64 (the text encoder's hidden size).
- Text encoder, tokenizer and image processor: the tiny Qwen2.5-VL of :func:`editrl.common.families.tiny.qwen2_5_vl.build_tiny_qwen2_5_vl`
  (the VL sees every image as 4 merged vision tokens).
- Scheduler: `FlowMatchEulerDiscreteScheduler` with Qwen-Image's published config (:data:`QWEN_IMAGE_SCHEDULER`).

CPU budget: the diffusers pipeline resizes the condition image to a 1024x1024 *area* (`calculate_dimensions(1024 *
1024, ratio)`, hard-coded in `__call__`) and, without explicit height/width, also generates at that size. On this
tiny model that makes one 4-step 64x64 edit take 7-10 s instead of ~0.1 s (see `editrl.common.families.qwen_image_edit`). The
checkpoint therefore declares :data:`TINY_CONDITION_AREA` (64*64) as `condition_area` in its `editrl_tiny.json`
marker, which `QwenImageEditPolicy.from_pretrained` reads when no explicit `condition_area` is given. Real checkpoints
have no such file, so the policy keeps the pipeline's 1024*1024 for them.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

__all__ = ["build_tiny_qwen_image_edit", "QWEN_IMAGE_SCHEDULER", "TINY_CONDITION_AREA"]

# Qwen/Qwen-Image(-Edit) scheduler/scheduler_config.json (exponential dynamic shift, terminal sigma 0.02).
QWEN_IMAGE_SCHEDULER: dict[str, object] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

TINY_CONDITION_AREA = 64 * 64  # pixels; the tiny model's condition/output area (the real pipeline uses 1024 * 1024)

_Z_DIM = 4
_LATENTS_MEAN = [0.1, -0.2, 0.3, -0.1]
_LATENTS_STD = [1.5, 0.8, 1.2, 1.0]


def _vlm_parts(seed: int) -> tuple[torch.nn.Module, object, object]:
    """(text encoder, tokenizer, image processor) of the tiny Qwen2.5-VL, built in a scratch directory."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from editrl.common.families.tiny.qwen2_5_vl import build_tiny_qwen2_5_vl

    with tempfile.TemporaryDirectory() as tmp:
        vlm = build_tiny_qwen2_5_vl(Path(tmp) / "vlm", seed=seed)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(vlm, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(vlm)
        image_processor = AutoImageProcessor.from_pretrained(vlm)
    return model, tokenizer, image_processor


def build_tiny_qwen_image_edit(out_dir: str | Path, seed: int = 0, force: bool = False) -> Path:
    """Build (or reuse) a tiny random `QwenImageEditPipeline` saved as safetensors in `out_dir`.

    Idempotent: if `out_dir/editrl_tiny.json` exists and `force` is False, returns without rebuilding (the marker is
    written last, so an interrupted build is redone). Deterministic for a given `seed`. Returns `Path(out_dir)`.
    """
    out = Path(out_dir)
    marker = out / "editrl_tiny.json"
    if marker.exists() and not force:
        return out

    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageTransformer2DModel,
    )

    text_encoder, tokenizer, image_processor = _vlm_parts(seed)
    torch.manual_seed(seed + 1)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=_Z_DIM * 4,
        out_channels=_Z_DIM,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_encoder.config.text_config.hidden_size,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=_Z_DIM,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        latents_mean=_LATENTS_MEAN,
        latents_std=_LATENTS_STD,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
    # processor=None: `Qwen2VLProcessor` cannot be instantiated without torchvision; its files are written below.
    pipe = QwenImageEditPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=None,
        transformer=transformer,
    )
    out.mkdir(parents=True, exist_ok=True)
    if marker.exists():
        marker.unlink()
    pipe.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out / "processor")
    image_processor.save_pretrained(out / "processor")
    index = json.loads((out / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    marker.write_text(json.dumps({"kind": "tiny_qwen_image_edit", "seed": seed, "condition_area": TINY_CONDITION_AREA}))
    return out
