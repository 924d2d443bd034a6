"""Autoregressive token editors (Emu3-style), family ``ar``: each generated image token is one trained decision.

Terms:
- *prompt*: ``bos <|image start|>h*w<|image token|> <source VQ tokens, one EOL per row> <|extra_201|><|image end|>
  instruction <|image start|>h*w<|image token|>`` -- Emu3Processor's layout for the source image (its ``<image>``
  placeholders replaced by the VQ tokens, exactly what ``Emu3Model.get_image_features`` embeds), then the
  instruction, then Emu3's image-generation prefix for an output of the source's token size h x w.
- *completion* (T = h*(w+1)+1 tokens): h rows of w visual tokens each closed by EOL (``<|extra_200|>``), then EOF
  (``<|extra_201|>``), the end token. ``<|image end|>`` and eos would follow deterministically: not decisions,
  never sampled.
- *sampler distribution*: ``log_softmax`` of ``logits / temperature``, restricted to the allowed ids (visual tokens
  + EOL + EOF) and to the top-k of those (ties at the k-th value kept, as vLLM does). :func:`masked_log_softmax`
  is the single definition used by the engine, the actor and the learner.

Guarantees and failure model:
- ``Rollout.log_probs`` (the behaviour log-probs) are NOT the engine's numbers. After sampling, the actor recomputes
  them with :func:`token_log_probs` -- one full forward over prompt + completion for the whole group, the exact
  call the learner makes -- so at equal weights the learner's recompute equals them bit for bit (the contract of
  :mod:`editrl.common.families.base`). A KV-cached sampling loop and a full forward differ in float rounding, so the
  engine's own log-probs (kept as ``traj["sampler_log_probs"]`` to monitor that mismatch) could not honour it. The
  learner never trusts the engine's log-probs for the PPO ratio: it recomputes θ (and prox) itself and uses the
  stored log-probs only as behaviour log-probs. With ``behaviour="engine"`` (e.g. a vLLM actor that must skip the
  extra forward) the engine's log-probs are stored as behaviour instead; the ratio is then 1 only up to the
  engine/learner numerics, which the decoupled importance weight prox/behave absorbs.
- A sampled token the recompute puts outside its support (a near-tie at the top-k boundary, rounded differently
  by the two forwards) has a -inf recomputed log-prob: it is dropped from ``unit_mask`` (logged) so no -inf
  reaches the wire or the loss. Masked units store log-prob 0 and :meth:`Emu3EditPolicy.recompute` returns 0 there.
- Invalid layouts (EOF too early, rows of the wrong length, no EOF within T tokens) are decoded leniently: rows
  are split at EOL, cut or right-filled to w codes, missing rows filled, with VQ code 0 (a visible flat patch, so a
  broken sequence never looks like a plausible edit) and marked ``traj["layout_ok"] = 0``; a reward may use it.
  The allowed set is flat (vLLM's ``allowed_token_ids``), so nothing forces EOL at row ends: a trained Emu3 keeps
  the layout by itself; an untrained tiny model often does not.
- Memory: the recompute materialises ``[G, T+1, V]`` float32 logits (V ~ 184k for the real Emu3).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from editrl.common import wire
from editrl.common.families.ar_check import GROUP_SPEC, token_reasons
from editrl.common.families.base import Rollout
from editrl.common.families.check import common_reasons, first_reason
from editrl.common.lora import LoraSpec, add_lora

__all__ = [
    "TokenEngine",
    "TransformersTokenEngine",
    "Emu3LanguageModel",
    "Emu3EditPolicy",
    "ImageLayout",
    "EMU3_LORA_TARGETS",
    "masked_log_softmax",
    "token_log_probs",
    "check_sampling",
    "load_emu3",
]

log = logging.getLogger(__name__)

EMU3_LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
FILL_CODE = 0  # VQ code that fills the missing positions of an invalid layout


def check_sampling(temperature: float, top_k: int, max_new_tokens: int | None = None) -> None:
    """Validate sampler settings (a log-prob needs temperature > 0; top_k 0 = off)."""
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0 (greedy decoding has no log-prob), got {temperature}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")


def check_request(prompt_ids: list[int], n: int, temperature: float, top_k: int, max_new_tokens: int) -> None:
    """What every TokenEngine.generate checks first: sampler settings, n >= 1, a non-empty prompt."""
    check_sampling(temperature, top_k, max_new_tokens)
    if n < 1 or not prompt_ids:
        raise ValueError(f"need n >= 1 and a non-empty prompt, got n={n}, {len(prompt_ids)} prompt ids")


def masked_log_softmax(
    logits: torch.Tensor, temperature: float, top_k: int, allowed: torch.Tensor | None
) -> torch.Tensor:
    """The sampler's distribution ``[..., V]`` float32 in log space; -inf outside its support.

    ``logits / temperature`` (float32), then ids outside ``allowed`` ([V] bool, None = all) set to -inf, then all
    but the top ``top_k`` remaining values (0 = off; values tied with the k-th are kept), then ``log_softmax``.
    """
    x = logits.to(torch.float32) / temperature
    if allowed is not None:
        x = x.masked_fill(~allowed, float("-inf"))
    if 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    return torch.log_softmax(x, dim=-1)


def _allowed_mask(allowed_ids: Sequence[int] | None, vocab: int, device: torch.device) -> torch.Tensor | None:
    if allowed_ids is None:
        return None
    ids = torch.as_tensor(list(allowed_ids), dtype=torch.long)
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"allowed_ids must be a non-empty set of ids in [0, {vocab}), got {ids.numel()} ids")
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[ids] = True
    return mask.to(device)


def _accepts(model: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _cache_of(out: Any) -> Any:
    """The KV cache of a model output (``cache`` in transformers >= 5.24, ``past_key_values`` before)."""
    name = "cache" if "cache" in getattr(out, "__dataclass_fields__", {}) else "past_key_values"
    return getattr(out, name, None)


@runtime_checkable
class TokenEngine(Protocol):
    """Samples n completions of one prompt and reports the log-prob of each token under the distribution it sampled
    from (:func:`masked_log_softmax` semantics: logits / temperature, allowed ids, top-k, renormalised)."""

    def generate(
        self,
        prompt_ids: list[int],
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_k: int,
        allowed_ids: list[int] | None,
        seed: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``tokens`` int64 [n, T], ``log_probs`` float32 [n, T], ``mask`` float32 [n, T] with T = max_new_tokens:
        mask 1 for real tokens (up to and including the end token), 0 for the padding after it (pad id, log-prob 0).
        Deterministic for a given seed."""
        ...


class TransformersTokenEngine:
    """CPU/GPU token engine over a Hugging Face causal LM: a manual sampling loop with a KV cache.

    The loop (not ``model.generate``'s sampler) applies :func:`masked_log_softmax` itself, so the masking is exactly
    the learner's. One batched forward of the prompt (batch n), then one ``[n, 1]`` step per token; rows that ended
    are fed the pad id and ignored. Sampling uses ``torch.multinomial`` with a generator seeded by ``seed``.
    """

    def __init__(self, model: torch.nn.Module, end_ids: Sequence[int], pad_id: int) -> None:
        if not end_ids:
            raise ValueError("end_ids must name at least one end token")
        self.model, self.end_ids, self.pad_id = model, [int(i) for i in end_ids], int(pad_id)
        self._cache_kw = "cache" if _accepts(model, "cache") else "past_key_values"
        self._keep = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}

    def _step(self, input_ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        kwargs = {self._cache_kw: cache} if cache is not None else {}
        out = self.model(input_ids=input_ids, use_cache=True, **kwargs, **self._keep)
        return out.logits[:, -1], _cache_of(out)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[int],
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_k: int,
        allowed_ids: list[int] | None,
        seed: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """See :class:`TokenEngine`."""
        check_request(prompt_ids, n, temperature, top_k, max_new_tokens)
        device = next(self.model.parameters()).device
        prompt = torch.tensor(prompt_ids, dtype=torch.long, device=device).unsqueeze(0).expand(n, -1)
        logits, cache = self._step(prompt, None)  # [n, V]
        allowed = _allowed_mask(allowed_ids, logits.shape[-1], device)
        ends = torch.tensor(self.end_ids, dtype=torch.long, device=device)
        gen = torch.Generator(device=device).manual_seed(int(seed))
        tokens = torch.full((n, max_new_tokens), self.pad_id, dtype=torch.long)
        log_probs = torch.zeros((n, max_new_tokens), dtype=torch.float32)
        mask = torch.zeros((n, max_new_tokens), dtype=torch.float32)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            lp = masked_log_softmax(logits, temperature, top_k, allowed)  # [n, V]
            token = torch.multinomial(lp.exp(), 1, generator=gen).squeeze(1)  # zero probability outside the support
            token = torch.where(done, torch.full_like(token, self.pad_id), token)
            live = ~done
            tokens[:, t] = token.cpu()
            log_probs[:, t] = torch.where(live, lp.gather(1, token[:, None]).squeeze(1), 0.0).cpu()
            mask[:, t] = live.float().cpu()
            done = done | torch.isin(token, ends)
            if bool(done.all()) or t + 1 == max_new_tokens:
                break
            logits, cache = self._step(token[:, None], cache)
        return tokens, log_probs, mask


def token_log_probs(
    model: torch.nn.Module,
    prompt_ids: Sequence[int] | np.ndarray | torch.Tensor,
    tokens: np.ndarray | torch.Tensor,
    temperature: float,
    top_k: int,
    allowed_ids: Sequence[int] | None,
) -> torch.Tensor:
    """Per-token log-probs ``[n, T]`` float32 of ``tokens`` [n, T] after ``prompt_ids`` [P], with gradients.

    ONE forward over ``cat(prompt, tokens)`` for the whole batch n, then exactly the sampler's masking
    (:func:`masked_log_softmax`, top-k from these same logits). Tokens outside the support (padding, or a token
    the mask excludes) get -inf: callers mask them with ``torch.where``, never by multiplication.
    ``model(input_ids=...)`` must return ``.logits`` (any HF causal LM, :class:`Emu3LanguageModel`).
    """
    check_sampling(temperature, top_k)
    device = next(model.parameters()).device
    tokens_t = torch.tensor(np.asarray(tokens), dtype=torch.long, device=device)  # [n, T]; copies read-only arrays
    prompt = torch.tensor(np.asarray(prompt_ids), dtype=torch.long, device=device).reshape(1, -1)
    n, t = tokens_t.shape
    input_ids = torch.cat([prompt.expand(n, -1), tokens_t], dim=1)  # [n, P+T]
    keep = {"logits_to_keep": t + 1} if _accepts(model, "logits_to_keep") else {}
    logits = model(input_ids=input_ids, use_cache=False, **keep).logits[:, -(t + 1) : -1]  # [n, T, V]
    lp = masked_log_softmax(logits, temperature, top_k, _allowed_mask(allowed_ids, logits.shape[-1], device))
    return lp.gather(-1, tokens_t.unsqueeze(-1)).squeeze(-1)  # [n, T]


class Emu3LanguageModel(torch.nn.Module):
    """Emu3's language model alone (text decoder + lm_head, no VQ-VAE): the module the learner trains and shards.

    It shares its submodules with the ``Emu3ForConditionalGeneration`` it came from, so LoRA injected here is the
    actor's LoRA too. ``forward`` mirrors a causal LM's: ``.logits`` (last ``logits_to_keep`` positions) and cache.
    """

    def __init__(self, text_model: torch.nn.Module, lm_head: torch.nn.Module) -> None:
        super().__init__()
        self.text_model, self.lm_head = text_model, lm_head
        self._cache_kw = "cache" if _accepts(text_model, "cache") else "past_key_values"

    def forward(
        self, input_ids: torch.Tensor, use_cache: bool = False, cache: Any = None, logits_to_keep: int = 0
    ) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs = {self._cache_kw: cache} if cache is not None else {}
        out = self.text_model(input_ids=input_ids, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return CausalLMOutputWithPast(logits=logits, **{self._cache_kw: _cache_of(out)})


@dataclass(frozen=True)
class ImageLayout:
    """Token geometry of one Emu3 image: ``rows`` x ``cols`` VQ codes, one EOL per row, then EOF."""

    rows: int
    cols: int

    @property
    def num_tokens(self) -> int:
        """Completion length of a well-formed image: rows * (cols + 1) + 1 (EOF)."""
        return self.rows * (self.cols + 1) + 1

    def parse(self, tokens: np.ndarray, bpe_to_code: dict[int, int], eol: int, eof: int) -> tuple[np.ndarray, bool]:
        """One completion [T] -> (codes [rows, cols] int64, well-formed?). See the module docstring for the rule."""
        seq = [int(x) for x in tokens]
        ended = eof in seq
        seq = seq[: seq.index(eof)] if ended else seq
        rows: list[list[int]] = [[]]
        for tok in seq:
            if tok == eol:
                rows.append([])
            else:
                rows[-1].append(tok)
        closed = len(rows) > 1 and not rows[-1]  # the last row ended with EOL
        rows = rows[:-1] if closed else rows
        ok = (
            ended
            and closed
            and len(rows) == self.rows
            and all(len(r) == self.cols and all(t in bpe_to_code for t in r) for r in rows)
        )
        codes = np.full((self.rows, self.cols), FILL_CODE, dtype=np.int64)
        for i, row in enumerate(rows[: self.rows]):
            for j, tok in enumerate(row[: self.cols]):
                codes[i, j] = bpe_to_code.get(tok, FILL_CODE)
        return codes, ok


class Emu3EditPolicy:
    """An Emu3-style editor as a policy over image-token sequences: both :class:`~editrl.common.families.base.ActorPolicy`
    and :class:`~editrl.common.families.base.LearnerPolicy` (family ``ar``).

    ``emu3`` is the ``Emu3ForConditionalGeneration`` (its VQ-VAE encodes sources and decodes edits); ``model`` is
    its :class:`Emu3LanguageModel` (text decoder + lm_head, LoRA on q/k/v/o), the trained module. ``processor``
    and ``engine`` exist on actors only (``with_pipeline=True``); the learner also drops the VQ-VAE.
    """

    family = "ar"

    def __init__(
        self,
        emu3: torch.nn.Module,
        processor: Any | None,
        engine: TokenEngine | None,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        max_new_tokens: int | None = None,
        behaviour: str = "recompute",
    ) -> None:
        check_sampling(temperature, top_k, max_new_tokens)
        if behaviour not in ("recompute", "engine"):
            raise ValueError(f"behaviour must be 'recompute' or 'engine', got {behaviour!r}")
        self.emu3, self.processor, self.engine = emu3, processor, engine
        self.model = Emu3LanguageModel(emu3.model.text_model, emu3.lm_head)
        self.temperature, self.top_k, self.max_new_tokens = float(temperature), int(top_k), max_new_tokens
        self.behaviour = behaviour
        mapping = emu3.model.vocabulary_mapping
        self.bpe_to_code: dict[int, int] = dict(mapping.bpe2img)
        self.eol_id = int(mapping.eol_token_id)
        self.eof_id = int(emu3.config.vocabulary_map["<|extra_201|>"])
        self.pad_id = int(emu3.config.text_config.pad_token_id)
        self.allowed_ids: list[int] = sorted({*self.bpe_to_code, self.eol_id, self.eof_id})

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        engine: str | TokenEngine = "transformers",
        lora: LoraSpec | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        max_new_tokens: int | None = None,
        behaviour: str = "recompute",
        with_pipeline: bool = True,
        torch_dtype: torch.dtype = torch.float32,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> Emu3EditPolicy:
        """Load an Emu3 checkpoint (directory or model id). ``engine``: "transformers", "vllm" (GPU; extra options in
        ``engine_kwargs``) or a :class:`TokenEngine`. LoRA (``target_modules`` e.g. :data:`EMU3_LORA_TARGETS`) is
        injected into the language model with B = 0; every base weight is frozen."""
        from transformers import AutoProcessor, Emu3ForConditionalGeneration

        emu3 = Emu3ForConditionalGeneration.from_pretrained(str(path), dtype=torch_dtype).eval()
        emu3.requires_grad_(False)
        processor = AutoProcessor.from_pretrained(str(path)) if with_pipeline else None
        if not with_pipeline:
            emu3.model.vqmodel = None  # the learner never encodes or decodes images
        policy = cls(
            emu3, processor, None, temperature=temperature, top_k=top_k, max_new_tokens=max_new_tokens,
            behaviour=behaviour,
        )  # fmt: skip
        if lora is not None:
            add_lora(policy.model, lora)
        if with_pipeline:
            policy.engine = policy._make_engine(engine, str(path), engine_kwargs or {})
        return policy

    def _make_engine(self, engine: str | TokenEngine, path: str, kwargs: dict[str, Any]) -> TokenEngine:
        if not isinstance(engine, str):
            return engine
        if engine == "transformers":
            return TransformersTokenEngine(self.emu3, [self.eof_id], self.pad_id)
        if engine == "vllm":
            from editrl.common.families.ar_vllm import VLLMTokenEngine

            return VLLMTokenEngine(path, [self.eof_id], self.pad_id, **kwargs)
        raise ValueError(f"engine must be 'transformers', 'vllm' or a TokenEngine, got {engine!r}")

    def _pipeline(self) -> tuple[Any, TokenEngine]:
        if self.processor is None or self.engine is None or self.emu3.model.vqmodel is None:
            raise RuntimeError("this policy was loaded with with_pipeline=False (learner): it cannot sample")
        return self.processor, self.engine

    @torch.no_grad()
    def build_prompt(self, instruction: str, source: Any) -> tuple[list[int], ImageLayout]:
        """Prompt ids (see the module docstring) and the output's token layout (the source's h x w codes)."""
        processor, _ = self._pipeline()
        enc = processor(
            images=[source.convert("RGB")], text=[f"{processor.image_token}{instruction}"], return_tensors="pt"
        )
        vq = self.emu3.model
        pixels = enc["pixel_values"].to(device=self.emu3.device, dtype=vq.vqmodel.dtype)
        image_tokens = vq.get_image_tokens(pixels, enc["image_sizes"]).to(torch.long).cpu()  # rows with EOL, flat
        ids = enc["input_ids"][0].clone()
        placeholder = ids == processor.image_token_id
        if int(placeholder.sum()) != image_tokens.numel():
            raise RuntimeError(f"{int(placeholder.sum())} image placeholders for {image_tokens.numel()} VQ tokens")
        ids[placeholder] = image_tokens
        rows, cols = (int(s) // vq.vqmodel.vision_spatial_factor for s in enc["image_sizes"][0])
        prefix = f"{processor.image_start_token}{rows}*{cols}{processor.fake_token_around_image}"
        prefix_ids = processor.tokenizer(prefix, add_special_tokens=False)["input_ids"]
        return ids.tolist() + list(prefix_ids), ImageLayout(rows, cols)

    @torch.no_grad()
    def decode(self, codes: np.ndarray) -> list[Any]:
        """VQ codes [G, rows, cols] -> G PIL images through the VQ decoder (what ``decode_image_tokens`` does after
        mapping tokens to codes)."""
        processor, _ = self._pipeline()
        vq = self.emu3.model.vqmodel
        pixels = vq.decode(torch.as_tensor(codes, dtype=torch.long, device=self.emu3.device))  # [G, 3, H, W]
        return processor.postprocess(list(pixels.float().cpu()), return_tensors="PIL.Image.Image")["pixel_values"]

    def sample(self, instruction: str, source: Any, group_size: int, generator: torch.Generator) -> Rollout:
        """G edits of ``source``: sample token sequences, recompute their behaviour log-probs, decode the images."""
        _, engine = self._pipeline()
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        prompt_ids, layout = self.build_prompt(instruction, source)
        steps = self.max_new_tokens or layout.num_tokens
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        tokens, engine_lp, mask = engine.generate(
            prompt_ids, group_size, steps, self.temperature, self.top_k, self.allowed_ids, seed
        )
        tokens, engine_lp, mask = tokens.to(torch.int64).cpu(), engine_lp.float().cpu(), mask.float().cpu()
        if self.behaviour == "recompute":
            with torch.no_grad():
                behave = token_log_probs(self.model, prompt_ids, tokens, self.temperature, self.top_k, self.allowed_ids)
            behave = behave.cpu()
        else:
            behave = engine_lp.clone()
        outside = (mask > 0) & ~torch.isfinite(behave)
        if bool(outside.any()):
            log.warning("ar_tokens_outside_support: %d sampled tokens masked", int(outside.sum()))
            mask = mask.masked_fill(outside, 0.0)
        counted = mask > 0
        parsed = [layout.parse(row, self.bpe_to_code, self.eol_id, self.eof_id) for row in tokens.numpy()]
        return Rollout(
            family="ar",
            traj={
                "tokens": tokens.numpy(),  # [G, T] int64
                "unit_mask": mask.numpy(),  # [G, T] float32
                "sampler_log_probs": torch.where(counted, engine_lp, 0.0).numpy(),  # [G, T] float32, diagnostics
                "layout_ok": np.array([ok for _, ok in parsed], dtype=np.float32),  # [G]
            },
            log_probs=torch.where(counted, behave, 0.0).numpy(),  # [G, T] float32
            cond={"prompt_ids": np.asarray(prompt_ids, dtype=np.int64)},  # [P]
            params={
                "temperature": self.temperature,
                "top_k": float(self.top_k),
                "rows": float(layout.rows),
                "cols": float(layout.cols),
                "max_new_tokens": float(steps),
            },
            images=self.decode(np.stack([codes for codes, _ in parsed])),
        )

    def recompute(
        self, model: torch.nn.Module, traj: dict[str, np.ndarray], cond: dict[str, np.ndarray], params: dict[str, float]
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """One chunk ``(0, log_prob [G, T])``: :func:`token_log_probs` with gradients through ``model``, 0 at masked
        units. The allowed ids come from the checkpoint's vocabulary, as on the actor."""
        lp = token_log_probs(
            model, cond["prompt_ids"], traj["tokens"], float(params["temperature"]), int(params["top_k"]),
            self.allowed_ids,
        )  # fmt: skip
        mask = traj.get("unit_mask")
        if mask is not None:
            counted = torch.tensor(np.asarray(mask), dtype=torch.float32, device=lp.device) > 0
            lp = torch.where(counted, lp, 0.0)
        yield 0, lp

    def check_group(self, group: wire.RolloutGroup) -> str | None:
        """None if :meth:`recompute` can use ``group``, else a short reason naming the field. Static: token ids
        within the language model's vocabulary, counted tokens within the sampler's allowed ids (else their
        recomputed log-prob is -inf), the sampler settings; the model never runs (see
        :mod:`editrl.common.families.check`)."""
        vocab = min(self.model.lm_head.out_features, self.model.text_model.embed_tokens.num_embeddings)
        return first_reason(chain(common_reasons(group, GROUP_SPEC), token_reasons(group, vocab, self.allowed_ids)))

    def shard_units(self) -> list[torch.nn.Module]:
        """The decoder layers, sharded one by one before the language model root."""
        return list(self.model.text_model.layers)

    def trainable_module(self) -> torch.nn.Module:
        """The language model (:class:`Emu3LanguageModel`) that carries the LoRA."""
        return self.model


def load_emu3(policy_cfg: Any, *, with_pipeline: bool) -> Emu3EditPolicy:
    """The Emu3 policy for a ``config.PolicyConfig`` (see :func:`editrl.common.families.base.load_policy`)."""
    s = policy_cfg.sampler
    lora = LoraSpec(rank=policy_cfg.lora.rank, alpha=policy_cfg.lora.alpha, target_modules=list(EMU3_LORA_TARGETS))
    return Emu3EditPolicy.from_pretrained(
        policy_cfg.model, with_pipeline=with_pipeline, lora=lora, temperature=s.temperature, top_k=s.top_k,
        max_new_tokens=s.max_new_tokens or None, engine=s.engine,
    )  # fmt: skip
