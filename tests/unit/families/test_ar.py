"""Tests for the ``ar`` family (editrl.common.families.ar, ar_vllm, tiny_emu3) on a tiny random Emu3 (no download, no GPU)."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from editrl.common.families.ar import (
    EMU3_LORA_TARGETS,
    Emu3EditPolicy,
    ImageLayout,
    TokenEngine,
    TransformersTokenEngine,
    masked_log_softmax,
    token_log_probs,
)
from editrl.common.families.base import ActorPolicy, LearnerPolicy, through_wire
from editrl.common.lora import LoraSpec, load_lora_state_dict, lora_state_dict

torch.set_num_threads(1)

GROUP = 4
ROWS = COLS = 8  # a 64x64 source -> 8x8 VQ codes
STEPS = ROWS * (COLS + 1) + 1  # rows of codes + EOL each, then EOF


def _lora() -> LoraSpec:
    return LoraSpec(rank=4, alpha=8.0, target_modules=list(EMU3_LORA_TARGETS), seed=0)


@pytest.fixture(scope="module")
def actor(tiny_emu3_dir: Path) -> Emu3EditPolicy:
    """Actor policy whose LoRA B is non-zero, so the LoRA path changes every logit."""
    policy = Emu3EditPolicy.from_pretrained(tiny_emu3_dir, lora=_lora(), temperature=1.0, top_k=0)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return policy


@pytest.fixture(scope="module")
def learner(tiny_emu3_dir: Path, actor: Emu3EditPolicy) -> Emu3EditPolicy:
    """A separately loaded learner-side policy (no processor, no engine, no VQ-VAE) with the actor's LoRA weights."""
    policy = Emu3EditPolicy.from_pretrained(tiny_emu3_dir, lora=_lora(), with_pipeline=False)
    load_lora_state_dict(policy.trainable_module(), lora_state_dict(actor.trainable_module()))
    return policy


@pytest.fixture(scope="module")
def source():
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def prompt(actor: Emu3EditPolicy, source) -> list[int]:
    return actor.build_prompt("make it red", source)[0]


@pytest.fixture(scope="module")
def rollout(actor: Emu3EditPolicy, source):
    return actor.sample("make it red", source, GROUP, torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------- (a) checkpoint + prompt


def test_tiny_checkpoint_loads_like_a_model_id(tiny_emu3_dir: Path, actor: Emu3EditPolicy, learner) -> None:
    from transformers import AutoProcessor, AutoTokenizer, Emu3ForConditionalGeneration, Emu3Processor

    from editrl.common.families.base import detect_pipeline
    from editrl.common.families.tiny.emu3 import CODEBOOK_SIZE, build_tiny_emu3

    model = Emu3ForConditionalGeneration.from_pretrained(tiny_emu3_dir)
    processor = AutoProcessor.from_pretrained(tiny_emu3_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_emu3_dir)
    assert not model.training and model.config.architectures == ["Emu3ForConditionalGeneration"]
    assert isinstance(processor, Emu3Processor) and type(tokenizer).__name__ == "GPT2Tokenizer"
    assert model.config.text_config.vocab_size == len(tokenizer) < 400  # small vocabulary: cheap tiny AR model
    assert len(model.vocabulary_mapping.image_tokens) == CODEBOOK_SIZE
    assert tokenizer.convert_ids_to_tokens(model.vocabulary_mapping.eol_token_id) == "<|extra_200|>"
    assert detect_pipeline(tiny_emu3_dir) == "emu3"
    # the VQ-VAE tokenises a 64x64 image into 8 rows of 8 codes + EOL and decodes codes back to 64x64 pixels
    enc = processor(images=[np.zeros((64, 64, 3), np.uint8)], text=["<image>"], return_tensors="pt")
    with torch.no_grad():
        image_tokens = model.model.get_image_tokens(enc["pixel_values"], enc["image_sizes"])
        assert image_tokens.shape == (ROWS * (COLS + 1),)
        assert model.model.vqmodel.decode(torch.zeros(1, ROWS, COLS, dtype=torch.long)).shape == (1, 3, 64, 64)
    # idempotent: a second build reuses the directory untouched
    stamp = (tiny_emu3_dir / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_emu3(tiny_emu3_dir) == tiny_emu3_dir
    assert (tiny_emu3_dir / "model.safetensors").stat().st_mtime_ns == stamp

    assert isinstance(actor, ActorPolicy) and isinstance(actor, LearnerPolicy) and actor.family == "ar"
    assert isinstance(actor.engine, TokenEngine) and isinstance(actor.engine, TransformersTokenEngine)
    assert learner.processor is None and learner.engine is None and learner.emu3.model.vqmodel is None
    assert learner.trainable_module() is learner.model
    assert learner.shard_units() == list(learner.model.text_model.layers) and len(learner.shard_units()) == 2
    base = {n: p for n, p in actor.model.named_parameters() if "lora_" not in n}
    for n, p in learner.model.named_parameters():
        assert p.requires_grad == ("lora_" in n), n
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n
    assert all(p.requires_grad == ("lora_" in n) for n, p in actor.emu3.named_parameters())
    with pytest.raises(RuntimeError, match="with_pipeline=False"):
        learner.sample("x", None, 1, torch.Generator())


def test_load_policy_reads_the_ar_config(tiny_emu3_dir: Path) -> None:
    """The family registry (policy.family = "ar", pipeline read from the checkpoint) builds this policy."""
    from editrl.common.config import PolicyConfig
    from editrl.common.families.base import load_policy

    cfg = PolicyConfig(family="ar", model=str(tiny_emu3_dir))
    cfg.sampler.temperature, cfg.sampler.top_k = 0.9, 16
    policy = load_policy(cfg, with_pipeline=False)
    assert isinstance(policy, Emu3EditPolicy) and (policy.temperature, policy.top_k) == (0.9, 16)
    assert policy.max_new_tokens is None  # 0 in the config: the source's image token count
    lora = [n for n, p in policy.trainable_module().named_parameters() if p.requires_grad]
    assert len(lora) == 2 * 2 * len(EMU3_LORA_TARGETS) and all("lora_" in n for n in lora)


def test_prompt_layout(actor: Emu3EditPolicy, source, prompt: list[int]) -> None:
    tok = actor.processor.tokenizer
    head = tok.convert_tokens_to_ids(["<|extra_203|>", "<|image start|>"]) + tok("8*8").input_ids
    assert prompt[: len(head) + 1] == [*head, tok.image_wrapper_token_id]
    start = len(head) + 1
    image = prompt[start : start + ROWS * (COLS + 1)]
    assert image[COLS :: COLS + 1] == [actor.eol_id] * ROWS  # one EOL per row
    assert all(t in actor.bpe_to_code for i, t in enumerate(image) if i % (COLS + 1) != COLS)
    rest = tok.decode(prompt[start + len(image) :])
    assert rest == "<|extra_201|><|image end|>make it red<|image start|>8*8<|image token|>"
    assert actor.allowed_ids == sorted([*actor.bpe_to_code, actor.eol_id, actor.eof_id])


# ------------------------------------------------------------------------------------------------ (b) engine


def test_engine_is_deterministic_per_seed_and_emits_only_allowed_ids(actor: Emu3EditPolicy, prompt) -> None:
    engine = actor.engine
    args = (prompt, GROUP, STEPS, 1.0, 0, actor.allowed_ids)
    tokens, log_probs, mask = engine.generate(*args, seed=5)
    assert tokens.dtype == torch.int64 and log_probs.dtype == mask.dtype == torch.float32
    assert tokens.shape == log_probs.shape == mask.shape == (GROUP, STEPS)
    again = engine.generate(*args, seed=5)
    assert all(torch.equal(a, b) for a, b in zip((tokens, log_probs, mask), again, strict=True))
    assert not torch.equal(engine.generate(*args, seed=6)[0], tokens)
    real = mask > 0
    assert set(tokens[real].tolist()) <= set(actor.allowed_ids)
    assert bool(torch.all(tokens[~real] == actor.pad_id)) and bool(torch.all(log_probs[~real] == 0))
    assert bool(torch.all(torch.isfinite(log_probs[real]))) and bool(torch.all(log_probs[real] <= 0))
    # a narrow allowed set and top-k are honoured too
    narrow = actor.allowed_ids[:3] + [actor.eof_id]
    tokens_k, lp_k, mask_k = engine.generate(prompt, GROUP, 12, 0.7, 2, narrow, seed=1)
    assert set(tokens_k[mask_k > 0].tolist()) <= set(narrow)
    # the engine's KV-cached log-probs are the full forward's up to float rounding (not bit for bit: see ar.py)
    with torch.no_grad():
        full = token_log_probs(actor.emu3, prompt, tokens_k, 0.7, 2, narrow)
    torch.testing.assert_close(full[mask_k > 0], lp_k[mask_k > 0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- (d) masking


def test_masked_log_softmax_matches_the_restricted_renormalised_distribution() -> None:
    logits = torch.tensor([[2.0, 5.0, 1.0, 3.0, 4.0, 3.0]])
    allowed = torch.tensor([True, False, True, True, False, True])  # allowed values: 2, 1, 3, 3
    cases = ((1.0, 0, [0, 2, 3, 5]), (0.5, 2, [3, 5]), (1.0, 3, [0, 3, 5]), (2.0, 10, [0, 2, 3, 5]))
    for temperature, top_k, kept in cases:
        lp = masked_log_softmax(logits, temperature, top_k, allowed)[0]
        x = logits[0].double() / temperature
        ref = torch.full((6,), -math.inf, dtype=torch.float64)
        ref[kept] = x[kept] - torch.logsumexp(x[kept], 0)  # renormalised over the support only
        assert lp.dtype == torch.float32 and torch.isfinite(lp).nonzero().flatten().tolist() == kept
        torch.testing.assert_close(lp.double(), ref, atol=1e-6, rtol=0)
    tied = torch.tensor([[1.0, 3.0, 2.0, 3.0]])  # values tied with the k-th are kept, as vLLM does
    assert torch.isfinite(masked_log_softmax(tied, 1.0, 1, None)[0]).tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="temperature"):
        token_log_probs(torch.nn.Linear(1, 1), [1], [[1]], 0.0, 0, None)  # greedy has no log-prob
    with pytest.raises(ValueError, match="top_k"):
        token_log_probs(torch.nn.Linear(1, 1), [1], [[1]], 1.0, -1, None)


def test_tokens_outside_top_k_or_allowed_set_get_minus_inf(actor: Emu3EditPolicy, prompt) -> None:
    with torch.no_grad():
        logits = actor.emu3(input_ids=torch.tensor([prompt])).logits[0, -1]
    lp = masked_log_softmax(logits, 1.0, 3, torch.isin(torch.arange(logits.numel()), torch.tensor(actor.allowed_ids)))
    inside = [int(i) for i in torch.nonzero(torch.isfinite(lp)).flatten()]
    assert len(inside) == 3 and set(inside) <= set(actor.allowed_ids)
    outside_topk = next(i for i in actor.allowed_ids if i not in inside)
    not_allowed = actor.pad_id
    tokens = torch.tensor([[inside[0]], [outside_topk], [not_allowed]])
    with torch.no_grad():
        got = token_log_probs(actor.model, prompt, tokens, 1.0, 3, actor.allowed_ids)[:, 0]
    assert got[0] == lp[inside[0]] and math.isinf(got[1]) and got[1] < 0 and math.isinf(got[2]) and got[2] < 0


def test_mask_zeroes_padding_after_the_end_token(actor: Emu3EditPolicy, prompt) -> None:
    """With EOF likely (3 allowed ids), rows end early: mask 1 up to and including EOF, pad / 0 after it."""
    allowed = [*actor.allowed_ids[:2], actor.eof_id]
    tokens, log_probs, mask = actor.engine.generate(prompt, GROUP, 30, 1.0, 0, allowed, seed=0)
    ended = 0
    for row_tokens, row_lp, row_mask in zip(tokens, log_probs, mask, strict=True):
        eofs = torch.nonzero(row_tokens == actor.eof_id).flatten()
        n = int(eofs[0]) + 1 if eofs.numel() else 30
        ended += int(eofs.numel() > 0)
        assert row_mask[:n].eq(1).all() and row_mask[n:].eq(0).all()
        assert row_tokens[n:].eq(actor.pad_id).all() and row_lp[n:].eq(0).all()
    assert ended == GROUP
    traj = {"tokens": tokens.numpy(), "unit_mask": mask.numpy()}
    params = {"temperature": 1.0, "top_k": 0.0}
    narrow = Emu3EditPolicy(actor.emu3, None, None)
    narrow.allowed_ids = allowed
    with torch.no_grad():
        raw = token_log_probs(narrow.model, prompt, tokens, 1.0, 0, allowed)
        ((start, lp),) = list(narrow.recompute(narrow.model, traj, {"prompt_ids": np.asarray(prompt)}, params))
    assert start == 0 and torch.isinf(raw[mask == 0]).all()  # the pad id is outside the support
    assert torch.isfinite(lp).all() and lp[mask == 0].eq(0).all() and torch.equal(lp[mask > 0], raw[mask > 0])


# ------------------------------------------------------------------------------------------- rollout + layout


def test_sample_layout(actor: Emu3EditPolicy, rollout, source) -> None:
    assert rollout.family == "ar" and rollout.log_probs.shape == (GROUP, STEPS)
    assert rollout.log_probs.dtype == np.float32 and np.isfinite(rollout.log_probs).all()
    traj = rollout.traj
    assert traj["tokens"].dtype == np.int64 and traj["tokens"].shape == (GROUP, STEPS)
    assert traj["unit_mask"].dtype == np.float32 and set(np.unique(traj["unit_mask"])) <= {0.0, 1.0}
    assert traj["sampler_log_probs"].dtype == np.float32 and traj["layout_ok"].shape == (GROUP,)
    masked = traj["unit_mask"] == 0
    assert (rollout.log_probs[masked] == 0).all() and (traj["sampler_log_probs"][masked] == 0).all()
    assert rollout.cond["prompt_ids"].dtype == np.int64 and rollout.cond["prompt_ids"].ndim == 1
    assert rollout.params == {"temperature": 1.0, "top_k": 0.0, "rows": 8.0, "cols": 8.0, "max_new_tokens": 73.0}
    assert len(rollout.images) == GROUP and all(im.size == (64, 64) for im in rollout.images)
    assert not np.array_equal(traj["tokens"][0], traj["tokens"][1])
    again = actor.sample("make it red", source, GROUP, torch.Generator().manual_seed(0))
    assert np.array_equal(again.traj["tokens"], traj["tokens"]) and np.array_equal(again.log_probs, rollout.log_probs)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(again.images, rollout.images, strict=True))


def test_layout_parse_and_decode_match_emu3(actor: Emu3EditPolicy) -> None:
    layout, eol, eof = ImageLayout(2, 3), actor.eol_id, actor.eof_id
    code_to_bpe = {c: b for b, c in actor.bpe_to_code.items()}
    v = [code_to_bpe[c] for c in range(6)]
    good = [v[0], v[1], v[2], eol, v[3], v[4], v[5], eol, eof]
    assert layout.num_tokens == len(good)
    codes, ok = layout.parse(np.array(good), actor.bpe_to_code, eol, eof)
    assert ok and codes.tolist() == [[0, 1, 2], [3, 4, 5]]
    short = [v[5], v[4], eol, v[3], eof, actor.pad_id, actor.pad_id, actor.pad_id, actor.pad_id]
    codes, ok = layout.parse(np.array(short), actor.bpe_to_code, eol, eof)
    assert not ok and codes.tolist() == [[5, 4, 0], [3, 0, 0]]  # missing positions filled with code 0
    no_end = [v[1]] * 9
    codes, ok = layout.parse(np.array(no_end), actor.bpe_to_code, eol, eof)
    assert not ok and codes.tolist() == [[1, 1, 1], [0, 0, 0]]  # one over-long row, cut to 3 codes
    # our decode (codes -> VQ decoder) equals Emu3's own decode_image_tokens on the canonical token sequence
    grid = torch.randint(0, 64, (2, ROWS, COLS), generator=torch.Generator().manual_seed(0))
    bpe = torch.tensor([[[code_to_bpe[int(c)] for c in row] + [eol] for row in img] for img in grid]).flatten(1)
    canonical = torch.cat([bpe, torch.tensor([[eof, 0, 0]] * 2)], dim=1)
    with torch.no_grad():
        theirs = actor.emu3.decode_image_tokens(image_tokens=canonical, height=ROWS, width=COLS)
        ours = actor.emu3.model.vqmodel.decode(grid)
    assert torch.equal(theirs, ours)
    images = actor.decode(grid.numpy())
    assert len(images) == 2 and images[0].size == (64, 64) and images[0].mode == "RGB"


# ---------------------------------------------------------------------------------------- (c) ratio exactly 1


def test_recompute_ratio_is_exactly_one(actor: Emu3EditPolicy, learner: Emu3EditPolicy, rollout, source) -> None:
    got = through_wire(rollout, source)
    assert got.traj["tokens"].dtype == np.int64 and got.cond["prompt_ids"].dtype == np.int64
    stored = torch.from_numpy(np.array(got.log_probs))
    counted = torch.from_numpy(np.array(got.traj["unit_mask"])) > 0
    assert int(counted.sum()) > GROUP
    for policy in (actor, learner):  # the actor's module and a separately loaded learner, with gradients
        chunks = list(policy.recompute(policy.trainable_module(), got.traj, got.cond, got.params))
        assert [start for start, _ in chunks] == [0]
        lp = chunks[0][1]
        assert lp.shape == (GROUP, STEPS) and lp.dtype == torch.float32 and lp.requires_grad
        assert torch.equal(lp.detach()[counted], stored[counted]) and torch.equal(lp.detach(), stored)
        ratio = torch.exp(lp.detach() - stored)[counted]
        assert torch.equal(ratio, torch.ones_like(ratio))
    # the engine's own log-probs are only close (KV cache vs full forward): they are diagnostics, not behaviour
    sampler = torch.from_numpy(np.array(got.traj["sampler_log_probs"]))
    torch.testing.assert_close(sampler[counted], stored[counted], atol=1e-5, rtol=0)
    # another temperature is another policy
    ((_, lp_other),) = list(learner.recompute(learner.model, got.traj, got.cond, dict(got.params, temperature=0.5)))
    assert not torch.equal(lp_other.detach()[counted], stored[counted])
    # with temperature and top-k on, the learner still reproduces the behaviour log-probs bit for bit
    tempered = Emu3EditPolicy(actor.emu3, actor.processor, actor.engine, temperature=0.8, top_k=8)
    out = through_wire(tempered.sample("make it blue", source, 2, torch.Generator().manual_seed(1)), source)
    assert out.params["top_k"] == 8.0 and out.params["temperature"] == 0.8
    ((_, lp),) = list(learner.recompute(learner.model, out.traj, out.cond, out.params))
    assert torch.equal(lp.detach(), torch.from_numpy(np.array(out.log_probs)))


# ------------------------------------------------------------------------------------------ (e) gradients


def test_recompute_gradients_reach_lora(learner: Emu3EditPolicy, rollout) -> None:
    learner.model.zero_grad(set_to_none=True)
    ((_, lp),) = list(learner.recompute(learner.model, rollout.traj, rollout.cond, rollout.params))
    (lp.sum() / float(rollout.traj["unit_mask"].sum())).backward()
    lora = {n: p for n, p in learner.model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * len(EMU3_LORA_TARGETS) * 2  # A and B, 4 projections, 2 layers
    assert all(p.grad is not None and bool(torch.all(torch.isfinite(p.grad))) for p in lora.values())
    assert all(p.grad.abs().sum() > 0 for p in lora.values())
    assert all(p.grad is None for n, p in learner.model.named_parameters() if "lora_" not in n)
    learner.model.zero_grad(set_to_none=True)


# -------------------------------------------------------------------- engine-agnostic policy (behaviour source)


class ScriptedEngine:
    """A TokenEngine returning fixed tokens (one of them outside the allowed set) and made-up log-probs."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens, self.calls = tokens, []

    def generate(self, prompt_ids, n, max_new_tokens, temperature, top_k, allowed_ids, seed):
        self.calls.append((n, max_new_tokens, temperature, top_k, list(allowed_ids), seed))
        shape = self.tokens.shape
        return self.tokens.clone(), torch.full(shape, -0.5), torch.ones(shape)


def test_behaviour_source_and_tokens_outside_the_support(
    actor: Emu3EditPolicy, source, caplog: pytest.LogCaptureFixture
) -> None:
    visual = sorted(actor.bpe_to_code)
    tokens = torch.tensor(visual)[torch.randint(0, len(visual), (2, STEPS), generator=torch.Generator().manual_seed(1))]
    tokens[0, 3] = actor.pad_id  # not an allowed id: the recompute gives -inf, so the unit is dropped
    engine = ScriptedEngine(tokens)
    policy = Emu3EditPolicy(actor.emu3, actor.processor, engine, temperature=1.0, top_k=0)
    assert isinstance(policy.engine, TokenEngine)
    with caplog.at_level("WARNING", logger="editrl.common.families.ar"):
        out = policy.sample("make it red", source, 2, torch.Generator().manual_seed(0))
    assert "ar_tokens_outside_support: 1 sampled tokens masked" in caplog.text
    assert engine.calls[0][:4] == (2, STEPS, 1.0, 0) and engine.calls[0][4] == actor.allowed_ids
    assert out.traj["unit_mask"][0, 3] == 0 and out.log_probs[0, 3] == 0 and np.isfinite(out.log_probs).all()
    assert (out.traj["unit_mask"].sum(1) == [STEPS - 1, STEPS]).all()
    assert (out.traj["sampler_log_probs"][out.traj["unit_mask"] > 0] == -0.5).all()
    assert not np.allclose(out.log_probs[1], -0.5)  # recomputed, not the engine's numbers
    trusting = Emu3EditPolicy(actor.emu3, actor.processor, engine, behaviour="engine")
    out = trusting.sample("make it red", source, 2, torch.Generator().manual_seed(0))
    assert (out.log_probs == -0.5).all()
    with pytest.raises(ValueError, match="behaviour"):
        Emu3EditPolicy(actor.emu3, None, None, behaviour="vllm")
    with pytest.raises(ValueError, match="temperature"):
        Emu3EditPolicy(actor.emu3, None, None, temperature=0.0)


# ----------------------------------------------------------------------------------------------- (f) vLLM


def test_without_vllm_construction_raises_import_error_with_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError, installed or not
    from editrl.common.families.ar_vllm import VLLMTokenEngine

    with pytest.raises(ImportError, match=r"pip install editrl\[vllm\]"):
        VLLMTokenEngine("BAAI/Emu3-Gen-hf", [7], 0)


class FakeLLM:
    """Records calls; completions end with the stop token 7 (the third runs past max_tokens) and report log-probs as
    vLLM does: one ``{token_id: Logprob}`` per position, the sampled token plus a top-1 entry (99) to ignore."""

    instances: list[FakeLLM] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs, self.calls = kwargs, []
        FakeLLM.instances.append(self)

    def generate(self, prompts: list[Any], sampling_params: Any = None, use_tqdm: bool = True) -> list[Any]:
        self.calls.append((prompts, sampling_params))
        ns = types.SimpleNamespace
        completions = []
        for i in range(sampling_params["n"]):
            ids = [[10, 7], [11, 12, 7]][i] if i < 2 else [13] * (sampling_params["max_tokens"] + 2)
            logprobs = [{tok: ns(logprob=-0.1 * (t + 1)), 99: ns(logprob=-0.01)} for t, tok in enumerate(ids)]
            completions.append(ns(token_ids=tuple(ids), logprobs=logprobs))
        return [ns(outputs=completions)]


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM  # type: ignore[attr-defined]
    module.SamplingParams = lambda **kwargs: kwargs  # type: ignore[attr-defined]
    registered: dict[str, str] = {"LlamaForCausalLM": "vllm.model_executor.models.llama:LlamaForCausalLM"}
    module.ModelRegistry = types.SimpleNamespace(  # type: ignore[attr-defined]
        models=registered,
        get_supported_archs=lambda: registered.keys(),
        register_model=lambda arch, cls: registered.__setitem__(arch, cls),
    )
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.instances.clear()
    return module


def test_vllm_adapter_sampling_params_and_log_prob_extraction(fake_vllm: types.ModuleType) -> None:
    from editrl.common.families.ar_vllm import VLLMTokenEngine

    engine = VLLMTokenEngine("/ckpt/emu3", end_ids=[7], pad_id=0, max_model_len=4096)
    assert isinstance(engine, TokenEngine) and not FakeLLM.instances  # lazy: no model before generate
    tokens, log_probs, mask = engine.generate([1, 2, 3], 3, 4, 0.8, 5, [7, 10, 11, 12, 13], seed=9)
    (llm,) = FakeLLM.instances
    assert llm.kwargs == {
        "model": "/ckpt/emu3",
        "logprobs_mode": "processed_logprobs",  # log-probs of the distribution sampled from, not raw logits
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.85,
        "max_model_len": 4096,
        "dtype": "auto",
        "enable_prefix_caching": True,
    }
    ((prompts, params),) = llm.calls  # one request, n completions
    assert prompts == [{"prompt_token_ids": [1, 2, 3]}]
    assert params == {
        "n": 3,
        "temperature": 0.8,
        "top_k": 5,
        "top_p": 1.0,
        "min_p": 0.0,
        "max_tokens": 4,
        "seed": 9,
        "logprobs": 1,
        "allowed_token_ids": [7, 10, 11, 12, 13],
        "stop_token_ids": [7],
        "detokenize": False,
    }
    assert tokens.dtype == torch.int64 and log_probs.dtype == mask.dtype == torch.float32
    assert tokens.tolist() == [[10, 7, 0, 0], [11, 12, 7, 0], [13, 13, 13, 13]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    torch.testing.assert_close(log_probs[2], torch.tensor([-0.1, -0.2, -0.3, -0.4]))
    assert log_probs[0, 2:].eq(0).all()
    engine.generate([1], 1, 2, 1.0, 0, None, seed=0)
    assert llm.calls[-1][1]["top_k"] == -1 and llm.calls[-1][1]["allowed_token_ids"] is None  # vLLM's "off"
    with pytest.raises(RuntimeError, match="completions"):
        llm.generate = lambda *a, **k: [types.SimpleNamespace(outputs=[])]
        engine.generate([1], 2, 2, 1.0, 0, None, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([1], 1, 2, 0.0, 0, None, seed=0)


def test_vllm_plugin_registers_the_architecture_once(fake_vllm: types.ModuleType) -> None:
    from editrl.common.families.ar_vllm import EMU3_ARCHITECTURES, ENTRY_POINT, VLLM_EMU3_MODEL_CLS, register

    assert ENTRY_POINT == ("vllm.general_plugins", "editrl_emu3", "editrl.common.families.ar_vllm:register")
    registry = fake_vllm.ModelRegistry.models
    register()
    assert all(registry[arch] == VLLM_EMU3_MODEL_CLS for arch in EMU3_ARCHITECTURES)
    registry["Emu3ForConditionalGeneration"] = "vllm_native:Emu3"  # a vLLM that supports it already: left alone
    register()
    assert registry["Emu3ForConditionalGeneration"] == "vllm_native:Emu3"


def test_policy_builds_the_vllm_engine(fake_vllm: types.ModuleType, tiny_emu3_dir: Path, actor) -> None:
    from editrl.common.families.ar_vllm import VLLMTokenEngine

    policy = Emu3EditPolicy.from_pretrained(tiny_emu3_dir, engine="vllm", engine_kwargs={"max_model_len": 512})
    assert isinstance(policy.engine, VLLMTokenEngine)
    assert policy.engine.end_ids == [actor.eof_id] and policy.engine.pad_id == actor.pad_id
    assert policy.engine.llm_kwargs["model"] == str(tiny_emu3_dir) and policy.engine.llm_kwargs["max_model_len"] == 512
    with pytest.raises(ValueError, match="engine"):
        Emu3EditPolicy.from_pretrained(tiny_emu3_dir, engine="sglang")


def test_real_vllm_accepts_the_adapter_calls() -> None:
    vllm = pytest.importorskip("vllm")
    from editrl.common.families.ar_vllm import VLLMTokenEngine, register

    engine = VLLMTokenEngine("BAAI/Emu3-Gen-hf", [151847], 151643)
    assert engine._vllm is vllm and engine._llm is None
    params = engine.sampling_params(4, 16, 1.0, 0, [1, 2, 3], seed=3)
    assert params.n == 4 and params.seed == 3 and params.logprobs == 1 and list(params.allowed_token_ids) == [1, 2, 3]
    register()
    assert "Emu3ForConditionalGeneration" in vllm.ModelRegistry.get_supported_archs()
