"""DDIM editing policy (InstructPix2Pix) shared by the actor and the learner: the ``ddim`` family.

Conventions (DDPO, see docs REFERENCE-MATH section 3): timesteps count down (t = 1000 is noise), one DDIM step
with eta > 0 per sampler step, and every step is a trained unit (DDPO trains all of them). The log-prob of a step
is the Gaussian log-density of the stored next latent averaged over all non-batch elements, one scalar per sample
per step, as in ``flow_sde_step``. Everything numeric is float32.

InstructPix2Pix (diffusers' StableDiffusionInstructPix2PixPipeline): the UNet sees cat([x_t, image_latents]) on
channels (8 = 4 + 4); ``image_latents`` is the VAE mode of the source image and is NOT multiplied by the VAE
scaling factor. Guidance is 3-way, with one UNet forward on a batch of 3G ordered [text + image, image only
(empty prompt), unconditional (empty prompt, zero image latents)]:
``eps = eps_uncond + guidance (eps_text - eps_image) + image_guidance (eps_image - eps_uncond)``.

Shapes: G = group size, N = sampler steps, h, w = latent height/width (pixels / 8), T = text tokens, D = text
width.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch

from editrl.common import wire
from editrl.common.families.base import Rollout
from editrl.common.families.check import GroupSpec, common_reasons, first_reason, shapes_reasons, units_reason
from editrl.common.lora import LoraSpec, add_lora

__all__ = ["UNET_LORA_TARGETS", "InstructPix2PixPolicy", "ddim_step", "ip2p_guided_eps"]

# Attention projections of the UNet's transformer blocks (self- and cross-attention).
UNET_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _per_sample_timesteps(timestep: int | torch.Tensor, batch: int) -> torch.Tensor:
    """int / [] / [B] timestep -> int64 CPU tensor [B]."""
    t = torch.as_tensor(timestep).reshape(-1).to(device="cpu", dtype=torch.long)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"timestep has {t.numel()} values for a batch of {batch}")
    return t


def ddim_step(
    scheduler: Any,
    eps: torch.Tensor,
    timestep: int | torch.Tensor,
    x: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DDIM step with eta > 0 and its Gaussian log-prob, as DDPO's ``ddim_step_with_logprob`` (float32).

    Args:
        scheduler: a diffusers DDIMScheduler after ``set_timesteps`` (its ``num_inference_steps`` sets the spacing).
        eps: guided epsilon prediction [B, ...]; cast to float32.
        timestep: current timestep t, an int or a tensor [] / [B].
        x: current latents x_t [B, ...]; cast to float32.
        eta: DDIM noise scale; must be > 0 (eta = 0 is deterministic and has no log-prob).
        prev_sample: the next latent to score [B, ...]; drawn as mean + std * z when None.
        generator: RNG for z (only used when prev_sample is None).

    Returns:
        prev_sample [B, ...] float32, log_prob [B] float32 (mean over non-batch elements of the Gaussian
        log-density of prev_sample.detach() under N(mean, std^2)), mean [B, ...] float32, std [B, 1, ...] float32.

    Math (DDIM eq. 12/16): t_prev = clamp(t - num_train_timesteps // num_inference_steps, 0, num_train_timesteps - 1),
    a_t = alphas_cumprod[t], a_p = alphas_cumprod[t_prev]; x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t), then clipped to
    +-clip_sample_range if config.clip_sample (or dynamically thresholded if config.thresholding);
    std = eta sqrt((1 - a_p) / (1 - a_t) (1 - a_t / a_p)); mean = sqrt(a_p) x0 + sqrt(1 - a_p - std^2) eps.
    Like DDPO, t_prev is clamped, so the last step targets alphas_cumprod[0] and never final_alpha_cumprod (which is
    1.0 with set_alpha_to_one and would make the last std 0). Gradients flow only through mean (i.e. through eps).
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0 for a log-prob, got {eta}")
    cfg = scheduler.config
    if cfg.prediction_type != "epsilon":
        raise ValueError(f"only prediction_type 'epsilon' is supported, got {cfg.prediction_type!r}")
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler.set_timesteps(num_steps) must be called before ddim_step")
    x = x.to(torch.float32)
    eps = eps.to(torch.float32)
    b, nd = x.shape[0], x.ndim
    t = _per_sample_timesteps(timestep, b)  # [B] int64
    t_prev = (t - cfg.num_train_timesteps // scheduler.num_inference_steps).clamp(0, cfg.num_train_timesteps - 1)
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32).cpu()
    bshape = (b, *([1] * (nd - 1)))
    a_t = alphas_cumprod[t].reshape(bshape).to(x.device)  # [B, 1, ...]
    a_p = alphas_cumprod[t_prev].reshape(bshape).to(x.device)  # [B, 1, ...]
    x0 = (x - torch.sqrt(1.0 - a_t) * eps) / torch.sqrt(a_t)
    if cfg.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    std = eta * torch.sqrt((1.0 - a_p) / (1.0 - a_t) * (1.0 - a_t / a_p))  # [B, 1, ...]
    direction_sq = 1.0 - a_p - std**2
    if not bool(torch.all(std > 0)) or not bool(torch.all(direction_sq >= 0)):
        raise ValueError(
            f"eta={eta} gives an invalid DDIM step at t={t.tolist()} (std must be > 0, std^2 <= 1 - a_prev)"
        )
    mean = torch.sqrt(a_p) * x0 + torch.sqrt(direction_sq) * eps
    if prev_sample is None:
        noise_device = generator.device if generator is not None else x.device
        z = torch.randn(x.shape, generator=generator, dtype=torch.float32, device=noise_device).to(x.device)
        prev_sample = mean + std * z
    prev_sample = prev_sample.to(torch.float32)
    lp = -((prev_sample.detach() - mean) ** 2) / (2.0 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    log_prob = lp.mean(dim=tuple(range(1, nd)))  # [B]
    return prev_sample, log_prob, mean, std


def _param_dtype(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32


def ip2p_guided_eps(
    unet: torch.nn.Module,
    x: torch.Tensor,
    timestep: int | torch.Tensor,
    prompt_embeds: torch.Tensor,
    uncond_embeds: torch.Tensor,
    image_latents: torch.Tensor,
    guidance: float,
    image_guidance: float,
) -> torch.Tensor:
    """3-way guided epsilon [G, 4, h, w] float32 for latents x [G, 4, h, w]: ONE UNet forward on a batch of 3G.

    prompt_embeds / uncond_embeds [T, D] (instruction / empty prompt), image_latents [4, h, w] (unscaled VAE mode).
    Batch order and combination are diffusers' InstructPix2Pix ones (module docstring); DDIM's scale_model_input is
    the identity, so x enters unscaled. Works with any module with UNet2DConditionModel's forward (LoRA, FSDP2).
    """
    g = x.shape[0]
    device = x.device
    dtype = _param_dtype(unet)
    text = prompt_embeds.to(device).unsqueeze(0).expand(g, -1, -1)  # [G, T, D]
    empty = uncond_embeds.to(device).unsqueeze(0).expand(g, -1, -1)  # [G, T, D]
    image = image_latents.to(device).unsqueeze(0).expand(g, -1, -1, -1)  # [G, 4, h, w]
    embeds = torch.cat([text, empty, empty], dim=0)  # [3G, T, D]
    images = torch.cat([image, image, torch.zeros_like(image)], dim=0)  # [3G, 4, h, w]
    model_input = torch.cat([torch.cat([x, x, x], dim=0), images], dim=1)  # [3G, 8, h, w]
    t = torch.as_tensor(timestep, dtype=torch.long, device=device).reshape(())
    out = unet(model_input.to(dtype), t, encoder_hidden_states=embeds.to(dtype), return_dict=False)[0]
    eps_text, eps_image, eps_uncond = out.to(torch.float32).chunk(3)
    return eps_uncond + guidance * (eps_text - eps_image) + image_guidance * (eps_image - eps_uncond)


_COND_FLOATS = ("prompt_embeds", "uncond_embeds", "image_latents")


def _tensor(arr: np.ndarray, dtype: type) -> torch.Tensor:
    """A writable copy (arrays decoded from the wire are read-only views of the received frames)."""
    return torch.from_numpy(np.array(arr, dtype=dtype, copy=True))


def _cond_tensors(cond: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Stored per-group arrays -> float32 tensors on `device` plus int64 CPU `timesteps` [N]."""
    f32 = {k: _tensor(cond[k], np.float32).to(device) for k in _COND_FLOATS}
    return {**f32, "timesteps": _tensor(cond["timesteps"], np.int64)}


_F32 = ("float32",)
# What InstructPix2PixPolicy.recompute reads, in the dtypes sample stores (the shapes are checked by check_group).
_GROUP_SPEC = GroupSpec(
    family="ddim",
    traj={"latents": _F32},
    cond={**dict.fromkeys(_COND_FLOATS, _F32), "timesteps": ("int64",)},
    params={"eta": "number", "guidance": "number", "image_guidance": "number"},
)


class InstructPix2PixPolicy:
    """InstructPix2Pix with a DDIM (eta > 0) sampler as a stochastic policy over latent trajectories.

    Implements both ActorPolicy and LearnerPolicy (common/families/base.py). The actor uses the full pipeline (text
    encoder, VAE) to encode conditions, sample groups and decode; the learner loads only the UNet and the scheduler
    config (`with_pipeline=False`) and recomputes with `ip2p_guided_eps` + `ddim_step`. The recompute reads eta and
    the guidance scales from the rollout's params, never from this object, so the actor's settings always win.
    """

    family = "ddim"

    def __init__(
        self,
        unet: torch.nn.Module,
        scheduler_config: dict[str, Any],
        pipeline: Any | None = None,
        *,
        num_steps: int = 20,
        eta: float = 1.0,
        guidance: float = 7.5,
        image_guidance: float = 1.5,
    ) -> None:
        from diffusers import DDIMScheduler

        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if eta <= 0:
            raise ValueError(f"eta must be > 0 (eta = 0 has no log-prob), got {eta}")
        self.model = unet
        self.scheduler_config = dict(scheduler_config)
        self.scheduler = DDIMScheduler.from_config(self.scheduler_config)
        self.pipeline = pipeline
        self.num_steps = num_steps
        self.eta = float(eta)
        self.guidance = float(guidance)
        self.image_guidance = float(image_guidance)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        with_pipeline: bool = True,
        lora: LoraSpec | None = None,
        num_steps: int = 20,
        eta: float = 1.0,
        guidance: float = 7.5,
        image_guidance: float = 1.5,
        torch_dtype: torch.dtype = torch.float32,
    ) -> InstructPix2PixPolicy:
        """Load from a diffusers directory (or model id); LoRA, if given, is injected into the UNet with B = 0.

        Pass ``LoraSpec(target_modules=list(UNET_LORA_TARGETS))`` for the UNet's attention projections. Actor and
        learner both build their DDIMScheduler from the checkpoint's raw scheduler config, so they agree on
        clip_sample / steps_offset / spacing whatever scheduler class the checkpoint ships.
        """
        from diffusers import DDIMScheduler, StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

        sched_cfg = dict(DDIMScheduler.load_config(str(path), subfolder="scheduler"))
        pipe = None
        if with_pipeline:
            pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(path), dtype=torch_dtype)
            pipe.set_progress_bar_config(disable=True)
            pipe.scheduler = DDIMScheduler.from_config(sched_cfg)
            unet = pipe.unet
        else:
            unet = UNet2DConditionModel.from_pretrained(str(path), subfolder="unet", dtype=torch_dtype)
        unet.eval()
        if lora is not None:
            add_lora(unet, lora)
        return cls(
            unet,
            sched_cfg,
            pipe,
            num_steps=num_steps,
            eta=eta,
            guidance=guidance,
            image_guidance=image_guidance,
        )

    # ------------------------------------------------------------------------------------------- both sides

    def trainable_module(self) -> torch.nn.Module:
        """The LoRA UNet."""
        return self.model

    def shard_units(self) -> list[torch.nn.Module]:
        """The UNet's down, mid and up blocks, to ``fully_shard`` one by one before the root."""
        unet = self.model
        return [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]

    @property
    def device(self) -> torch.device:
        """Device of the UNet parameters."""
        return next(self.model.parameters()).device

    def scheduler_for(self, timesteps: torch.Tensor) -> Any:
        """The DDIMScheduler set to len(timesteps) steps; raises ValueError unless it yields exactly `timesteps`."""
        n = int(timesteps.shape[0])
        if self.scheduler.num_inference_steps != n:
            self.scheduler.set_timesteps(n)
        if not torch.equal(self.scheduler.timesteps.to(torch.long).cpu(), timesteps.to(torch.long).cpu()):
            raise ValueError(
                f"stored timesteps {timesteps.tolist()} differ from this scheduler's {self.scheduler.timesteps.tolist()}"
            )
        return self.scheduler

    # ------------------------------------------------------------------------------------------- actor

    def _pipe(self) -> Any:
        if self.pipeline is None:
            raise RuntimeError("this policy was loaded with with_pipeline=False")
        return self.pipeline

    @torch.no_grad()
    def encode_condition(self, instruction: str, source: Any) -> dict[str, torch.Tensor]:
        """prompt_embeds [T, D] and uncond_embeds [T, D] (empty prompt), image_latents [4, h, w] (float32).

        Exactly the pipeline's encoding: `_encode_prompt` with CFG ([prompt, empty, empty]), `image_processor.preprocess`
        (size rounded down to a multiple of vae_scale_factor) and `prepare_image_latents` (VAE mode, unscaled).
        """
        pipe = self._pipe()
        device = self.device
        embeds = pipe._encode_prompt(instruction, device, 1, True)  # [3, T, D]: [prompt, empty, empty]
        image = pipe.image_processor.preprocess(source)  # [1, 3, H, W] in [-1, 1]
        image_latents = pipe.prepare_image_latents(image, 1, 1, embeds.dtype, device, False)  # [1, 4, h, w]
        f32 = torch.float32
        return {
            "prompt_embeds": embeds[0].to(f32),
            "uncond_embeds": embeds[1].to(f32),
            "image_latents": image_latents[0].to(f32),
        }

    @torch.no_grad()
    def sample(self, instruction: str, source: Any, group_size: int, generator: torch.Generator) -> Rollout:
        """G DDIM trajectories of one (instruction, source) pair; ONE batched UNet forward (3G) per step."""
        cond = self.encode_condition(instruction, source)
        scheduler = self.scheduler
        scheduler.set_timesteps(self.num_steps)
        timesteps = scheduler.timesteps.to(torch.long).cpu()  # [N]
        _, h, w = cond["image_latents"].shape
        x = torch.randn((group_size, 4, h, w), generator=generator, dtype=torch.float32).to(self.device)
        x = x * scheduler.init_noise_sigma  # as the pipeline's prepare_latents (1.0 for DDIM)
        xs, lps = [x], []
        for t in timesteps:
            eps = ip2p_guided_eps(self.model, x, t, **cond, guidance=self.guidance, image_guidance=self.image_guidance)
            x, lp, _, _ = ddim_step(scheduler, eps, t, x, self.eta, generator=generator)
            xs.append(x)
            lps.append(lp)
        latents = torch.stack(xs, dim=1).cpu()  # [G, N+1, 4, h, w]
        return Rollout(
            family=self.family,
            traj={"latents": latents.numpy()},
            log_probs=torch.stack(lps, dim=1).cpu().numpy(),  # [G, N]
            cond={**{k: v.cpu().numpy() for k, v in cond.items()}, "timesteps": timesteps.numpy()},
            params={"eta": self.eta, "guidance": self.guidance, "image_guidance": self.image_guidance},
            images=self.decode(latents[:, -1]),
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Any]:
        """Denoised latents [B, 4, h, w] (scaled, as sampled) -> list of PIL images, as the pipeline decodes."""
        pipe = self._pipe()
        vae = pipe.vae
        z = latents.to(device=self.device, dtype=vae.dtype) / vae.config.scaling_factor
        image = vae.decode(z, return_dict=False)[0]  # [B, 3, H, W] in ~[-1, 1]
        return pipe.image_processor.postprocess(image, output_type="pil")

    # ------------------------------------------------------------------------------------------- learner

    def recompute(
        self, model: torch.nn.Module, traj: dict[str, np.ndarray], cond: dict[str, np.ndarray], params: dict[str, float]
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Chunks ``(j, log_prob [G, 1])`` for steps j = 0..N-1, with gradients through ``model``.

        Same batching (3G in one forward per step), dtype and inputs as `sample`, so with the actor's weights the
        result equals the stored log-probs bit for bit.
        """
        device = next(model.parameters()).device
        latents = _tensor(traj["latents"], np.float32).to(device)  # [G, N+1, 4, h, w]
        c = _cond_tensors(cond, device)
        timesteps = c.pop("timesteps")  # [N] int64
        if latents.shape[1] != timesteps.shape[0] + 1:
            raise ValueError(f"latents hold {latents.shape[1]} states for {timesteps.shape[0]} steps (want N+1)")
        scheduler = self.scheduler_for(timesteps)
        eta, guidance, image_guidance = float(params["eta"]), float(params["guidance"]), float(params["image_guidance"])
        for j, t in enumerate(timesteps):
            eps = ip2p_guided_eps(model, latents[:, j], t, **c, guidance=guidance, image_guidance=image_guidance)
            _, lp, _, _ = ddim_step(scheduler, eps, t, latents[:, j], eta, prev_sample=latents[:, j + 1])
            yield j, lp.unsqueeze(1)

    def check_group(self, group: wire.RolloutGroup) -> str | None:
        """None if :meth:`recompute` can use ``group``, else a short reason naming the field. Static: shapes from the
        UNet's config and the source's image latents, the timesteps against this scheduler's, the DDIM step's own
        argument checks on zeros; the model never runs (see :mod:`editrl.common.families.check`)."""
        return first_reason(chain(common_reasons(group, _GROUP_SPEC), self._group_reasons(group)))

    def _group_reasons(self, group: wire.RolloutGroup) -> Iterator[str]:
        cfg, traj, cond = self.model.config, group.traj, group.cond
        if group.log_probs.dtype != np.float32:
            yield f"log_probs dtype {group.log_probs.dtype.name} is not float32"
        d = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else None  # per-block dims: any
        yield from shapes_reasons("cond", cond, {"prompt_embeds": [("T", None), ("D", d)]})
        t = cond["prompt_embeds"].shape
        yield from shapes_reasons("cond", cond, {"uncond_embeds": [("T", t[0]), ("D", t[1])]})
        c_img = cfg.in_channels - cfg.out_channels  # the UNet sees cat([x_t, image_latents]) on channels
        yield from shapes_reasons("cond", cond, {"image_latents": [("C_img", c_img), ("h", None), ("w", None)]})
        yield from shapes_reasons("cond", cond, {"timesteps": [("N", None)]})
        (n,), (_, h, w) = cond["timesteps"].shape, cond["image_latents"].shape
        g, c = group.log_probs.shape[0], cfg.out_channels
        yield from shapes_reasons("traj", traj, {"latents": [("G", g), ("N+1", n + 1), ("C", c), ("h", h), ("w", w)]})
        reason = units_reason(group.log_probs, n, f"N = {n} steps in cond['timesteps']")
        if reason:
            yield reason
        timesteps = torch.from_numpy(np.array(cond["timesteps"], dtype=np.int64))
        try:
            scheduler = self.scheduler_for(timesteps)
        except ValueError as exc:
            yield f"cond['timesteps']: {exc}"
        zeros = torch.zeros(n, 1)
        try:
            ddim_step(scheduler, zeros, timesteps, zeros, float(group.params["eta"]), prev_sample=zeros)
        except ValueError as exc:
            yield f"params['eta']: {exc}"


def load_instruct_pix2pix(policy_cfg: Any, *, with_pipeline: bool) -> InstructPix2PixPolicy:
    """The InstructPix2Pix policy for a ``config.PolicyConfig`` (see :func:`editrl.common.families.base.load_policy`)."""
    s = policy_cfg.sampler
    lora = LoraSpec(rank=policy_cfg.lora.rank, alpha=policy_cfg.lora.alpha, target_modules=list(UNET_LORA_TARGETS))
    return InstructPix2PixPolicy.from_pretrained(
        policy_cfg.model, with_pipeline=with_pipeline, lora=lora, num_steps=s.num_steps, eta=s.eta,
        guidance=s.guidance, image_guidance=s.image_guidance,
    )  # fmt: skip
