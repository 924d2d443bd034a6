"""The tiny FLUX.1-Kontext editor, trained on this CPU so that it starts sane: it keeps the source's shapes and
roughly follows "make it red / blue / green / darker / brighter" before any RL.

Two stages, both on procedural data (:mod:`editrl.common.procedural`), nothing downloaded:
1. a tiny ``AutoencoderKL`` (2 blocks: vae_scale_factor 2; 8 latent channels) learns to reconstruct procedural sources
   and their intended edits (MSE on [-1, 1] pixels, posterior mean, a tiny KL term); its ``scaling_factor`` and
   ``shift_factor`` are then set from the latents' statistics so the transformer sees unit-variance latents;
2. the ``FluxTransformer2DModel`` learns by flow matching, with the pipeline's own conventions (packed 2x2 latents,
   Kontext's source tokens concatenated after the target tokens with first position id 1, ``timestep = sigma``, the
   embedded guidance): ``x_s = (1 - s) x_0 + s e``, target velocity ``e - x_0``, ``x_0`` the intended edit's latents,
   conditioned on the source's latents and the instruction. The text encoders stay random and frozen (they only
   need to tell the instructions apart).
The result is a ``FluxKontextPipeline`` saved with ``save_pretrained`` (loaded by the same code as a real checkpoint)
plus ``editrl_tiny.json`` (recipe, seed, measured losses) and ``SHA256SUMS``.

Float32 training gives different weights on different CPUs (vectorised kernels round differently), so the project
commits the checkpoint it trained (``models/tiny-flux-kontext-editor``, see its README) and loads that by default;
rebuilding it is ``python -m editrl.common.families.tiny.train_editor OUT [--seed 0]`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from editrl.common.families.tiny.flux_kontext import tiny_scheduler, tiny_text_parts
from editrl.common.procedural import QUICKSTART_INSTRUCTIONS, draw_source_image, intended_edit

__all__ = ["Recipe", "train_tiny_editor", "write_checksums", "verify_checksums"]


@dataclass(frozen=True)
class Recipe:
    """Sizes and schedules of the trained tiny editor (the defaults are what the committed checkpoint used)."""

    size: int = 32  # image side in pixels (the quickstart data is made at this size)
    latent_channels: int = 8
    vae_channels: tuple[int, ...] = (16, 32)  # one entry per VAE block: vae_scale_factor = 2 ** (len - 1)
    vae_steps: int = 3000
    vae_batch: int = 8
    vae_lr: float = 2e-3
    pool: int = 2048  # procedural training images / triples
    layers: int = 2  # transformer double-stream blocks
    single_layers: int = 2
    heads: int = 2
    head_dim: int = 32
    dit_steps: int = 3000
    dit_batch: int = 16
    dit_lr: float = 1e-3
    guidance: float = 2.5  # the embedded guidance the demo samples with
    strength_range: tuple[float, float] = (0.45, 0.65)  # intended-edit strengths of the training targets


def _pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1], as the pipeline's image processor makes them."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _triples(recipe: Recipe, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sources [N, H, W, 3], intended edits [N, H, W, 3], instruction index [N]) on held-out procedural seeds."""
    instructions = list(QUICKSTART_INSTRUCTIONS)
    sources, targets, which = [], [], []
    for _ in range(recipe.pool):
        src = draw_source_image(np.random.default_rng([1, int(rng.integers(1 << 30))]), recipe.size)
        k = int(rng.integers(len(instructions)))
        sources.append(src)
        targets.append(intended_edit(src, instructions[k], float(rng.uniform(*recipe.strength_range))))
        which.append(k)
    return np.stack(sources), np.stack(targets), np.asarray(which)


def _train_vae(recipe: Recipe, images: torch.Tensor, seed: int, log: Any) -> tuple[Any, float]:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 1)
    blocks = len(recipe.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=recipe.vae_channels,
        layers_per_block=1,
        latent_channels=recipe.latent_channels,
        norm_num_groups=4,
        sample_size=recipe.size,
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    opt = torch.optim.Adam(vae.parameters(), lr=recipe.vae_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.vae_lr, total_steps=recipe.vae_steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed + 11)
    loss = torch.tensor(float("nan"))
    for step in range(recipe.vae_steps):
        x = images[torch.randint(0, len(images), (recipe.vae_batch,), generator=gen)]
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        posterior = vae.encode(x).latent_dist
        loss = ((vae.decode(posterior.mode()).sample - x) ** 2).mean() + 1e-7 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        log(f"vae {step + 1}/{recipe.vae_steps} loss {loss.item():.4f}", step, recipe.vae_steps)
    return vae.eval(), float(loss)


def _encode(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Posterior means [N, c, h, w] (what the pipeline's ``retrieve_latents(..., 'argmax')`` returns), in batches."""
    with torch.no_grad():
        return torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mode() for i in range(0, len(pixels), 256)])


def _build_transformer(recipe: Recipe, seed: int) -> Any:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    third = recipe.head_dim // 4
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=recipe.latent_channels * 4,
        out_channels=None,
        num_layers=recipe.layers,
        num_single_layers=recipe.single_layers,
        attention_head_dim=recipe.head_dim,
        num_attention_heads=recipe.heads,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(recipe.head_dim - 3 * third, third + third // 2, third + third - third // 2),
    )


def _train_transformer(
    recipe: Recipe, pipe: Any, src_lat: torch.Tensor, tgt_lat: torch.Tensor, which: np.ndarray, seed: int, log: Any
) -> float:
    """Flow matching of ``pipe.transformer`` on packed latents [N, L, C] (see the module docstring)."""
    transformer = pipe.transformer.train()
    with torch.no_grad():
        prompts = [pipe.encode_prompt(prompt=t, prompt_2=None, max_sequence_length=32) for t in QUICKSTART_INSTRUCTIONS]
    embeds = torch.stack([p[0][0] for p in prompts])  # [K, T, D]
    pooled = torch.stack([p[1][0] for p in prompts])  # [K, P]
    text_ids = prompts[0][2]  # [T, 3]
    side = recipe.size // pipe.vae_scale_factor // 2
    latent_ids = pipe._prepare_latent_image_ids(1, side, side, "cpu", torch.float32)
    image_ids = latent_ids.clone()
    image_ids[:, 0] = 1  # Kontext: the source image's tokens
    img_ids = torch.cat([latent_ids, image_ids])
    which_t = torch.from_numpy(which)
    opt = torch.optim.AdamW(transformer.parameters(), lr=recipe.dit_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.dit_lr, total_steps=recipe.dit_steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed + 21)
    loss = torch.tensor(float("nan"))
    for step in range(recipe.dit_steps):
        idx = torch.randint(0, len(src_lat), (recipe.dit_batch,), generator=gen)
        x0, src, k = tgt_lat[idx], src_lat[idx], which_t[idx]
        # sigma: half uniform, half logit-normal (more weight mid-trajectory, as FLUX-style training does)
        u = torch.rand(recipe.dit_batch, generator=gen)
        logit_normal = torch.sigmoid(torch.randn(recipe.dit_batch, generator=gen))
        sigma = torch.where(torch.rand(recipe.dit_batch, generator=gen) < 0.5, u, logit_normal)
        noise = torch.randn(x0.shape, generator=gen)
        x_sigma = (1.0 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        pred = transformer(
            hidden_states=torch.cat([x_sigma, src], dim=1),
            timestep=sigma,
            guidance=torch.full((recipe.dit_batch,), recipe.guidance),
            pooled_projections=pooled[k],
            encoder_hidden_states=embeds[k],
            txt_ids=text_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0][:, : x0.shape[1]]
        loss = ((pred - (noise - x0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        log(f"transformer {step + 1}/{recipe.dit_steps} loss {loss.item():.4f}", step, recipe.dit_steps)
    transformer.eval()
    return float(loss)


def write_checksums(out: Path) -> str:
    """Write ``SHA256SUMS`` (every file below ``out`` but itself, sorted) and return the sha256 of that list."""
    lines = [
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(out).as_posix()}"
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "SHA256SUMS" and p.suffix != ".md"
    ]
    text = "\n".join(lines) + "\n"
    (out / "SHA256SUMS").write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


def verify_checksums(out: str | Path) -> list[str]:
    """The files of ``out`` whose sha256 differs from ``SHA256SUMS`` (or that are missing); [] when all match."""
    out = Path(out)
    bad = []
    for line in (out / "SHA256SUMS").read_text().splitlines():
        digest, _, name = line.partition("  ")
        path = out / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            bad.append(name)
    return bad


def train_tiny_editor(out_dir: str | Path, seed: int = 0, recipe: Recipe | None = None, progress: bool = True) -> Path:
    """Train the tiny editor and save it as a ``FluxKontextPipeline`` in ``out_dir``; returns the path."""
    from diffusers import FluxKontextPipeline

    recipe = recipe or Recipe()
    out = Path(out_dir)
    started = time.monotonic()
    bar = _progress(progress)
    rng = np.random.default_rng(seed)
    sources, targets, which = _triples(recipe, rng)
    vae, vae_loss = _train_vae(recipe, torch.cat([_pixels(sources), _pixels(targets)]), seed, bar)
    src_raw, tgt_raw = _encode(vae, _pixels(sources)), _encode(vae, _pixels(targets))
    both = torch.cat([src_raw, tgt_raw])
    shift, scale = float(both.mean()), float(1.0 / both.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    tokenizer, tokenizer_2, text_encoder, text_encoder_2 = tiny_text_parts(seed)
    pipe = FluxKontextPipeline(
        scheduler=tiny_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=_build_transformer(recipe, seed),
    )

    def pack(lat: torch.Tensor) -> torch.Tensor:
        b, c, h, w = lat.shape
        return pipe._pack_latents((lat - shift) * scale, b, c, h, w)

    dit_loss = _train_transformer(recipe, pipe, pack(src_raw), pack(tgt_raw), which, seed, bar)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    info = {
        "kind": "trained_flux_kontext_editor",
        "seed": seed,
        "recipe": asdict(recipe),
        "vae_final_mse": vae_loss,
        "transformer_final_loss": dit_loss,
        "train_seconds": round(time.monotonic() - started, 1),
        "torch": torch.__version__,
    }
    (out / "editrl_tiny.json").write_text(json.dumps(info, indent=2) + "\n")
    write_checksums(out)
    return out


def _progress(enabled: bool) -> Any:
    """A progress callback ``(text, step, total)`` printing one line every 5 % (nothing when disabled)."""

    def report(text: str, step: int, total: int) -> None:
        if enabled and ((step + 1) % max(1, total // 20) == 0 or step + 1 == total):
            print(text, flush=True)

    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage (to test the code path)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = Recipe(vae_steps=20, dit_steps=20, pool=64) if args.quick else Recipe()
    print(train_tiny_editor(args.out_dir, seed=args.seed, recipe=recipe))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
