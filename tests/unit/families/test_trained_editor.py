"""The tiny editor trained on a CPU (issue 12): its training code path, and the committed checkpoint starting sane.

The committed checkpoint (models/tiny-flux-kontext-editor) is float32 weights trained on one machine; the tests
below compare what it does with the metric's thresholds (SC above the identity edit's, structure >= 0.8), never
with numbers recorded on that machine. The golden and exactness tests keep the random-weight models.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from editrl.common.families.tiny.train_editor import Recipe, train_tiny_editor, verify_checksums
from editrl.common.procedural import QUICKSTART_INSTRUCTIONS


def test_the_training_code_path_saves_a_loadable_pipeline_with_checksums(tmp_path: Path) -> None:
    from diffusers import FluxKontextPipeline

    recipe = Recipe(vae_steps=3, dit_steps=3, pool=8, vae_batch=2, dit_batch=2)
    out = train_tiny_editor(tmp_path / "editor", seed=3, recipe=recipe, progress=False)
    info = json.loads((out / "editrl_tiny.json").read_text())
    assert info["kind"] == "trained_flux_kontext_editor" and info["seed"] == 3 and info["recipe"]["dit_steps"] == 3
    assert np.isfinite(info["vae_final_mse"]) and np.isfinite(info["transformer_final_loss"])
    assert verify_checksums(out) == []
    (out / "transformer" / "config.json").write_text((out / "transformer" / "config.json").read_text() + " ")
    assert verify_checksums(out) == ["transformer/config.json"]  # a changed file is named
    pipe = FluxKontextPipeline.from_pretrained(out)  # the loading code of a real checkpoint
    assert pipe.vae_scale_factor == 2 and pipe.vae.config.scaling_factor != 1.0  # latents scaled from their stats


def test_the_committed_editor_edits_and_keeps_the_shapes_before_rl(trained_tiny_model_dir: Path) -> None:
    """For every quickstart instruction: SC above the identity edit's SC, structure kept >= 0.8 (demo sampler)."""
    from editrl.scripts.editor_quality import MIN_STRUCTURE, evaluate

    torch.set_num_threads(1)
    report = evaluate(trained_tiny_model_dir, n_tasks=10, group_size=2, seed=1)
    assert set(report["instructions"]) == set(QUICKSTART_INSTRUCTIONS)
    for instruction, row in report["instructions"].items():
        assert row["sc"] > row["sc_identity"], (instruction, row)
        assert row["structure"] >= MIN_STRUCTURE, (instruction, row)
    assert report["passed"]
    assert report["vae_structure_mean"] >= MIN_STRUCTURE


@pytest.mark.parametrize("field", ["vae/diffusion_pytorch_model.safetensors"])
def test_the_committed_checkpoint_is_small_safetensors(trained_tiny_model_dir: Path, field: str) -> None:
    weights = sorted(
        p.relative_to(trained_tiny_model_dir).as_posix() for p in trained_tiny_model_dir.rglob("*.safetensors")
    )
    assert field in weights and not list(trained_tiny_model_dir.rglob("*.bin"))
    assert sum((trained_tiny_model_dir / w).stat().st_size for w in weights) < 5_000_000
