"""LoRA adapters on any torch module (peft): injection with a deterministic initialisation, stable state-dict keys,
and loading published adapter weights -- shared by every editor family, the learner's engines and the actors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

__all__ = [
    "LoraSpec",
    "add_lora",
    "default_dtype",
    "lora_key",
    "lora_state_dict",
    "load_lora_state_dict",
    "param_dtype",
]


def param_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of the first parameter (float32 for a module without any)."""
    for p in module.parameters():
        return p.dtype
    return torch.float32


def _default_targets() -> list[str]:
    return [
        # attention (double blocks: image + text streams; single blocks share to_q/k/v)
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        # feed-forward
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        "proj_mlp",
        "proj_out",  # single-block output and the final projection
        # adaptive norms (modulation) and time/text embeddings: cheap, let a LoRA shift the output directly
        "norm1.linear",
        "norm1_context.linear",
        "norm.linear",
        "norm_out.linear",
        "timestep_embedder.linear_1",
        "timestep_embedder.linear_2",
        "guidance_embedder.linear_1",
        "guidance_embedder.linear_2",
        "text_embedder.linear_1",
        "text_embedder.linear_2",
    ]


@dataclass
class LoraSpec:
    """LoRA settings. target_modules are matched by peft as name suffixes. B starts at zero (identity)."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=_default_targets)
    seed: int = 0


_ADAPTER = "default"


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """New parameters are created (and randomly initialised) in ``dtype`` for the duration."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def add_lora(transformer: torch.nn.Module, spec: LoraSpec) -> torch.nn.Module:
    """Inject a peft LoRA adapter in place (deterministic A init from spec.seed, B = 0); freeze the base.

    The adapter is created and initialised in the transformer's dtype: a float32 A initialised and then cast to
    float64 differs between CPUs in the last float32 bit (vectorised ``uniform_`` rounds differently per ISA).
    Returns the same module. Only LoRA parameters keep requires_grad=True.
    """
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(spec.target_modules),
        lora_dropout=0.0,
        init_lora_weights=True,
    )
    with torch.random.fork_rng(devices=[]), default_dtype(param_dtype(transformer)):
        torch.manual_seed(spec.seed)
        inject_adapter_in_model(cfg, transformer, adapter_name=_ADAPTER)
    n = 0
    for name, p in transformer.named_parameters():
        is_lora = "lora_" in name
        p.requires_grad_(is_lora)
        n += int(is_lora)
    if n == 0:
        raise ValueError(f"no LoRA parameters injected for targets {spec.target_modules}")
    return transformer


def lora_key(name: str) -> str:
    """Stable key: drop wrapper prefixes and the adapter name ('x.lora_A.default.weight' -> 'x.lora_A.weight')."""
    for prefix in ("_orig_mod.", "module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(prefix, "")
    return name.replace(f".{_ADAPTER}.", ".")


def _lora_params(transformer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {lora_key(n): p for n, p in transformer.named_parameters() if "lora_" in n}


def lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """LoRA parameters only, as plain contiguous CPU tensors (DTensors are gathered), stable key names."""
    out: dict[str, torch.Tensor] = {}
    for k, p in _lora_params(transformer).items():
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out[k] = t.cpu().clone().contiguous()
    return out


def load_lora_state_dict(transformer: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy `sd` into the LoRA parameters; raises KeyError/ValueError on missing, unexpected or mis-shaped keys."""
    params = _lora_params(transformer)
    missing = sorted(set(params) - set(sd))
    unexpected = sorted(set(sd) - set(params))
    if missing or unexpected:
        raise KeyError(f"LoRA state dict mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    for k, p in params.items():
        if tuple(sd[k].shape) != tuple(p.shape):
            raise ValueError(f"LoRA shape mismatch for {k}: {tuple(sd[k].shape)} vs {tuple(p.shape)}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(sd[k].to(dtype=p.dtype, device=p.device))
