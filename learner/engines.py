"""Training engines behind one interface: FSDP2 (``learner.engine: fsdp2``, the default) and DeepSpeed ZeRO-3
(``learner.engine: deepspeed``). The learner loop only calls what :class:`TrainEngine` lists.

Both shard the policy's trained module across the torchrun ranks (gloo on CPU, NCCL on GPUs), train only the LoRA
parameters with AdamW, accumulate gradients over any number of ``backward`` calls and step once per learner step.

Checkpoints hold the trainable parameters and the optimizer state. FSDP2's hold no pickle: the full (gathered)
LoRA parameters and the flattened optimizer state go to ``state.safetensors``, every non-tensor value (the optimizer's
hyper-parameters) to ``state.json`` (:mod:`editrl.learner.checkpoint_io`). DeepSpeed's own format pickles (its
``*.pt`` files). For both, :meth:`TrainEngine.save` returns the sha256 of every file it wrote, the learner records
them, and :meth:`TrainEngine.load` refuses a checkpoint whose files do not match -- so a DeepSpeed pickle this
learner did not write is never unpickled.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from editrl.common.lora import lora_key

ENGINES = ("fsdp2", "deepspeed")


def is_lora_key(name: str) -> bool:
    return "lora_" in name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checksums(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (relative path -> digest)."""
    return {str(p.relative_to(root)): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def verify_checksums(root: Path, expected: dict[str, str]) -> None:
    """RuntimeError unless ``root`` holds exactly the files of ``expected`` with those digests."""
    if not expected:
        raise RuntimeError(f"checkpoint {root}: no recorded checksums; refusing to unpickle it")
    actual = checksums(root)
    if actual != expected:
        changed = sorted(set(actual) ^ set(expected) | {k for k in actual if actual[k] != expected.get(k)})
        raise RuntimeError(f"checkpoint {root}: files differ from what this learner wrote: {changed[:5]}")


class TrainEngine(Protocol):
    model: torch.nn.Module  # call it for forwards (recompute)
    params: list[torch.nn.Parameter]  # the trainable (LoRA) parameters

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, max_grad_norm: float) -> float | None:
        """Clip, apply the accumulated gradients, zero them; returns the global gradient norm before clipping, or
        None when the engine did not measure it (the step's ``learner/grad_norm`` is then absent, never 0)."""
        ...

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """Full LoRA tensors with stable keys on rank 0 (collective: every rank must call it)."""
        ...

    def save(self, path: Path) -> dict[str, str]:
        """Checkpoint (collective); returns the sha256 of every file written (meaningful on rank 0)."""
        ...

    def load(self, path: Path, expected: dict[str, str]) -> None:
        """Restore a checkpoint written by :meth:`save` after verifying ``expected`` (collective)."""
        ...

    def trainable_norm(self) -> float:
        """L2 norm of all trainable parameters across shards (collective)."""
        ...


class FSDP2Engine:
    """``fully_shard`` on every shard unit, then the root; AdamW on the LoRA parameters; pickle-free checkpoints."""

    name = "fsdp2"

    def __init__(self, model: torch.nn.Module, shard_units: list[torch.nn.Module], lr: float, weight_decay: float):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for unit in shard_units:
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, eps=1e-8)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_grad_norm: float) -> float:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {lora_key(k): v for k, v in full.items() if is_lora_key(k)}

    _OPTIONS = {"full_state_dict": True, "cpu_offload": True, "ignore_frozen_params": True}

    def save(self, path: Path) -> dict[str, str]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        from editrl.learner.checkpoint_io import write_state

        options = StateDictOptions(**self._OPTIONS)
        model_sd = get_model_state_dict(self.model, options=options)  # collective; full tensors on rank 0
        optim_sd = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        if dist.get_rank() == 0:
            write_state(path, {"model": model_sd, "optim": optim_sd})
        dist.barrier()
        return checksums(path) if dist.get_rank() == 0 else {}

    def load(self, path: Path, expected: dict[str, str]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        from editrl.learner.checkpoint_io import read_state

        verify_checksums(path, expected)
        state = read_state(path)  # every rank reads the full state (the checkpoint directory is shared, as before)
        # Only the trainable (LoRA) parameters are in it: load non-strictly, then insist every one was restored.
        options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True, strict=False)
        result = set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
            options=options,
        )  # fmt: skip
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        missing = trainable & set(getattr(result, "missing_keys", []))
        if missing or not state["model"]:
            raise RuntimeError(f"checkpoint {path} lacks trainable parameters: {sorted(missing)[:5]}")

    def trainable_norm(self) -> float:
        local = sum(
            float((p.to_local() if hasattr(p, "to_local") else p).detach().double().pow(2).sum()) for p in self.params
        )
        t = torch.tensor([local], dtype=torch.float64)
        if dist.get_world_size() > 1:
            dist.all_reduce(t)
        return float(t.sqrt())


class DeepSpeedEngine:
    """DeepSpeed ZeRO-3 (parameters, gradients and optimizer state partitioned over the ranks); AdamW on the LoRA
    parameters; ``managed_gradient_accumulation: false`` so any number of ``backward`` calls accumulate until
    ``step``. Runs on CPU with ``DS_ACCELERATOR=cpu`` (set by the learner when no GPU is present)."""

    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, max_grad_norm: float):
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed
        except ImportError as exc:
            raise ImportError(
                f"learner.engine: deepspeed needs DeepSpeed: pip install editrl[deepspeed] ({exc})"
            ) from exc
        if os.environ.get("DS_ACCELERATOR") == "cpu":
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at start-up (tens of seconds on a
            # machine without the build cache) that only its inference_all_reduce uses; training all-reduces through
            # torch.distributed (gloo) either way. Marked incompatible, it is never built. (DeepSpeed keeps this dict
            # for the process and reads it when it builds its backend.)
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, eps=1e-8)
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,
            "gradient_clipping": max_grad_norm,
            "zero_optimization": {"stage": 3, "overlap_comm": False},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, model_parameters=params
        )
        self.model = self.engine.module
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, max_grad_norm: float) -> float | None:  # clipping is configured (gradient_clipping)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def _gathered(self) -> dict[str, torch.Tensor]:
        import deepspeed

        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {lora_key(n): p.detach().cpu().clone() for n, p in named}

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self._gathered().items() if is_lora_key(k)}

    def save(self, path: Path) -> dict[str, str]:
        self.engine.save_checkpoint(str(path.parent), tag=path.name, exclude_frozen_parameters=True)
        dist.barrier()
        return checksums(path) if dist.get_rank() == 0 else {}

    def load(self, path: Path, expected: dict[str, str]) -> None:
        verify_checksums(path, expected)
        load_path, _ = self.engine.load_checkpoint(
            str(path.parent), tag=path.name, load_module_strict=False, load_optimizer_states=True
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")

    def trainable_norm(self) -> float:
        return float(torch.sqrt(sum(t.double().pow(2).sum() for t in self._gathered().values())))
