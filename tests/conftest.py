"""Shared pytest fixtures for editrl tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random FLUX.1-Kontext pipeline saved once per session (no download)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    from editrl.common.families.tiny.flux_kontext import build_tiny_flux_kontext

    return build_tiny_flux_kontext(tmp_path_factory.mktemp("tiny_flux_kontext"), seed=0)


TRAINED_EDITOR = Path(__file__).resolve().parents[1] / "models" / "tiny-flux-kontext-editor"


@pytest.fixture(scope="session")
def trained_tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny FLUX-Kontext editor trained on a CPU and committed in models/tiny-flux-kontext-editor (its files are
    checked against its SHA256SUMS); trained here, about 5 minutes, only if that directory is absent."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from editrl.common.families.tiny.train_editor import train_tiny_editor, verify_checksums

    if (TRAINED_EDITOR / "SHA256SUMS").is_file():
        bad = verify_checksums(TRAINED_EDITOR)
        assert not bad, f"{TRAINED_EDITOR}: files differ from SHA256SUMS: {bad}"
        return TRAINED_EDITOR
    return train_tiny_editor(tmp_path_factory.mktemp("trained_editor"), seed=0, progress=False)


@pytest.fixture(scope="session")
def quickstart_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic quickstart task set (16 tasks, 64×64 PNGs), written once per session."""
    from editrl.common.tasks import make_quickstart_tasks

    return make_quickstart_tasks(tmp_path_factory.mktemp("tasks"), n_tasks=16, size=64, seed=0)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2.5-VL judge (model, tokenizer, image processor) saved once per session (no download)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    from editrl.common.families.tiny.qwen2_5_vl import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), seed=0)


@pytest.fixture(scope="session")
def tiny_ip2p_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random InstructPix2Pix pipeline (the ddim family) saved once per session."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from editrl.common.families.tiny.instruct_pix2pix import build_tiny_instruct_pix2pix

    return build_tiny_instruct_pix2pix(tmp_path_factory.mktemp("tiny_ip2p"), seed=0)


@pytest.fixture(scope="session")
def tiny_emu3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Emu3-style token editor (the ar family; text decoder + VQ-VAE) saved once per session."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from editrl.common.families.tiny.emu3 import build_tiny_emu3

    return build_tiny_emu3(tmp_path_factory.mktemp("tiny_emu3"), seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_edit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen-Image-Edit pipeline (flow family, true CFG) saved once per session."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from editrl.common.families.tiny.qwen_image_edit import build_tiny_qwen_image_edit

    return build_tiny_qwen_image_edit(tmp_path_factory.mktemp("tiny_qwen_edit"), seed=0)


@pytest.fixture(scope="session")
def tiny_model_f64_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny FLUX.1-Kontext pipeline initialised and saved in float64 (the golden test's reference precision)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    from editrl.common.families.tiny.flux_kontext import build_tiny_flux_kontext

    return build_tiny_flux_kontext(tmp_path_factory.mktemp("tiny_flux_kontext_f64"), seed=0, dtype="float64")
