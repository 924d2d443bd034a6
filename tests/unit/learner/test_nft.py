"""DiffusionNFT (learner/objectives/nft.py): the loss against an independent float64 computation, the direction of its
gradient, the reward mapping, its draws and old-policy pass on a toy velocity model, one golden learner step on the
float64 tiny FLUX-Kontext with groups the ODE actor sampled, and its config rules.

The golden values change only when the math changes; update them deliberately: ``python -m
tests.unit.learner.test_nft`` prints the values of this machine (float64, so CPU-independent as in test_golden).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from editrl.learner.objectives.nft import NFT, WEIGHT_FLOOR, draw_seed, nft_loss, reward01

# float64, one gloo rank, FSDP2: see test_golden for why float64 and this tolerance
GOLDEN: dict[str, float] = {
    "learner/loss": 6.1664949665737785,
    "learner/grad_norm": 0.045507390056419406,
    "learner/nft_loss_pos": 1.2332989933147556,
    "learner/nft_loss_neg": 1.2332989933147556,
    "learner/nft_r01_mean": 0.4999999993480742,
}
REL = 1e-9
REWARDS = [np.array([1.0, 4.0, 2.0, 8.0], np.float32), np.array([3.0, 3.5, 0.5, 1.0], np.float32)]


def _np_nft(v_theta, v_old, x_sigma, x0, sigma, adv, beta, clip):
    """DiffusionNFT's loss of one draw written from the paper's formulas, in float64 numpy."""
    r = np.clip(np.clip(adv, -clip, clip) / clip / 2 + 0.5, 0, 1)
    s = sigma[:, None, None]

    def weighted(v):
        err = (x_sigma - s * v) - x0
        return (err**2).mean(axis=(1, 2)) / np.maximum(np.abs(err).mean(axis=(1, 2)), 1e-5)

    v_pos, v_neg = beta * v_theta + (1 - beta) * v_old, (1 + beta) * v_old - beta * v_theta
    return clip * np.mean((r * weighted(v_pos) + (1 - r) * weighted(v_neg)) / beta)


def _tensors(seed: int, b: int = 4, length: int = 6, c: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(b, length, c, generator=g, dtype=torch.float64), torch.randn(b, length, c, generator=g)
    sigma = torch.rand(b, generator=g, dtype=torch.float64)
    v_old = eps.double() - x0 + 0.3 * torch.randn(b, length, c, generator=g, dtype=torch.float64)
    return {
        "x0": x0, "x_sigma": (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * eps.double(), "sigma": sigma,
        "v_old": v_old, "v_theta": v_old + 0.1 * torch.randn(b, length, c, generator=g, dtype=torch.float64),
        "adv": torch.tensor([-7.0, -1.0, 0.5, 6.0], dtype=torch.float64)[:b],
    }  # fmt: skip


@pytest.mark.parametrize("beta", [1.0, 0.1, 0.7])
def test_loss_matches_an_independent_float64_computation(beta: float) -> None:
    t = _tensors(0)
    loss, stats = nft_loss(t["v_theta"], t["v_old"], t["x_sigma"], t["x0"], t["sigma"], reward01(t["adv"], 5.0), beta,
                           5.0)  # fmt: skip
    want = _np_nft(*(t[k].numpy() for k in ("v_theta", "v_old", "x_sigma", "x0", "sigma", "adv")), beta, 5.0)
    assert float(loss) == pytest.approx(want, rel=1e-12)
    assert float(stats["nft_old_dev"]) == pytest.approx(float(((t["v_theta"] - t["v_old"]) ** 2).mean()), rel=1e-12)


def test_the_adaptive_weight_has_a_floor() -> None:
    x0 = torch.zeros(1, 2, 2, dtype=torch.float64)
    v = torch.full_like(x0, -1e-7)  # x0± - x0 = 1e-7 everywhere: mean |err| is below the floor
    loss, stats = nft_loss(v, v, x0, x0, torch.ones(1, dtype=torch.float64), torch.ones(1), 1.0, 1.0)
    assert float(stats["nft_loss_pos"]) == pytest.approx(1e-14 / WEIGHT_FLOOR, rel=1e-12)


def test_reward_mapping() -> None:
    adv = torch.tensor([-9.0, -5.0, -2.5, 0.0, 1.0, 2.5, 5.0, 7.0])
    assert reward01(adv, 5.0).tolist() == pytest.approx([0.0, 0.0, 0.25, 0.5, 0.6, 0.75, 1.0, 1.0])
    assert reward01(torch.tensor([-1.0, 0.5, 3.0]), 2.0).tolist() == pytest.approx([0.25, 0.625, 1.0])


class _Linear(torch.nn.Module):
    """A toy velocity model v = x W (per token), float64."""

    def __init__(self, c: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(0.3 * torch.randn(c, c, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def _x0_error(model: _Linear, t: dict[str, torch.Tensor]) -> float:
    """|| x_σ - σ v_θ(x_σ) - x0 ||^2: how far v_θ's own x0 prediction is from the data."""
    with torch.no_grad():
        return float(((t["x_sigma"] - t["sigma"][:, None, None] * model(t["x_sigma"]) - t["x0"]) ** 2).sum())


@pytest.mark.parametrize("r", [1.0, 0.0, 0.5])
def test_one_sgd_step_pulls_toward_x0_for_r_1_and_pushes_away_for_r_0(r: float) -> None:
    t = _tensors(1)
    model = _Linear(3, seed=2)
    before = _x0_error(model, t)
    v = model(t["x_sigma"])
    loss, _ = nft_loss(v, v.detach(), t["x_sigma"], t["x0"], t["sigma"], torch.full((4,), r), 1.0, 5.0)
    loss.backward()
    with torch.no_grad():
        model.weight -= 1e-3 * model.weight.grad
    if r == 0.5:  # v_θ = v_old and r = 1/2: the positive and negative pulls cancel exactly
        assert float(model.weight.grad.abs().max()) == 0.0
    else:
        assert (_x0_error(model, t) < before) == (r == 1.0)


def test_at_the_old_policy_the_gradient_is_2r_minus_1_times_the_plain_regression_s() -> None:
    """[derived] At v_θ = v_old, ∇ = (2r - 1) ∇(c · L) with L the weighted x0 regression of v_θ, whatever β."""
    t = _tensors(2)
    r = torch.tensor([0.9, 0.2, 0.5, 0.65], dtype=torch.float64)
    for beta in (1.0, 0.3):
        v = t["v_old"].clone().requires_grad_(True)
        nft_loss(v, t["v_old"], t["x_sigma"], t["x0"], t["sigma"], r, beta, 5.0)[0].backward()
        w = t["v_old"].clone().requires_grad_(True)
        plain, _ = nft_loss(w, t["v_old"], t["x_sigma"], t["x0"], t["sigma"], torch.ones(4), 1.0, 5.0)
        plain.backward()
        torch.testing.assert_close(v.grad, (2 * r - 1)[:, None, None] * w.grad, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------- the objective on a toy updater


class _Policy:
    @staticmethod
    def velocity(model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Any, params: Any) -> torch.Tensor:
        return model(x) * (1.0 + sigma[:, None, None])  # σ matters, as for a real transformer


class _Engine:
    def __init__(self) -> None:
        self.losses: list[float] = []

    def backward(self, loss: torch.Tensor) -> None:
        self.losses.append(float(loss))
        loss.backward()


def _updater(version: int = 0, **lcfg: Any) -> Any:
    cfg = {"nft_beta": 1.0, "nft_timesteps": 0, "adv_clip_max": 5.0, "kl_coef": 0.0, **lcfg}
    model = _Linear(3, seed=3)
    return SimpleNamespace(policy=_Policy(), model=model, engine=_Engine(), version=version,
                           objective=NFT(SimpleNamespace(**cfg)))  # fmt: skip


def _group(group_id: str = "g-1", n: int = 4) -> Any:
    x0 = np.random.default_rng(0).standard_normal((4, 5, 3))
    sigmas = np.array([*np.linspace(1.0, 0.2, n), 0.0], np.float32)
    return SimpleNamespace(group_id=group_id, traj={"x0": x0}, cond={"sigmas": sigmas}, params={},
                           log_probs=np.zeros((4, 1)))  # fmt: skip


def test_draws_are_reproducible_per_group_and_version_and_cover_distinct_levels() -> None:
    up, group = _updater(), _group()
    a, b = up.objective.draws(up, group), up.objective.draws(up, group)
    assert len(a.sigmas) == 3  # K = N - 1 (the reference's int(0.99 N))
    assert all(torch.equal(x, y) for x, y in zip(a.sigmas + a.noises, b.sigmas + b.noises, strict=True))
    levels = torch.stack(a.sigmas)  # [K, G]: distinct per edit, from σ_0 .. σ_{N-1}, never the final 0
    assert all(len(set(levels[:, i].tolist())) == 3 for i in range(4)) and bool((levels > 0).all())
    for other in (up.objective.draws(_updater(version=1), group), up.objective.draws(up, _group("g-2"))):
        assert not torch.equal(other.noises[0], a.noises[0])
    assert draw_seed("g-1", 0) != draw_seed("g-1", 1)
    full = _updater(nft_timesteps=4)
    assert sorted(torch.stack(full.objective.draws(full, group).sigmas)[:, 0].tolist()) == pytest.approx(
        sorted(group.cond["sigmas"][:-1].tolist())
    )


def test_proximal_equals_the_forward_until_the_weights_move() -> None:
    adv = torch.tensor([1.0, -0.5, 2.0, -2.5], dtype=torch.float64)
    grads, stats = [], []
    for ahead in (False, True):
        up, group = _updater(), _group()
        prox = up.objective.proximal(up, group) if ahead else "forward"
        stats.append(up.objective.group_loss(up, group, adv, 2, prox, None))
        grads.append(up.model.weight.grad.clone())
        assert sum(up.engine.losses) == pytest.approx(stats[-1]["loss"] / 2)  # mean over draws, one unit of two
    assert torch.equal(grads[0], grads[1]) and stats[0] == stats[1] and stats[0]["nft_old_dev"] == 0.0
    up, group = _updater(), _group()
    prox = up.objective.proximal(up, group)
    with torch.no_grad():  # an optimizer step of an earlier minibatch
        up.model.weight += 0.01
    moved = up.objective.group_loss(up, group, adv, 2, prox, None)
    assert moved["nft_old_dev"] > 0 and moved["nft_loss_pos"] != moved["nft_loss_neg"]
    with pytest.raises(TypeError, match="prox"):
        up.objective.group_loss(up, group, adv, 2, torch.zeros(4, 1), None)


# ----------------------------------------------------------------------- golden step on the tiny FLUX-Kontext


def run_golden(model_dir: Path) -> dict[str, float]:
    """Two ODE groups from the float64 tiny FLUX-Kontext through the wire, accepted by the learner's check, and one
    1-rank learner step (FSDP2, minibatches 1: v_old is the θ forward's own value) with objective nft."""

    from editrl.common.families.base import load_policy

    from .one_rank import float64_setup, train_one_step

    cfg, groups = float64_setup(model_dir, {"objective": "nft", "lr": 3e-3, "minibatches": 1})
    assert cfg.policy.sampler.sde_type == "ode"
    learner = load_policy(cfg.policy, with_pipeline=False)
    assert [learner.check_group(g) for g in groups] == [None, None]
    assert all(g.traj["x0"].dtype == np.float64 and set(g.traj) == {"x0"} for g in groups)
    got = train_one_step(cfg, groups, REWARDS, version=0)
    return {key: got[key] for key in GOLDEN}


def test_one_learner_step_matches_recorded_values(tiny_model_f64_dir: Path) -> None:
    got = run_golden(tiny_model_f64_dir)
    bad = [f"{k}: got {got[k]!r}, recorded {v!r}" for k, v in GOLDEN.items() if not abs(got[k] - v) <= REL * abs(v)]
    assert not bad, bad
    # minibatches 1: v_old is v_θ itself, so the two implicit policies coincide at the start of the step
    assert got["learner/nft_loss_pos"] == got["learner/nft_loss_neg"] and got["learner/grad_norm"] > 0


# ----------------------------------------------------------------------- config


def _cfg(policy: dict[str, Any] | None = None, **learner: Any) -> Any:
    from editrl.common.config import parse_config

    raw_policy = {"model": "/unused", **(policy or {})}
    return parse_config({"policy": raw_policy, "data": {"tasks": "/unused.jsonl"}, "learner": learner})


def test_config_nft_is_for_flow_editors_and_samples_with_the_ode() -> None:
    from editrl.common.config import ConfigError

    assert _cfg(objective="nft").policy.sampler.sde_type == "ode"
    assert _cfg(objective="nft").learner.nft_beta == 1.0 and _cfg().policy.sampler.sde_type == "sde"
    with pytest.raises(ConfigError, match=r"^learner\.objective: nft trains"):
        _cfg({"family": "ddim"}, objective="nft")
    for policy, learner, field in (
        ({"sampler": {"sde_type": "cps"}}, {"objective": "nft"}, "policy.sampler.sde_type"),
        ({"sampler": {"sde_type": "ode"}}, {}, "policy.sampler.sde_type"),
        ({"sampler": {"sde_window": 1}}, {"objective": "nft"}, "policy.sampler.sde_window"),
        ({}, {"objective": "nft", "nft_beta": 0.0}, "learner.nft_beta"),
        ({"sampler": {"num_steps": 4}}, {"objective": "nft", "nft_timesteps": 5}, "learner.nft_timesteps"),
    ):
        with pytest.raises(ConfigError, match=field):
            _cfg(policy, **learner)


if __name__ == "__main__":
    import json
    import os
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from editrl.common.families.tiny.flux_kontext import build_tiny_flux_kontext

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run_golden(build_tiny_flux_kontext(Path(tmp), seed=0, dtype="float64")), indent=2))
