"""Tiny random-weight FLUX.1-Kontext pipeline assembled from configs (no download).

`build_tiny_flux_kontext(out_dir)` writes a directory that loads with the exact call a real model id uses:
`FluxKontextPipeline.from_pretrained(out_dir)` (works with `HF_HUB_OFFLINE=1`). It is meant for CPU tests and demos.

Sizes (64x64 RGB image):
- VAE: 4 blocks -> vae_scale_factor 8, 4 latent channels -> latent [4, 8, 8] -> 16 packed tokens of 16 channels.
- Transformer: 1 double + 1 single block, 2 heads x 16 dims (inner 32), guidance embedding on.
- CLIP text (hidden 32, 32 positions, char-level BPE without merges) and T5 encoder (d_model 32, word/char
  unigram vocab).

VAE init note: a random decoder ends in GroupNorm -> SiLU -> conv_out; with the default init and many small
norm groups it gives a nearly constant image whose mean colour barely reacts to latent changes (a +1 offset on one
latent channel moved the mean RGB by < 0.02 on the [-1, 1] scale). We use 2 norm groups (4 channels each, so
per-channel offsets survive the normalisation) and rescale `decoder.conv_in` (weights x4) and `decoder.conv_out`
(weights x4, bias 0): a +1 offset on one latent channel then moves a mean RGB channel by 0.1-0.3 on [-1, 1]
(the RL demo learns colour changes by steering latents). The encoder is left at its default init.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch

__all__ = ["build_tiny_flux_kontext", "TINY_WORDS"]

TINY_WORDS: tuple[str, ...] = tuple(
    "make the a an image photo picture red blue green yellow white black gray orange purple pink brown dark darker "
    "bright brighter light lighter add remove change turn into color colour sky cat dog car tree house person to of "
    "and in on with more less it is".split()
)

_CLIP_MAX_LEN = 32
_DIM = 32


def _clip_tokenizer():
    """Char-level CLIP BPE tokenizer (no merges) from an in-memory vocabulary."""
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=_CLIP_MAX_LEN)


def _t5_tokenizer():
    """Unigram T5 tokenizer: whole words from TINY_WORDS plus single characters as a fallback."""
    from transformers import T5TokenizerFast

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in TINY_WORDS]
    pieces += [("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def _scale_decoder(vae: torch.nn.Module) -> None:
    """Make the random decoder colour-responsive (see module docstring)."""
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(4.0)
        vae.decoder.conv_out.weight.mul_(4.0)
        vae.decoder.conv_out.bias.zero_()


def build_tiny_flux_kontext(out_dir: str | Path, seed: int = 0, force: bool = False, dtype: str = "float32") -> Path:
    """Build (or reuse) a tiny random `FluxKontextPipeline` saved as safetensors in `out_dir`.

    Idempotent: if `out_dir/model_index.json` exists and `force` is False, returns without rebuilding.
    Deterministic for a given `seed`. Returns `Path(out_dir)`.

    ``dtype="float64"`` initialises and saves every weight in float64 (for ``policy.dtype: float64``). That checkpoint
    is the same on every CPU: float32 ``normal_`` takes CPU-specific vector paths (with the same seed, ~40 % of
    ``torch.randn(10**5)`` values differ in the last bit between torch's DEFAULT and AVX2 kernels), float64 does not.
    """
    out = Path(out_dir)
    if (out / "model_index.json").exists() and not force:
        return out
    from editrl.common.lora import default_dtype

    with default_dtype(getattr(torch, dtype)):
        _build(out, seed)
    (out / "editrl_tiny.json").write_text(json.dumps({"kind": "tiny_flux_kontext", "seed": seed, "dtype": dtype}))
    return out


def _build(out: Path, seed: int) -> None:
    from diffusers import AutoencoderKL, FluxKontextPipeline, FluxTransformer2DModel

    latent_channels = 4
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=latent_channels * 4,
        out_channels=None,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_DIM,
        pooled_projection_dim=_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=2,
        sample_size=64,
        scaling_factor=1.0,
        shift_factor=0.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    _scale_decoder(vae)
    scheduler = tiny_scheduler()
    tokenizer, tokenizer_2, text_encoder, text_encoder_2 = tiny_text_parts(seed)
    for m in (transformer, vae, text_encoder, text_encoder_2):
        m.eval()
    pipe = FluxKontextPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)


def tiny_scheduler() -> Any:
    """The flow-matching scheduler of the tiny pipelines (FLUX's dynamic shifting)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def tiny_text_parts(seed: int) -> tuple[Any, Any, Any, Any]:
    """(CLIP tokenizer, T5 tokenizer, CLIP text encoder, T5 encoder), random weights seeded from ``seed``."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
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
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=_DIM,
            d_kv=16,
            d_ff=2 * _DIM,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    return tokenizer, tokenizer_2, text_encoder.eval(), text_encoder_2.eval()
