"""The decoupled objective against independently computed values (float64 numpy), and its limiting cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from editrl.learner.objectives.flow_grpo import decoupled_loss


def _np_decoupled(logp, prox, behave, adv, cl, ch, cap, mode, mask):
    """float64 reference of the module docstring's formula."""
    logp, prox, behave, mask = (np.asarray(a, np.float64) for a in (logp, prox, behave, mask))
    a = np.asarray(adv, np.float64)[:, None]
    r = np.exp(logp - prox)
    surrogate = np.maximum(-a * r, -a * np.clip(r, 1 - cl, 1 + ch))
    w = np.exp(prox - behave)
    w = np.minimum(w, cap) if mode == "truncate" else np.where(w > cap, 0.0, w)
    return float((surrogate * w * mask).sum() / mask.sum())


def _inputs(seed: int, b: int = 5, k: int = 4, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    behave = torch.randn(b, k, generator=g, dtype=torch.float64).float()
    prox = behave + spread * torch.randn(b, k, generator=g, dtype=torch.float64).float()
    logp = prox + 0.05 * torch.randn(b, k, generator=g, dtype=torch.float64).float()
    adv = torch.randn(b, generator=g, dtype=torch.float64).float()
    mask = (torch.rand(b, k, generator=g) > 0.2).float()
    return logp, prox, behave, adv, mask


@pytest.mark.parametrize("mode", ["truncate", "mask"])
@pytest.mark.parametrize("cap", [1.1, 2.0, float("inf")])
def test_matches_an_independent_float64_computation(mode: str, cap: float) -> None:
    logp, prox, behave, adv, mask = _inputs(0)
    loss, stats = decoupled_loss(logp, prox, behave, adv, clip_low=0.02, clip_high=0.05, iw_cap=cap, iw_mode=mode,
                                 mask=mask)  # fmt: skip
    ref = _np_decoupled(logp, prox, behave, adv, 0.02, 0.05, cap, mode, mask)
    assert float(loss) == pytest.approx(ref, rel=1e-5, abs=1e-7)
    w = torch.exp(prox - behave)
    assert float(stats["iw_capped_frac"]) == pytest.approx(float(((w > cap).float() * mask).sum() / mask.sum()))


def test_prox_equal_to_behave_is_plain_clipped_grpo() -> None:
    """prox = behave: weights exactly 1, and the loss is Flow-GRPO's clipped loss (float64 reference without weights);
    its gradient is -A r / count on unclipped units and 0 on clipped ones."""
    logp, _, behave, adv, mask = _inputs(1)
    for m in (None, mask):
        a = logp.clone().requires_grad_(True)
        got, stats = decoupled_loss(a, behave, behave, adv, clip_low=0.1, clip_high=0.1, iw_cap=1.5, mask=m)
        weights = np.ones(tuple(logp.shape)) if m is None else m.numpy()
        want = _np_decoupled(logp.detach(), behave, behave, adv, 0.1, 0.1, float("inf"), "truncate", weights)
        assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-7)
        got.backward()
        r = np.exp(logp.detach().numpy().astype(np.float64) - behave.numpy())
        adv64 = adv.numpy().astype(np.float64)[:, None]
        clipped = ((adv64 > 0) & (r > 1.1)) | ((adv64 < 0) & (r < 0.9))
        grad = np.where(clipped, 0.0, -adv64 * r) * weights / weights.sum()
        np.testing.assert_allclose(a.grad.numpy(), grad, rtol=1e-5, atol=1e-7)
        assert float(stats["iw_mean"]) == 1.0 and float(stats["mismatch_kl"]) == 0.0


def test_units_beyond_the_cap_contribute_nothing_when_masked_and_are_clamped_when_truncated() -> None:
    behave = torch.zeros(2, 2)
    prox = torch.tensor([[0.0, 2.0], [0.0, 0.0]])  # one unit with w = e^2 > cap
    adv = torch.tensor([1.0, -1.0])
    for mode in ("mask", "truncate"):
        logp = prox.clone().requires_grad_(True)
        loss, stats = decoupled_loss(logp, prox, behave, adv, clip_low=0.2, clip_high=0.2, iw_cap=2.0, iw_mode=mode)
        loss.backward()
        assert float(stats["iw_capped_frac"]) == 0.25
        if mode == "mask":
            assert logp.grad[0, 1] == 0.0  # no gradient from the masked unit
            assert float(loss) == pytest.approx((-1.0 + 0.0 + 1.0 + 1.0) / 4)  # normaliser: all 4 units
        else:
            assert float(logp.grad[0, 1]) == pytest.approx(-2.0 / 4)  # -A * cap / count
        assert float(logp.grad[0, 0]) == pytest.approx(-1.0 / 4)


@pytest.mark.parametrize(
    "adv, offset, clipped",
    [(1.0, 0.5, True), (1.0, -0.5, False), (-1.0, -0.5, True), (-1.0, 0.5, False), (1.0, 0.0, False)],
)
def test_gradient_sign_on_both_clip_sides(adv: float, offset: float, clipped: bool) -> None:
    """A > 0: the loss pushes log-prob up until r > 1 + ε; A < 0: down until r < 1 - ε; beyond, no gradient."""
    prox = torch.zeros(1, 1)
    logp = torch.full((1, 1), offset, requires_grad=True)
    loss, stats = decoupled_loss(logp, prox, prox, torch.tensor([adv]), clip_low=0.1, clip_high=0.2)
    loss.backward()
    if clipped:
        assert logp.grad.item() == 0.0 and stats["clip_frac"].item() == 1.0
    else:
        assert np.sign(-logp.grad.item()) == np.sign(adv)  # a descent step moves log-prob with the advantage


def test_kl_to_an_identical_reference_is_zero_with_zero_gradient() -> None:
    logp, _, behave, adv, _ = _inputs(2)
    a = logp.clone().requires_grad_(True)
    b = logp.clone().requires_grad_(True)
    with_kl, stats = decoupled_loss(a, behave, behave, adv, clip_low=0.2, clip_high=0.2, ref_log_prob=logp.clone(),
                                    kl_coef=0.5)  # fmt: skip
    without, _ = decoupled_loss(b, behave, behave, adv, clip_low=0.2, clip_high=0.2)
    with_kl.backward()
    without.backward()
    assert float(stats["kl_ref"]) == 0.0 and torch.equal(with_kl, without) and torch.equal(a.grad, b.grad)
    # a different reference: positive KL, and its gradient pulls log-probs toward the reference
    c = logp.clone().requires_grad_(True)
    ref = logp - 0.3
    kl_only, stats = decoupled_loss(c, behave, behave, torch.zeros_like(adv), clip_low=0.2, clip_high=0.2,
                                    ref_log_prob=ref, kl_coef=1.0)  # fmt: skip
    kl_only.backward()
    assert float(stats["kl_ref"]) > 0 and bool((c.grad > 0).all())  # descent lowers log-probs toward ref
