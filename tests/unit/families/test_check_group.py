"""Tests for ``LearnerPolicy.check_group`` (editrl.common.families.check and each family's part) on the tiny models.

Each family samples one small group (2 edits, few steps), sends it through the wire and checks it with a learner-side
policy (``with_pipeline=False``, as the learner loads it): accepted, and it really recomputes. Broken copies of it are
refused with a reason that names the broken field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from editrl.common import wire
from editrl.common.families.base import LearnerPolicy, through_wire
from editrl.common.families.check import first_reason

torch.set_num_threads(1)

GROUP = 2
FAMILIES = ("flux_kontext", "qwen_image_edit", "instruct_pix2pix", "emu3")


@dataclass
class Case:
    """One family's accepted group and the names its recompute reads."""

    learner: Any  # learner-side policy: transformer / UNet / language model only
    group: wire.RolloutGroup
    array: str  # the per-sample traj array ("latents" or "tokens")
    schedule: str  # the cond key holding the schedule (the prompt ids for ar, which has none)
    param: str  # a params key the recompute reads


def _source(size: int) -> Any:
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(size, size, 3) * 255).astype(np.uint8))


def _sampled(actor: Any, size: int) -> wire.RolloutGroup:
    source = _source(size)
    return through_wire(actor.sample("make it red", source, GROUP, torch.Generator().manual_seed(0)), source)


@pytest.fixture(scope="module")
def flux_kontext_case(tiny_model_dir: Path) -> Case:
    from editrl.common.families.flow import FlowSampler
    from editrl.common.families.flux_kontext import FluxKontextPolicy

    actor = FluxKontextPolicy.from_pretrained(tiny_model_dir, sampler=FlowSampler(num_steps=3))
    learner = FluxKontextPolicy.from_pretrained(tiny_model_dir, with_pipeline=False)
    return Case(learner, _sampled(actor, 32), "latents", "sigmas", "sde_type")


@pytest.fixture(scope="module")
def qwen_image_edit_case(tiny_qwen_edit_dir: Path) -> Case:
    from editrl.common.families.qwen_image_edit import QwenImageEditPolicy

    actor = QwenImageEditPolicy.from_pretrained(tiny_qwen_edit_dir, num_steps=3, true_cfg_scale=4.0)
    learner = QwenImageEditPolicy.from_pretrained(tiny_qwen_edit_dir, with_pipeline=False)
    return Case(learner, _sampled(actor, 64), "latents", "sigmas", "steps")


@pytest.fixture(scope="module")
def instruct_pix2pix_case(tiny_ip2p_dir: Path) -> Case:
    from editrl.common.families.ddim import InstructPix2PixPolicy

    actor = InstructPix2PixPolicy.from_pretrained(tiny_ip2p_dir, num_steps=3)
    learner = InstructPix2PixPolicy.from_pretrained(tiny_ip2p_dir, with_pipeline=False)
    return Case(learner, _sampled(actor, 32), "latents", "timesteps", "eta")


@pytest.fixture(scope="module")
def emu3_case(tiny_emu3_dir: Path) -> Case:
    from editrl.common.families.ar import Emu3EditPolicy

    actor = Emu3EditPolicy.from_pretrained(tiny_emu3_dir)
    learner = Emu3EditPolicy.from_pretrained(tiny_emu3_dir, with_pipeline=False)
    return Case(learner, _sampled(actor, 16), "tokens", "prompt_ids", "temperature")


@pytest.fixture(params=FAMILIES)
def case(request: pytest.FixtureRequest) -> Case:
    return request.getfixturevalue(f"{request.param}_case")


def _traj(group: wire.RolloutGroup, **arrays: np.ndarray) -> wire.RolloutGroup:
    return dataclasses.replace(group, traj={**group.traj, **arrays})


def _cond(group: wire.RolloutGroup, **arrays: np.ndarray) -> wire.RolloutGroup:
    return dataclasses.replace(group, cond={**group.cond, **arrays})


def _refused(policy: Any, group: wire.RolloutGroup, field: str) -> str:
    reason = policy.check_group(group)
    assert reason is not None and field in reason, (field, reason)
    return reason


# ------------------------------------------------------------------------------------------------ every family


def test_a_sampled_group_is_accepted(case: Case) -> None:
    assert isinstance(case.learner, LearnerPolicy)
    assert case.learner.check_group(case.group) is None


def test_accepted_group_recomputes_the_stored_log_probs(case: Case) -> None:
    with torch.no_grad():
        chunks = list(case.learner.recompute(case.learner.model, case.group.traj, case.group.cond, case.group.params))
    recomputed = torch.cat([lp for _, lp in chunks], dim=1)
    assert torch.equal(recomputed, torch.from_numpy(np.array(case.group.log_probs)))


def test_wrong_array_shape_is_refused(case: Case) -> None:
    arr, label = case.group.traj[case.array], f"traj[{case.array!r}]"
    for bad in (arr[..., None], arr[..., :-1], np.zeros((GROUP, 3), arr.dtype)):  # the last: issue 14's group
        _refused(case.learner, _traj(case.group, **{case.array: bad}), label)


def test_missing_schedule_is_refused(case: Case) -> None:
    cond = {k: v for k, v in case.group.cond.items() if k != case.schedule}
    reason = _refused(case.learner, dataclasses.replace(case.group, cond=cond), f"cond[{case.schedule!r}]")
    assert "missing" in reason


def test_wrong_dtype_is_refused(case: Case) -> None:
    arr, label = case.group.traj[case.array], f"traj[{case.array!r}]"
    bad = arr.astype(np.int32 if arr.dtype.kind == "i" else np.float16)
    assert "dtype" in _refused(case.learner, _traj(case.group, **{case.array: bad}), label)
    half = dataclasses.replace(case.group, log_probs=case.group.log_probs.astype(np.float16))
    assert "dtype" in _refused(case.learner, half, "log_probs")


def test_log_probs_of_another_length_are_refused(case: Case) -> None:
    lp = case.group.log_probs
    for bad in (lp[:, :-1], np.concatenate([lp, lp[:, :1]], axis=1)):
        _refused(case.learner, dataclasses.replace(case.group, log_probs=bad), "log_probs")


def test_group_size_mismatch_is_refused(case: Case) -> None:
    group, arr = case.group, case.group.traj[case.array]
    _refused(case.learner, dataclasses.replace(group, edit_pngs=group.edit_pngs[:1]), "edit_pngs")
    _refused(case.learner, _traj(group, **{case.array: arr[:1]}), f"traj[{case.array!r}]")
    _refused(case.learner, dataclasses.replace(group, log_probs=group.log_probs[:1]), "log_probs")
    more = np.concatenate([group.log_probs, group.log_probs[:1]])
    _refused(case.learner, dataclasses.replace(group, log_probs=more), "log_probs")


def test_non_finite_values_are_refused(case: Case) -> None:
    lp = np.array(case.group.log_probs)
    lp[0, 0] = np.nan
    assert "NaN" in _refused(case.learner, dataclasses.replace(case.group, log_probs=lp), "log_probs")
    where, name = next(
        (w, k) for w in ("cond", "traj") for k, v in getattr(case.group, w).items() if v.dtype.kind == "f"
    )
    arr = np.array(getattr(case.group, where)[name])
    arr.flat[0] = np.inf
    broken = _cond(case.group, **{name: arr}) if where == "cond" else _traj(case.group, **{name: arr})
    _refused(case.learner, broken, f"{where}[{name!r}]")


def test_missing_or_mistyped_param_is_refused(case: Case) -> None:
    params = {k: v for k, v in case.group.params.items() if k != case.param}
    reason = _refused(case.learner, dataclasses.replace(case.group, params=params), f"params[{case.param!r}]")
    assert "missing" in reason
    wrong = 0.5 if isinstance(case.group.params[case.param], str) else "x"
    params = {**case.group.params, case.param: wrong}
    _refused(case.learner, dataclasses.replace(case.group, params=params), f"params[{case.param!r}]")


def test_another_family_is_refused(case: Case) -> None:
    other = next(f for f in wire.FAMILIES if f != case.group.family)
    _refused(case.learner, dataclasses.replace(case.group, family=other), "family")


# --------------------------------------------------------------------------------------------- family-specific


def test_flux_kontext_schedule_and_model_dtype(flux_kontext_case: Case) -> None:
    policy, group = flux_kontext_case.learner, flux_kontext_case.group
    sigmas = np.array(group.cond["sigmas"])
    _refused(policy, _cond(group, sigmas=sigmas[::-1].copy()), "cond['sigmas']")  # increasing
    _refused(policy, _cond(group, sigmas=sigmas[:2]), "params['start']")  # fewer steps than stored
    _refused(policy, dataclasses.replace(group, params={**group.params, "start": 2}), "params['start']")
    _refused(policy, dataclasses.replace(group, params={**group.params, "sde_type": "ode"}), "params['sde_type']")
    _refused(policy, dataclasses.replace(group, params={**group.params, "noise_level": 0.0}), "params['noise_level']")
    _refused(policy, _cond(group, prompt_embeds=group.cond["prompt_embeds"][:, :-1]), "cond['prompt_embeds']")
    _refused(policy, _cond(group, image_ids=group.cond["image_ids"][:-1]), "cond['image_ids']")
    f64 = dataclasses.replace(group, log_probs=group.log_probs.astype(np.float64))
    assert "model's float32" in _refused(policy, f64, "log_probs")


def test_flux_kontext_refuses_issue_14s_group(flux_kontext_case: Case) -> None:
    """The fault test's injected group (tests/faults/test_scenarios.py): wire-valid, nothing a recompute can use."""
    group = dataclasses.replace(
        flux_kontext_case.group, traj={"latents": np.zeros((2, 3), np.float32)},
        log_probs=np.zeros((2, 1), np.float32), cond={}, params={},
    )  # fmt: skip
    assert flux_kontext_case.learner.check_group(group) is not None


def test_qwen_image_edit_token_counts_and_negative_prompt(qwen_image_edit_case: Case) -> None:
    policy, group = qwen_image_edit_case.learner, qwen_image_edit_case.group
    shapes = np.array(group.cond["img_shapes"])
    shapes[0, 2] += 1  # the target's token count no longer matches the latents
    _refused(policy, _cond(group, img_shapes=shapes), "traj['latents']")
    shapes = np.array(group.cond["img_shapes"])
    shapes[1, 1] += 1  # nor the condition's the source's image latents
    _refused(policy, _cond(group, img_shapes=shapes), "cond['image_latents']")
    cond = {k: v for k, v in group.cond.items() if not k.startswith("negative_")}
    _refused(policy, dataclasses.replace(group, cond=cond), "cond['negative_prompt_embeds']")
    assert (
        policy.check_group(dataclasses.replace(group, cond=cond, params={**group.params, "true_cfg_scale": 1.0}))
        is None
    )
    _refused(policy, _cond(group, timesteps=group.cond["timesteps"][:-1]), "cond['sigmas']")


def test_instruct_pix2pix_timesteps_eta_and_source_size(instruct_pix2pix_case: Case) -> None:
    policy, group = instruct_pix2pix_case.learner, instruct_pix2pix_case.group
    _refused(policy, _cond(group, timesteps=group.cond["timesteps"] + 1), "cond['timesteps']")
    _refused(policy, _cond(group, image_latents=group.cond["image_latents"][:, :-1]), "traj['latents']")
    _refused(policy, _cond(group, uncond_embeds=group.cond["uncond_embeds"][:-1]), "cond['uncond_embeds']")
    for eta in (0.0, 50.0):
        _refused(policy, dataclasses.replace(group, params={**group.params, "eta": eta}), "params['eta']")


def test_emu3_token_ids(emu3_case: Case) -> None:
    policy, group = emu3_case.learner, emu3_case.group
    tokens = np.array(group.traj["tokens"])
    tokens[0, 0] = policy.model.lm_head.out_features
    assert "vocabulary" in _refused(policy, _traj(group, tokens=tokens), "traj['tokens']")
    tokens[0, 0] = int(group.cond["prompt_ids"][0])  # bos: in the vocabulary, never sampled
    assert "allowed ids" in _refused(policy, _traj(group, tokens=tokens), "traj['tokens']")
    mask = np.array(group.traj["unit_mask"])
    mask[0, 0] = 0.0  # an uncounted unit may hold any id of the vocabulary (the padding does)
    assert policy.check_group(_traj(group, tokens=tokens, unit_mask=mask)) is None
    mask[0, 0] = 0.5
    _refused(policy, _traj(group, unit_mask=mask), "traj['unit_mask']")
    _refused(policy, dataclasses.replace(group, params={**group.params, "temperature": 0.0}), "temperature")
    _refused(policy, dataclasses.replace(group, params={**group.params, "top_k": 1.5}), "params['top_k']")


def test_an_error_while_checking_is_a_reason() -> None:
    def reasons() -> Iterator[str]:
        raise KeyError("latents")
        yield "unreachable"

    assert first_reason(reasons()) == "unreadable group: KeyError: 'latents'"
    assert first_reason(iter(())) is None
