"""Flow-GRPO loss pieces against independently computed values."""

import numpy as np
import torch

from editrl.learner.loss import group_advantages
from editrl.learner.objectives.flow_grpo import decoupled_loss


def test_group_advantages_zero_mean_unit_scale():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    adv = group_advantages(r, eps=0.0, clip=100.0)
    assert abs(float(adv.mean())) < 1e-6
    expected = (r.numpy() - r.numpy().mean()) / r.numpy().std()
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-6)


def test_group_advantages_zero_variance_and_clip():
    assert not group_advantages(torch.full((4,), 3.0)).abs().any()
    adv = group_advantages(torch.tensor([0.0] * 99 + [1.0]), clip=5.0)
    assert float(adv.max()) == 5.0


def test_clipped_loss_matches_reference_and_gradient_sign():
    lp_old = torch.zeros(4)
    lp_new = torch.tensor([0.0, 1e-5, 3e-4, -2e-4], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    eps = 1e-4
    loss, stats = decoupled_loss(lp_new, lp_old, lp_old, adv, clip_low=eps, clip_high=eps)  # prox = behave
    r = np.exp(lp_new.detach().numpy().astype(np.float64))
    a = adv.numpy()
    ref = np.mean(np.maximum(-a * r, -a * np.clip(r, 1 - eps, 1 + eps)))
    np.testing.assert_allclose(float(loss), ref, rtol=0, atol=1e-6)
    assert float(stats["clip_frac"]) == 0.5
    loss.backward()
    g = lp_new.grad.numpy()
    assert g[0] < 0 and g[1] > 0  # unclipped: descent raises log-prob for A > 0, lowers it for A < 0
    assert g[2] == 0  # A > 0 and r above 1 + eps: clipped, no gradient
    assert g[3] == 0  # A < 0 and r below 1 - eps: clipped, no gradient
