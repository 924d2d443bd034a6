"""The ODE rollout of the flow editors (editrl.common.families.flow_ode), what ``learner.objective: nft`` trains on.

FLUX-Kontext and Qwen-Image-Edit each sample a small ODE group through the wire; a learner-side policy loaded for nft
accepts it, a log-prob learner refuses it (and the reverse), and broken copies are refused with a reason naming the
field. FLUX-Kontext's ODE is the diffusers pipeline's own Euler sampler, bit for bit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from editrl.common import wire
from editrl.common.families.base import through_wire

torch.set_num_threads(1)

GROUP = 2


@dataclass
class OdeCase:
    actor: Any
    nft_learner: Any  # loaded with the ODE sampler, as for learner.objective nft
    sde_learner: Any  # loaded with the default SDE sampler, as for a log-prob objective
    group: wire.RolloutGroup


def _source() -> Any:
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def flux_case(tiny_model_dir: Path) -> OdeCase:
    from editrl.common.families.flow import FlowSampler
    from editrl.common.families.flux_kontext import FluxKontextPolicy

    ode = FlowSampler(num_steps=3, sde_type="ode")
    actor = FluxKontextPolicy.from_pretrained(tiny_model_dir, sampler=ode)
    group = through_wire(actor.sample("make it red", _source(), GROUP, torch.Generator().manual_seed(3)), _source())
    return OdeCase(
        actor,
        FluxKontextPolicy.from_pretrained(tiny_model_dir, with_pipeline=False, sampler=ode),
        FluxKontextPolicy.from_pretrained(tiny_model_dir, with_pipeline=False),
        group,
    )


@pytest.fixture(scope="module")
def qwen_case(tiny_qwen_edit_dir: Path) -> OdeCase:
    from editrl.common.families.qwen_image_edit import QwenImageEditPolicy

    actor = QwenImageEditPolicy.from_pretrained(tiny_qwen_edit_dir, num_steps=3, true_cfg_scale=4.0, sde_type="ode")
    group = through_wire(actor.sample("make it red", _source(), GROUP, torch.Generator().manual_seed(3)), _source())
    return OdeCase(
        actor,
        QwenImageEditPolicy.from_pretrained(tiny_qwen_edit_dir, with_pipeline=False, sde_type="ode"),
        QwenImageEditPolicy.from_pretrained(tiny_qwen_edit_dir, with_pipeline=False),
        group,
    )


@pytest.fixture(params=["flux", "qwen"])
def case(request: pytest.FixtureRequest) -> OdeCase:
    return request.getfixturevalue(f"{request.param}_case")


def _refused(policy: Any, group: wire.RolloutGroup, field: str) -> str:
    reason = policy.check_group(group)
    assert reason is not None and field in reason, (field, reason)
    return reason


def test_an_ode_group_holds_the_final_latents_and_a_zero_placeholder(case: OdeCase) -> None:
    g = case.group
    assert set(g.traj) == {"x0"} and g.traj["x0"].shape == (GROUP, 16, 16) and g.traj["x0"].dtype == np.float32
    assert g.log_probs.shape == (GROUP, 1) and not g.log_probs.any()
    assert g.params["sde_type"] == "ode" and "noise_level" not in g.params and len(g.edit_pngs) == GROUP
    assert g.cond["sigmas"].shape == (4,) and g.cond["sigmas"][0] == 1.0 and g.cond["sigmas"][-1] == 0.0


def test_the_nft_learner_accepts_it_and_a_log_prob_learner_refuses_it(case: OdeCase) -> None:
    assert case.nft_learner.check_group(case.group) is None
    assert "only learner.objective nft" in _refused(case.sde_learner, case.group, "params['sde_type']")
    sde_group = dataclasses.replace(case.group, params={**case.group.params, "sde_type": "sde"})
    assert "trains nft on ODE groups" in _refused(case.nft_learner, sde_group, "params['sde_type']")


def test_broken_ode_groups_are_refused(case: OdeCase) -> None:
    policy, g = case.nft_learner, case.group
    x0, lp = g.traj["x0"], g.log_probs

    def traj(**arrays: np.ndarray) -> wire.RolloutGroup:
        return dataclasses.replace(g, traj=arrays)

    assert "missing" in _refused(policy, traj(), "traj['x0']")
    _refused(policy, traj(x0=x0[..., :-1]), "traj['x0']")
    _refused(policy, traj(x0=x0.astype(np.float64)), "traj['x0']")
    _refused(policy, traj(x0=x0, latents=x0[:, None]), "traj['x0'] only")
    _refused(policy, dataclasses.replace(g, log_probs=lp + 1.0), "log_probs")
    _refused(policy, dataclasses.replace(g, log_probs=np.zeros((GROUP, 2), lp.dtype)), "log_probs")
    sigmas = np.array(g.cond["sigmas"])
    _refused(policy, dataclasses.replace(g, cond={**g.cond, "sigmas": sigmas[::-1].copy()}), "cond['sigmas']")
    params = {k: v for k, v in g.params.items() if k != "sde_type"}
    _refused(policy, dataclasses.replace(g, params=params), "params['sde_type']")


def test_the_velocity_hook_on_the_stored_group_replays_the_actor_s_ode(case: OdeCase) -> None:
    """The learner's velocity hook, fed the stored condition and schedule, integrates the actor's initial noise to the
    stored final latents bit for bit: it is the sampler's velocity (what nft's v_old and v_θ must be)."""
    from editrl.common.families.flow_ode import ode_sample
    from editrl.common.families.flux_kontext import GroupCondition
    from editrl.common.families.qwen_image_edit_ops import QwenEditCondition

    g, learner = case.group, case.nft_learner
    is_flux = "guidance" in g.params
    cond = GroupCondition.from_arrays(g.cond, 64, 64) if is_flux else QwenEditCondition.from_arrays(g.cond)
    noise = case.actor.initial_noise(cond, GROUP, torch.Generator().manual_seed(3))
    sigmas = torch.from_numpy(np.array(g.cond["sigmas"]))
    with torch.no_grad():
        x0 = ode_sample(lambda x, i: learner.velocity(learner.model, x, sigmas[i].expand(GROUP), g.cond, g.params),
                        noise, sigmas)  # fmt: skip
    assert np.array_equal(x0.numpy(), g.traj["x0"]), np.abs(x0.numpy() - g.traj["x0"]).max()


def test_flux_ode_is_the_pipeline_s_euler_sampler_bit_for_bit(flux_case: OdeCase) -> None:
    actor = flux_case.actor
    cond = actor.encode_condition("make it red", _source())
    noise = actor.initial_noise(cond, GROUP, torch.Generator().manual_seed(3))
    out = actor.pipeline(prompt="make it red", image=_source(), height=64, width=64, num_inference_steps=3,
                         max_area=64 * 64, _auto_resize=False, max_sequence_length=32, output_type="latent",
                         guidance_scale=2.5, latents=noise, num_images_per_prompt=GROUP).images  # fmt: skip
    assert np.array_equal(out.numpy(), flux_case.group.traj["x0"])


def test_the_ode_sampler_takes_no_window() -> None:
    from editrl.common.families.flow import FlowSampler

    with pytest.raises(ValueError, match="sde_window"):
        FlowSampler(sde_type="ode", sde_window=1)
