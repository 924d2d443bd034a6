"""Tiny random-weight Emu3 editor (text decoder + VQ-VAE) assembled from configs (no download).

`build_tiny_emu3(out_dir)` writes a directory that loads with the exact calls a real Emu3 model id uses:

- `config.json`, `generation_config.json`, `model.safetensors` -> `Emu3ForConditionalGeneration.from_pretrained`
- `tokenizer.json`, `tokenizer_config.json`, `processor_config.json` -> `AutoProcessor.from_pretrained` (an
  `Emu3Processor` = `GPT2Tokenizer` + `Emu3ImageProcessor`) and `AutoTokenizer.from_pretrained`
- `editrl_tiny.json` (marker with the build parameters, used for idempotence; written last)

transformers' own Emu3 classes are used throughout. `Emu3ImageProcessor` is numpy/PIL-only, so unlike the
Qwen2-VL processor it needs no torchvision and no substitute: `Emu3Processor.save_pretrained` and
`AutoProcessor.from_pretrained` round-trip as for a real checkpoint.

Layout (same token strings as the real Emu3 tokenizer; ids differ):
- Text: byte-level BPE over the 256 byte symbols, no merges (any text encodes, one token per byte; instructions
  are short, so prompts stay small).
- Special tokens: `<|endoftext|>` (pad), `<|extra_203|>` (bos), `<|extra_204|>` (eos), `<image>` (placeholder the
  processor expands), `<|image start|>` / `<|image end|>` (boi / eoi), `<|image token|>` (wrapper after the
  `h*w` size text), `<|extra_200|>` (end of a token row, EOL), `<|extra_201|>` (end of the image tokens, EOF).
- Visual tokens `<|visual token 000000|>` ... one per VQ code (`CODEBOOK_SIZE` = 64), 6-digit names as Emu3's
  `Emu3ImageVocabularyMapping` expects. The whole vocabulary is ~330 tokens (a big vocabulary dominates the cost
  of a tiny AR model, see CPU-NOTES).

Sizes:
- VQ-VAE: 4 levels (spatial factor 8), 32 base channels (GroupNorm needs multiples of 32), one res block per level,
  no attention, temporal factor 4 as in the real model: a 64x64 image <-> 8x8 codes.
- Image processor: `min_pixels = max_pixels = 64*64`, so a square source becomes 64x64 -> 8 rows of 8 codes ->
  8*(8+1) = 72 image tokens (one EOL per row).
- Language model: 2 layers, hidden 64, 4 heads, 2 KV heads, no attention dropout, 512 positions.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["build_tiny_emu3", "CODEBOOK_SIZE", "IMAGE_SIDE", "EMU3_SPECIAL_TOKENS"]

CODEBOOK_SIZE = 64
IMAGE_SIDE = 64  # pixels; the processor's pixel budget is IMAGE_SIDE**2
_SPATIAL_FACTOR = 8
_TEXT_HIDDEN = 64

# Named special tokens of Emu3's tokenizer (the attribute names Emu3Processor reads) and the row/end markers.
EMU3_SPECIAL_TOKENS: dict[str, str] = {
    "pad_token": "<|endoftext|>",
    "bos_token": "<|extra_203|>",
    "eos_token": "<|extra_204|>",
    "image_token": "<image>",
    "boi_token": "<|image start|>",
    "eoi_token": "<|image end|>",
    "image_wrapper_token": "<|image token|>",
    "eof_token": "<|extra_201|>",
}
EOL_TOKEN = "<|extra_200|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level alphabet: each byte maps to one printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _tokenizer():
    """GPT2Tokenizer (Emu3's tokenizer class) from an in-memory byte vocabulary plus Emu3's special tokens."""
    from transformers import AddedToken, GPT2Tokenizer

    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    named = {k: v for k, v in EMU3_SPECIAL_TOKENS.items() if k not in ("pad_token", "bos_token", "eos_token")}
    tok = GPT2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        pad_token=EMU3_SPECIAL_TOKENS["pad_token"],
        bos_token=EMU3_SPECIAL_TOKENS["bos_token"],
        eos_token=EMU3_SPECIAL_TOKENS["eos_token"],
        extra_special_tokens=named,
        add_prefix_space=False,
        model_max_length=4096,
    )
    specials = [*EMU3_SPECIAL_TOKENS.values(), EOL_TOKEN]
    visual = [f"<|visual token {i:06d}|>" for i in range(CODEBOOK_SIZE)]
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials + visual], special_tokens=True)
    tok.padding_side = "left"
    return tok


def _processor(tok):
    from transformers import Emu3ImageProcessor, Emu3Processor

    image_processor = Emu3ImageProcessor(
        min_pixels=IMAGE_SIDE * IMAGE_SIDE, max_pixels=IMAGE_SIDE * IMAGE_SIDE, spatial_factor=_SPATIAL_FACTOR
    )
    return Emu3Processor(image_processor=image_processor, tokenizer=tok)


def build_tiny_emu3(out_dir: str | Path, seed: int = 0, force: bool = False) -> Path:
    """Build (or reuse) a tiny random `Emu3ForConditionalGeneration` plus its processor, saved in `out_dir`.

    Idempotent: if `out_dir/editrl_tiny.json` exists and `force` is False, returns without rebuilding (the marker is
    written last, so an interrupted build is redone). Deterministic for a given `seed`. Returns `Path(out_dir)`.
    """
    out = Path(out_dir)
    marker = out / "editrl_tiny.json"
    if marker.exists() and not force:
        return out

    from transformers import Emu3Config, Emu3ForConditionalGeneration, GenerationConfig

    tok = _tokenizer()
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in EMU3_SPECIAL_TOKENS.items()}
    config = Emu3Config(
        vq_config={
            "codebook_size": CODEBOOK_SIZE,
            "embed_dim": 4,
            "latent_channels": 4,
            "base_channels": 32,
            "channel_multiplier": [1, 1, 1, 1],
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "hidden_size": 32,  # base channels x last multiplier
            "num_attention_heads": 1,
            "temporal_downsample_factor": 4,
        },
        text_config={
            "vocab_size": len(tok),
            "hidden_size": _TEXT_HIDDEN,
            "intermediate_size": 2 * _TEXT_HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "attention_dropout": 0.0,
            "pad_token_id": ids["pad_token"],
            "bos_token_id": ids["bos_token"],
            "eos_token_id": ids["eos_token"],
        },
        vocabulary_map=tok.get_vocab(),
    )
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_token"],
        eos_token_id=ids["eos_token"],
        pad_token_id=ids["pad_token"],
        do_sample=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    if marker.exists():
        marker.unlink()
    model.save_pretrained(out, safe_serialization=True)
    _processor(tok).save_pretrained(out)
    marker.write_text(
        json.dumps({"kind": "tiny_emu3", "seed": seed, "vocab_size": len(tok), "codebook_size": CODEBOOK_SIZE})
    )
    return out
