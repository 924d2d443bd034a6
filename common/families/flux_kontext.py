"""FLUX.1-Kontext as a stochastic policy over latent trajectories, shared by the actor and the learner.

The actor uses the full pipeline (text encoders, VAE) to encode conditions, sample groups and decode; the learner
loads only the transformer and recomputes each stored step with :func:`flux_velocity` and the step of
:mod:`editrl.common.families.flow`.

Shapes: B = batch, G = group size, N = sampler steps, L = packed latent tokens, C = packed channels
(4 x VAE latent channels), T = text tokens, D = text width, P = pooled text width.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch

from editrl.common import wire
from editrl.common.families.base import Rollout
from editrl.common.families.check import (
    FLOATS,
    GroupSpec,
    common_reasons,
    first_reason,
    shapes_reasons,
    units_reason,
)
from editrl.common.families.flow import STEPS, FlowSampler, FlowStep, _per_sample, schedule_reason, sde_window
from editrl.common.families.flow_ode import ODE, mode_reasons, ode_reasons, ode_rollout, ode_sample
from editrl.common.lora import LoraSpec, add_lora, param_dtype

__all__ = ["GroupCondition", "Trajectory", "FluxKontextPolicy", "flux_schedule", "flux_velocity", "load_flux_kontext"]


def flux_schedule(num_steps: int, image_seq_len: int, scheduler_config: dict[str, Any]) -> torch.Tensor:
    """Sigma schedule [N+1] float32 exactly as FluxKontextPipeline builds it (final 0 included).

    sigmas = linspace(1, 1/N, N), mu = calculate_shift(image_seq_len, ...) from the scheduler config, then
    `scheduler.set_timesteps(sigmas=..., mu=...)` applies the (dynamic) shift and appends 0.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))
    cfg = scheduler.config
    mu = calculate_shift(
        image_seq_len,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.15),
    )
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    out = scheduler.sigmas.to(torch.float32).cpu()
    if out.shape[0] != num_steps + 1:
        raise RuntimeError(f"unexpected schedule length {out.shape[0]} for {num_steps} steps")
    return out


def _float_copy(a: np.ndarray) -> np.ndarray:
    """A writable copy of a stored float array: float64 stays float64 (the reference path), the rest is float32."""
    return np.array(a, dtype=np.float64 if a.dtype == np.float64 else np.float32)


@dataclass
class GroupCondition:
    """Everything the transformer needs about one (instruction, source image) pair; stored once per group.

    prompt_embeds [T, D], pooled_prompt_embeds [P], text_ids [T, 3], image_latents [L_img, C] (packed source
    latents, already shifted/scaled), latent_ids [L, 3] (target tokens), image_ids [L_img, 3] (first id = 1);
    all float32 (float64 on the float64 path). height/width: output image size in pixels.
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    text_ids: torch.Tensor
    image_latents: torch.Tensor
    latent_ids: torch.Tensor
    image_ids: torch.Tensor
    height: int
    width: int

    _FIELDS = ("prompt_embeds", "pooled_prompt_embeds", "text_ids", "image_latents", "latent_ids", "image_ids")

    def to_arrays(self) -> dict[str, np.ndarray]:
        """numpy copies of the tensor fields, float32 or float64 as held (height/width travel separately)."""
        return {k: getattr(self, k).detach().cpu().numpy() for k in self._FIELDS}

    @classmethod
    def from_arrays(cls, d: dict[str, np.ndarray], height: int, width: int) -> GroupCondition:
        """Inverse of to_arrays."""
        kw = {k: torch.from_numpy(_float_copy(d[k])) for k in cls._FIELDS}
        return cls(**kw, height=int(height), width=int(width))

    @property
    def seq_len(self) -> int:
        """L, number of target latent tokens."""
        return int(self.latent_ids.shape[0])


@dataclass
class Trajectory:
    """One sampled group: latents [G, K+1, L, C] = x_start ... x_end of the stochastic window (all N+1 latents without
    a window), log_probs [G, K] (behaviour log-prob of each stochastic step on the stored tensors), sigmas [N+1],
    final [G, L, C] the last latent (decoded to the edits); all float32 (latents and log-probs float64 on the float64
    path)."""

    latents: torch.Tensor
    log_probs: torch.Tensor
    sigmas: torch.Tensor
    noise_level: float = 0.0
    guidance: float = 0.0
    start: int = 0
    final: torch.Tensor | None = None


def _guidance_embeds(transformer: torch.nn.Module) -> bool:
    cfg = getattr(transformer, "config", None)
    if cfg is None and hasattr(transformer, "module"):
        cfg = getattr(transformer.module, "config", None)
    return bool(getattr(cfg, "guidance_embeds", True)) if cfg is not None else True


def flux_velocity(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    sigma: float | torch.Tensor,
    cond: GroupCondition,
    guidance: float | None,
) -> torch.Tensor:
    """Velocity v [B, L, C] (float32, or float64 for a float64 transformer) for latents [B, L, C] at sigma (float,
    [] or [B]).

    Kontext layout: hidden = cat([latents, image_latents], dim=1) (sequence dim), img_ids = cat([latent_ids,
    image_ids], 0), prediction cut to the first L tokens. The transformer multiplies `timestep` by 1000 itself
    (the pipeline passes t/1000 with t = 1000 sigma), so we pass sigma directly; the same for guidance (embedded
    only when the model has guidance_embeds). Works with any module with FluxTransformer2DModel's forward.
    """
    b, seq, _ = latents.shape
    device = latents.device
    dtype = param_dtype(transformer)
    img = cond.image_latents.to(device=device, dtype=dtype).unsqueeze(0).expand(b, -1, -1)  # [B, L_img, C]
    hidden = torch.cat([latents.to(dtype), img], dim=1)  # [B, L + L_img, C]
    img_ids = torch.cat([cond.latent_ids, cond.image_ids], dim=0).to(device=device, dtype=dtype)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    timestep = _per_sample(sigma, b, 1, out_dtype).to(device=device)  # [B]
    g = None
    if guidance is not None and _guidance_embeds(transformer):
        g = torch.full((b,), float(guidance), dtype=out_dtype, device=device)
    out = transformer(
        hidden_states=hidden,
        timestep=timestep,
        guidance=g,
        pooled_projections=cond.pooled_prompt_embeds.to(device=device, dtype=dtype).unsqueeze(0).expand(b, -1),
        encoder_hidden_states=cond.prompt_embeds.to(device=device, dtype=dtype).unsqueeze(0).expand(b, -1, -1),
        txt_ids=cond.text_ids.to(device=device, dtype=dtype),
        img_ids=img_ids,
        return_dict=False,
    )[0]
    return out[:, :seq].to(out_dtype)


class FluxKontextPolicy:
    """FLUX.1-Kontext as a stochastic policy over latent trajectories.

    The actor uses the full pipeline (text encoders, VAE) to encode conditions, sample groups and decode;
    the learner loads only the transformer (`with_pipeline=False`) and calls `flux_velocity` + `flow_sde_step`.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        scheduler_config: dict[str, Any],
        pipeline: Any | None = None,
        max_sequence_length: int = 32,
        sampler: FlowSampler | None = None,
    ) -> None:
        self.transformer = transformer
        self.sampler = sampler or FlowSampler()
        self.scheduler_config = dict(scheduler_config)
        self.pipeline = pipeline
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        with_pipeline: bool = True,
        lora: LoraSpec | None = None,
        torch_dtype: torch.dtype = torch.float32,
        max_sequence_length: int = 32,
        sampler: FlowSampler | None = None,
    ) -> FluxKontextPolicy:
        """Load from a diffusers directory (or model id). LoRA, if given, is injected with B = 0."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel

        pipe = None
        if with_pipeline:
            pipe = FluxKontextPipeline.from_pretrained(str(path), dtype=torch_dtype)
            pipe.set_progress_bar_config(disable=True)
            transformer = pipe.transformer
            sched_cfg = dict(pipe.scheduler.config)
        else:
            transformer = FluxTransformer2DModel.from_pretrained(str(path), subfolder="transformer", dtype=torch_dtype)
            sched_cfg = dict(FlowMatchEulerDiscreteScheduler.load_config(str(path), subfolder="scheduler"))
        transformer.eval()
        if lora is not None:
            add_lora(transformer, lora)
        return cls(transformer, sched_cfg, pipe, max_sequence_length=max_sequence_length, sampler=sampler)

    def _pipe(self) -> Any:
        if self.pipeline is None:
            raise RuntimeError("this policy was loaded with with_pipeline=False")
        return self.pipeline

    @property
    def device(self) -> torch.device:
        """Device of the transformer parameters."""
        return next(self.transformer.parameters()).device

    @torch.no_grad()
    def encode_condition(self, instruction: str, source: Any) -> GroupCondition:
        """Encode (instruction, PIL source image) without Kontext's ~1 MP auto-resize.

        The output size is the source size rounded down to a multiple of 2 x vae_scale_factor.
        """
        pipe = self._pipe()
        device = self.device
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=instruction, prompt_2=None, device=device, max_sequence_length=self.max_sequence_length
        )
        multiple_of = pipe.vae_scale_factor * 2
        width, height = source.size
        width, height = width // multiple_of * multiple_of, height // multiple_of * multiple_of
        if width == 0 or height == 0:
            raise ValueError(f"source image {source.size} smaller than {multiple_of}px")
        image = pipe.image_processor.resize(source, height, width)
        image = pipe.image_processor.preprocess(image, height, width)  # [1, 3, H, W] in [-1, 1]
        c = self.transformer.config.in_channels
        seq = (height // multiple_of) * (width // multiple_of)
        dummy = torch.zeros(1, seq, c, device=device, dtype=prompt_embeds.dtype)  # avoids consuming the global RNG
        _, image_latents, latent_ids, image_ids = pipe.prepare_latents(
            image, 1, c // 4, height, width, prompt_embeds.dtype, device, None, dummy
        )
        f = self.dtype
        return GroupCondition(
            prompt_embeds=prompt_embeds[0].to(f),
            pooled_prompt_embeds=pooled[0].to(f),
            text_ids=text_ids.to(f),
            image_latents=image_latents[0].to(f),
            latent_ids=latent_ids.to(f),
            image_ids=image_ids.to(f),
            height=height,
            width=width,
        )

    @property
    def dtype(self) -> torch.dtype:
        """The sampler's and the recompute's dtype: float64 for a float64 transformer, else float32."""
        return torch.float64 if param_dtype(self.transformer) == torch.float64 else torch.float32

    def initial_noise(self, cond: GroupCondition, group_size: int, generator: torch.Generator | None) -> torch.Tensor:
        """x_0 [G, L, C] (``self.dtype``) drawn like the pipeline (randn in [G, C/4, h, w], then packed)."""
        c = self.transformer.config.in_channels
        lh, lw = cond.latent_ids[:, 1].max().int().item() + 1, cond.latent_ids[:, 2].max().int().item() + 1
        noise = torch.randn((group_size, c // 4, 2 * lh, 2 * lw), generator=generator, dtype=self.dtype)
        noise = noise.view(group_size, c // 4, lh, 2, lw, 2).permute(0, 2, 4, 1, 3, 5)
        return noise.reshape(group_size, lh * lw, c).to(self.device)

    @torch.no_grad()
    def sample_group(
        self,
        cond: GroupCondition,
        group_size: int,
        num_steps: int,
        noise_level: float,
        guidance: float,
        generator: torch.Generator | None = None,
        sde_type: str = "sde",
        window: tuple[int, int] | None = None,
    ) -> Trajectory:
        """Sample G trajectories of one condition; ONE batched transformer forward per step.

        Steps ``start <= i < end`` of ``window`` (default: all) take the stochastic ``sde_type`` step and are stored;
        the others are deterministic ODE steps ``x + v dt`` (no noise drawn, nothing stored).
        """
        sigmas = flux_schedule(num_steps, cond.seq_len, self.scheduler_config)  # [N+1]
        start, end = window if window is not None else (0, num_steps)
        step = STEPS[sde_type]
        x = self.initial_noise(cond, group_size, generator)  # [G, L, C]
        xs: list[torch.Tensor] = []
        lps = []
        for i in range(num_steps):
            v = flux_velocity(self.transformer, x, sigmas[i], cond, guidance)
            if start <= i < end:
                if i == start:
                    xs.append(x)
                x, lp, _, _ = step(x, v, sigmas[i], sigmas[i + 1], noise_level, generator=generator)
                xs.append(x)
                lps.append(lp)
            else:
                x = x.to(v.dtype) + v * (sigmas[i + 1] - sigmas[i])
        return Trajectory(
            latents=torch.stack(xs, dim=1).cpu(),  # [G, K+1, L, C]
            log_probs=torch.stack(lps, dim=1).cpu(),  # [G, K]
            sigmas=sigmas,
            noise_level=float(noise_level),
            guidance=float(guidance),
            start=start,
            final=x.cpu(),
        )

    # -- the family interface (editrl.common.families.base) ------------------------------------------------------------

    family = "flow"
    progress = 0  # the policy version the actor samples with (set by the actor): moves a sliding SDE window

    def sample(self, instruction: str, source: Any, group_size: int, generator: torch.Generator) -> Rollout:
        """G edits as a :class:`~editrl.common.families.base.Rollout` with the sampler settings of ``self.sampler``."""
        cfg = self.sampler
        cond = self.encode_condition(instruction, source)
        if cfg.sde_type == ODE:
            return self._sample_ode(cond, group_size, generator)
        window = None
        if cfg.sde_window:
            rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            window = sde_window(cfg.num_steps, cfg.sde_window, cfg.sde_window_range, rng, cfg.sde_window_schedule,
                                self.progress, cfg.sde_window_shift_every)  # fmt: skip
        traj = self.sample_group(
            cond, group_size, cfg.num_steps, cfg.noise_level, cfg.guidance, generator, cfg.sde_type, window
        )
        trained = traj.log_probs.shape[1] if window else cfg.num_steps - 1  # never the last, near-noiseless step
        assert traj.final is not None
        return Rollout(
            family="flow",
            traj={"latents": np.ascontiguousarray(traj.latents[:, : trained + 1].numpy())},
            log_probs=np.ascontiguousarray(traj.log_probs[:, :trained].numpy()),
            cond={**cond.to_arrays(), "sigmas": traj.sigmas.numpy()},
            params={
                "noise_level": float(cfg.noise_level),
                "guidance": float(cfg.guidance),
                "sde_type": cfg.sde_type,
                "start": traj.start,
                "height": cond.height,
                "width": cond.width,
            },
            images=self.decode(traj.final, cond.height, cond.width),
        )

    def _sample_ode(self, cond: GroupCondition, group_size: int, generator: torch.Generator) -> Rollout:
        """G edits by the deterministic ODE, as an ODE group (:mod:`~editrl.common.families.flow_ode`)."""
        cfg = self.sampler
        sigmas = flux_schedule(cfg.num_steps, cond.seq_len, self.scheduler_config)  # [N+1]
        x = self.initial_noise(cond, group_size, generator)  # [G, L, C]
        final = ode_sample(lambda x, i: flux_velocity(self.transformer, x, sigmas[i], cond, cfg.guidance), x, sigmas)
        traj, log_probs = ode_rollout(final)
        params = {"guidance": float(cfg.guidance), "sde_type": ODE, "height": cond.height, "width": cond.width}
        arrays = {**cond.to_arrays(), "sigmas": sigmas.numpy()}
        images = self.decode(final, cond.height, cond.width)
        return Rollout(family="flow", traj=traj, log_probs=log_probs, cond=arrays, params=params, images=images)

    def velocity(
        self, model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, np.ndarray],
        params: dict[str, Any],
    ) -> torch.Tensor:  # fmt: skip
        """The velocity [B, L, C] of ``model`` at latents ``x`` [B, L, C] and noise levels ``sigma`` [B], with a stored
        group's condition and guidance: the transformer call of :meth:`recompute` (the ``nft`` objective's hook)."""
        condition = GroupCondition.from_arrays(cond, height=params["height"], width=params["width"])
        return flux_velocity(model, x, sigma, condition, params["guidance"])

    def recompute(
        self, model: torch.nn.Module, traj: dict[str, np.ndarray], cond: dict[str, np.ndarray], params: dict[str, Any]
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(u, log_prob [G, 1])`` for every stored step, the whole group in one forward, as the actor ran it."""
        for step in self.recompute_steps(model, traj, cond, params):
            yield step.start, step.log_prob

    def recompute_steps(
        self, model: torch.nn.Module, traj: dict[str, np.ndarray], cond: dict[str, np.ndarray], params: dict[str, Any]
    ) -> Iterator[FlowStep]:
        """:meth:`recompute` with each step's transition (mean [G, L, C], std, dt): one code path for both."""
        condition = GroupCondition.from_arrays(cond, height=params["height"], width=params["width"])
        latents = torch.from_numpy(_float_copy(traj["latents"]))  # [G, S+1, L, C]
        sigmas = torch.from_numpy(np.array(cond["sigmas"], dtype=np.float32))  # [N+1]
        step, start = STEPS[params["sde_type"]], int(params["start"])
        for u in range(latents.shape[1] - 1):
            j = start + u
            sigma, sigma_next = float(sigmas[j]), float(sigmas[j + 1])
            v = flux_velocity(model, latents[:, u], sigma, condition, params["guidance"])
            _, log_prob, mean, std = step(
                latents[:, u], v, sigma, sigma_next, params["noise_level"], prev_sample=latents[:, u + 1]
            )
            yield FlowStep(u, log_prob[:, None], mean, std, sigma_next - sigma)

    def check_group(self, group: wire.RolloutGroup) -> str | None:
        """None if :meth:`recompute` can use ``group``, else a short reason naming the field. Static: shapes from the
        transformer's config, dtypes, the schedule; the model never runs (see :mod:`editrl.common.families.check`).
        With the ODE sampler (``nft``) only ODE groups pass, and only SDE/CPS groups without it."""
        ode = self.sampler.sde_type == ODE
        reasons = (mode_reasons(group, ode), common_reasons(group, _ODE_SPEC if ode else _GROUP_SPEC))
        return first_reason(chain(*reasons, self._group_reasons(group, ode)))

    def _group_reasons(self, group: wire.RolloutGroup, ode: bool) -> Iterator[str]:
        cfg, traj, cond, params = self.transformer.config, group.traj, group.cond, group.params
        dtype = "float64" if self.dtype == torch.float64 else "float32"
        floats = {} if ode else {"log_probs": group.log_probs, "traj['latents']": traj["latents"]}
        for label, arr in {**floats, **{f"cond[{k!r}]": cond[k] for k in GroupCondition._FIELDS}}.items():
            if arr.dtype.name != dtype:
                yield f"{label} dtype {arr.dtype.name} is not the model's {dtype}"
        axes, c = len(cfg.axes_dims_rope), cfg.in_channels
        yield from shapes_reasons("cond", cond, {
            "prompt_embeds": [("T", None), ("D", cfg.joint_attention_dim)],
            "pooled_prompt_embeds": [("P", cfg.pooled_projection_dim)],
            "latent_ids": [("L", None), ("axes", axes)],
            "image_latents": [("L_img", None), ("C", c)],
            "sigmas": [("N+1", None)],
        })  # fmt: skip
        t, seq, seq_img = (cond[k].shape[0] for k in ("prompt_embeds", "latent_ids", "image_latents"))
        yield from shapes_reasons("cond", cond, {"text_ids": [("T", t), ("axes", axes)]})
        yield from shapes_reasons("cond", cond, {"image_ids": [("L_img", seq_img), ("axes", axes)]})
        for name in ("height", "width"):
            if params[name] < 1:
                yield f"params[{name!r}] = {params[name]} is not a positive size"
        if ode:
            yield from ode_reasons(group, dtype, seq, c)
            return
        g = group.log_probs.shape[0]
        yield from shapes_reasons("traj", traj, {"latents": [("G", g), ("S+1", None), ("L", seq), ("C", c)]})
        s = traj["latents"].shape[1] - 1
        reason = units_reason(group.log_probs, s, f"S+1 = {s + 1} latents in traj['latents']")
        if reason:
            yield reason
        reason = schedule_reason(cond["sigmas"], int(params["start"]), s, params["sde_type"], params["noise_level"])
        if reason:
            yield reason

    def shard_units(self) -> list[torch.nn.Module]:
        """The double- and single-stream transformer blocks (FSDP2 units)."""
        return [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]

    def trainable_module(self) -> torch.nn.Module:
        return self.transformer

    @property
    def model(self) -> torch.nn.Module:
        return self.transformer

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int | None = None, width: int | None = None) -> list[Any]:
        """Packed latents [B, L, C] -> list of PIL images. Size defaults to a square from L."""
        pipe = self._pipe()
        m = pipe.vae_scale_factor * 2
        if height is None or width is None:
            side = int(round(math.sqrt(latents.shape[1])))
            height = width = side * m
        vae = pipe.vae
        z = pipe._unpack_latents(latents.to(device=self.device, dtype=vae.dtype), height, width, pipe.vae_scale_factor)
        z = z / vae.config.scaling_factor + vae.config.shift_factor  # [B, C/4, h, w]
        image = vae.decode(z, return_dict=False)[0]  # [B, 3, H, W] in ~[-1, 1]
        return pipe.image_processor.postprocess(image, output_type="pil")


# What FluxKontextPolicy.recompute reads (the shapes and the model dtype are checked by check_group itself).
_GROUP_SPEC = GroupSpec(
    family="flow",
    traj={"latents": FLOATS},
    cond={**dict.fromkeys(GroupCondition._FIELDS, FLOATS), "sigmas": ("float32",)},
    params={
        "noise_level": "number", "guidance": "number", "sde_type": "string", "start": "integer", "height": "integer",
        "width": "integer",
    },
)  # fmt: skip
# What an ODE group (sde_type "ode", the nft objective) carries instead: the final latents, no noise level or window.
_ODE_PARAMS = {k: _GROUP_SPEC.params[k] for k in ("guidance", "sde_type", "height", "width")}
_ODE_SPEC = dataclasses.replace(_GROUP_SPEC, traj={"x0": FLOATS}, params=_ODE_PARAMS)


def load_flux_kontext(policy_cfg: Any, *, with_pipeline: bool) -> FluxKontextPolicy:
    """The FLUX.1-Kontext policy for a ``config.PolicyConfig`` (see :func:`editrl.common.families.base.load_policy`)."""
    s = policy_cfg.sampler
    window_range = tuple(s.sde_window_range) if s.sde_window_range else None
    sampler = FlowSampler(s.num_steps, s.noise_level, s.guidance, s.sde_type, s.sde_window, window_range,
                          s.sde_window_schedule, s.sde_window_shift_every)  # fmt: skip
    lora = LoraSpec(rank=policy_cfg.lora.rank, alpha=policy_cfg.lora.alpha)
    return FluxKontextPolicy.from_pretrained(
        policy_cfg.model, with_pipeline=with_pipeline, lora=lora, sampler=sampler,
        torch_dtype=getattr(torch, policy_cfg.dtype),
    )  # fmt: skip
