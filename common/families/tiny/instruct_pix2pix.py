"""Tiny random-weight InstructPix2Pix pipeline assembled from configs (no download).

`build_tiny_instruct_pix2pix(out_dir)` writes a directory that loads with the exact call a real model id uses:
`StableDiffusionInstructPix2PixPipeline.from_pretrained(out_dir)` (works with `HF_HUB_OFFLINE=1`). It is meant for
CPU tests and demos of the ``ddim`` family.

Sizes (64x64 RGB image):
- VAE: 4 blocks -> vae_scale_factor 8, 4 latent channels -> latent [4, 8, 8]; scaling_factor 0.18215 as in SD 1.x,
  so the scaled denoising latents and the unscaled image latents of InstructPix2Pix really differ.
- UNet: 8 input channels (4 noisy + 4 source-image latents), 4 output channels, blocks (16, 32) with one
  cross-attention down/up block, cross-attention width 32.
- CLIP text encoder: hidden 32, 32 positions; BPE tokenizer over single characters plus merges that make each of
  ``TINY_WORDS`` one token (written as vocab.json / merges.txt, then loaded like a downloaded tokenizer).
- Scheduler: saved as EulerAncestralDiscreteScheduler with SD 1.x betas, as the real checkpoint ships it; the
  ``ddim`` family swaps in DDIMScheduler.from_config. No safety checker, no feature extractor.

VAE init note: as in `common/families/tiny/flux_kontext.py`, the random decoder uses 2 norm groups and a rescaled ``conv_out`` so decoded
colours react to latent changes.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

from editrl.common.families.tiny.flux_kontext import TINY_WORDS

__all__ = ["build_tiny_instruct_pix2pix"]

_MARKER = "editrl_tiny.json"
_CLIP_MAX_LEN = 32
_DIM = 32
_SD_SCALING_FACTOR = 0.18215


def _bpe_files() -> tuple[dict[str, int], list[str]]:
    """A CLIP-style vocabulary (chars and chars + '</w>') with merges that build each TINY_WORDS word left to right."""
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + string.punctuation:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for word in TINY_WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        prefix = pieces[0]
        for piece in pieces[1:]:
            merge = f"{prefix} {piece}"
            if merge not in merges:
                merges.append(merge)
            prefix += piece
            vocab.setdefault(prefix, len(vocab))
    return vocab, merges


def _clip_tokenizer():
    """Write vocab.json / merges.txt and load them through CLIPTokenizer.from_pretrained, as a hub download would."""
    from transformers import CLIPTokenizer

    vocab, merges = _bpe_files()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=_CLIP_MAX_LEN)


def _unet(seed: int) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=_DIM,
        attention_head_dim=2,  # diffusers' legacy name: number of heads
    )


def _vae(seed: int) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=64,
        scaling_factor=_SD_SCALING_FACTOR,
    )
    with torch.no_grad():  # colour-responsive random decoder (module docstring)
        vae.decoder.conv_out.weight.mul_(4.0)
        vae.decoder.conv_out.bias.zero_()
    return vae


def _text_encoder(seed: int, vocab_size: int) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=_DIM,
            intermediate_size=2 * _DIM,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=_CLIP_MAX_LEN,
            projection_dim=_DIM,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )


def build_tiny_instruct_pix2pix(out_dir: str | Path, seed: int = 0, force: bool = False) -> Path:
    """Build (or reuse) a tiny random `StableDiffusionInstructPix2PixPipeline` saved as safetensors in `out_dir`.

    Idempotent: if the marker file from a finished build exists and `force` is False, returns without rebuilding
    (the marker is written last, so an interrupted build is redone). Deterministic for a given `seed`.
    Returns `Path(out_dir)`.
    """
    out = Path(out_dir)
    if (out / _MARKER).exists() and not force:
        return out

    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    tokenizer = _clip_tokenizer()
    unet = _unet(seed)
    vae = _vae(seed + 1)
    text_encoder = _text_encoder(seed + 2, len(tokenizer))
    # SD 1.x schedule; the extra keys (clip_sample, set_alpha_to_one, ...) are kept in the saved config and are
    # what DDIMScheduler.from_config reads when the ddim family swaps schedulers.
    scheduler = EulerAncestralDiscreteScheduler.from_config(
        {
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon",
            "steps_offset": 1,
            "timestep_spacing": "leading",
            "clip_sample": False,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
        }
    )
    for m in (unet, vae, text_encoder):
        m.eval()
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / _MARKER).write_text(json.dumps({"kind": "tiny_instruct_pix2pix", "seed": seed}))
    return out
