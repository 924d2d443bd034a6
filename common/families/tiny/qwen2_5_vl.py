"""Tiny random-weight Qwen2.5-VL judge assembled from configs (no download).

`build_tiny_qwen2_5_vl(out_dir)` writes a directory laid out like a Hub checkpoint of a real Qwen2.5-VL model:

- `config.json`, `generation_config.json`, `model.safetensors` -> `Qwen2_5_VLForConditionalGeneration.from_pretrained`
- `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja` -> `AutoTokenizer.from_pretrained`
- `preprocessor_config.json` (image processor) -> `AutoImageProcessor.from_pretrained`
- `editrl_tiny.json` (marker with the build parameters, used for idempotence)

Deviation from a real checkpoint: there is no `video_preprocessor_config.json` and no processor-level
`processor_config.json` / `chat_template.json`. The video processor needs torchvision (not installable beside
torch 2.13 cpu) and `Qwen2_5_VLProcessor.save_pretrained` fails without it, so the tokenizer (which carries the chat
template, as `chat_template.jinja`) and the image processor are saved separately. Without torchvision
`AutoProcessor.from_pretrained` fails on the video processor for this directory AND for a real Qwen2.5-VL model id
alike; :func:`editrl.common.hf_processors.load_image_text_processor` then assembles the same processor class from
`AutoTokenizer` + `AutoImageProcessor`, so the engine takes one code path for both. With torchvision installed,
`AutoProcessor` would build a default video processor for this directory.

Sizes:
- Vision tower: 1 block, hidden 32, 2 heads, patch 14, temporal patch 2, spatial merge 2 (same geometry as the
  real model, so the image processor is unchanged apart from its pixel budget).
- Image processor: `min_pixels = max_pixels = 56*56`: a square image (e.g. 64x64) is resized to 56x56 -> 4x4
  patches -> 4 vision tokens after the 2x2 merge (4 `<|image_pad|>` tokens); other aspect ratios get a similar
  pixel budget (Qwen's `smart_resize` keeps sides multiples of 28).
- Language model: 2 layers, hidden 64, 4 heads (head dim 16, mrope sections 2+3+3), 2 KV heads.
- Tokenizer: byte-level BPE over the 256 byte symbols (any text encodes, nothing is unknown) plus merges that make a few
  whole words (`score`, `reasoning`, ...; also with a leading space) single tokens, the Qwen special tokens and the
  Qwen2-VL chat template: 376 tokens (digits and JSON punctuation are single bytes, one token each).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["build_tiny_qwen2_5_vl", "TINY_VLM_WORDS", "QWEN_SPECIAL_TOKENS", "QWEN2_VL_CHAT_TEMPLATE"]

# Whole words the tokenizer knows (with and without a leading space); everything else falls back to bytes.
TINY_VLM_WORDS: tuple[str, ...] = tuple(
    "score reasoning image edit edited source instruction the a of and is to in json true false null yes no "
    "system user assistant picture".split()
)

# Qwen2/2.5-VL special tokens (same strings as the real tokenizer; ids differ).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The Qwen2-VL / Qwen2.5-VL chat template (as shipped with the Instruct checkpoints).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_PATCH = 14
_MERGE = 2
_TEMPORAL_PATCH = 2
_PIXELS = (_PATCH * _MERGE * 2) ** 2  # 56*56: every image becomes 4x4 patches -> 4 merged vision tokens
_TEXT_HIDDEN = 64
_TEXT_HEADS = 4
_VISION_HIDDEN = 32


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level alphabet: each byte maps to one printable unicode character (as in the Qwen tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply byte-level BPE merges (lowest rank first, leftmost on ties) to one pre-token."""
    parts = list(symbols)
    while len(parts) > 1:
        candidates = [
            (ranks[pair], i) for i, pair in enumerate(zip(parts[:-1], parts[1:], strict=True)) if pair in ranks
        ]
        if not candidates:
            break
        _, i = min(candidates)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary (256 byte symbols + word pieces) and merges that make each word one token.

    For each of `word` and `" " + word` in turn: segment it with the merges so far and, while it is more than one
    token, add a merge of its first two pieces. New merges rank after all earlier ones, so words already added keep
    their single-token encoding.
    """
    byte_chars = _bytes_to_unicode()
    vocab: dict[str, int] = {byte_chars[b]: b for b in range(256)}
    ranks: dict[tuple[str, str], int] = {}
    for word in TINY_VLM_WORDS:
        for form in (word, " " + word):
            symbols = [byte_chars[b] for b in form.encode("utf-8")]
            while len(parts := _bpe(symbols, ranks)) > 1:
                ranks[(parts[0], parts[1])] = len(ranks)
                vocab.setdefault(parts[0] + parts[1], len(vocab))
    return vocab, sorted(ranks, key=ranks.__getitem__)


def _tokenizer():
    """Qwen2Tokenizer from an in-memory vocabulary, with the Qwen special tokens and the chat template."""
    from transformers import AddedToken, Qwen2Tokenizer

    vocab, merges = _vocab_and_merges()
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
        errors="replace",
    )
    tok.add_special_tokens(
        {
            "additional_special_tokens": [
                AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS if t != "<|endoftext|>"
            ]
        }
    )
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def _image_processor():
    """Qwen2-VL image processor (PIL backend: torchvision is absent) with a 56x56 pixel budget."""
    try:
        from transformers import Qwen2VLImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers: the slow processor is the PIL one
        from transformers import Qwen2VLImageProcessor as ImageProcessor
    return ImageProcessor(
        min_pixels=_PIXELS,
        max_pixels=_PIXELS,
        patch_size=_PATCH,
        temporal_patch_size=_TEMPORAL_PATCH,
        merge_size=_MERGE,
    )


def build_tiny_qwen2_5_vl(out_dir: str | Path, seed: int = 0, force: bool = False) -> Path:
    """Build (or reuse) a tiny random `Qwen2_5_VLForConditionalGeneration` plus tokenizer and image processor.

    Idempotent: if `out_dir/editrl_tiny.json` exists and `force` is False, returns without rebuilding (the marker is
    written last, so an interrupted build is redone). Deterministic for a given `seed`. Returns `Path(out_dir)`.
    """
    out = Path(out_dir)
    marker = out / "editrl_tiny.json"
    if marker.exists() and not force:
        return out

    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = _tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = _TEXT_HIDDEN // _TEXT_HEADS
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": _TEXT_HIDDEN,
            "intermediate_size": 2 * _TEXT_HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": _TEXT_HEADS,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16],
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 1,
            "hidden_size": _VISION_HIDDEN,
            "intermediate_size": 2 * _VISION_HIDDEN,
            "num_heads": 2,
            "patch_size": _PATCH,
            "spatial_merge_size": _MERGE,
            "temporal_patch_size": _TEMPORAL_PATCH,
            "window_size": _PATCH * _MERGE * 2,
            "fullatt_block_indexes": [0],
            "out_hidden_size": _TEXT_HIDDEN,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    if marker.exists():
        marker.unlink()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    _image_processor().save_pretrained(out)
    marker.write_text(json.dumps({"kind": "tiny_qwen2_5_vl", "seed": seed, "vocab_size": len(tok)}))
    return out
