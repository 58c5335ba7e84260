"""Loss, advantage and KL math against hand-computed values."""
import math

import pytest
import torch

from rl.algorithms import group_normalized_advantages, kl_estimate, masked_mean, ppo_clip_loss


def test_grpo_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_normalized_advantages(r, group_size=4)
    # group 1: mean 0.5, unbiased std sqrt(1/3) -> +-0.5/0.57735 = +-0.866025
    expected = torch.tensor([0.866025, -0.866025, -0.866025, 0.866025, 0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(adv, expected, atol=1e-4)
    assert abs(adv[:4].sum().item()) < 1e-6  # zero mean within a group


def test_grpo_advantages_without_std_normalisation():
    r = torch.tensor([3.0, 1.0, 2.0, 6.0])
    adv = group_normalized_advantages(r, group_size=2, normalize_std=False)
    assert adv.tolist() == [1.0, -1.0, -2.0, 2.0]


def test_grpo_rejects_ragged_groups():
    with pytest.raises(ValueError, match="groups of 3"):
        group_normalized_advantages(torch.zeros(4), group_size=3)


def test_ppo_clip_ratio_one_is_policy_gradient():
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    adv = torch.tensor([2.0])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = ppo_clip_loss(lp, lp.clone(), adv, mask)
    assert loss.item() == pytest.approx(-2.0)  # -(1*2 + 1*2)/2
    assert stats["clip_frac"] == 0.0


def test_ppo_clip_hand_computed():
    old = torch.zeros(1, 4)
    # ratios: e^0.5=1.6487 (A>0, clipped to 1.2), e^-0.5=0.6065 (A<0 clipped at 0.8 -> min picks -0.8*... )
    lp = torch.tensor([[0.5, -0.5, 0.1, 0.3]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, stats = ppo_clip_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    r = [math.exp(0.5), math.exp(-0.5), math.exp(0.1), math.exp(0.3)]
    terms = [min(r[0] * 1, 1.2 * 1), min(r[1] * -1, 0.8 * -1), min(r[2], 1.1052), min(-r[3], -1.2)]
    expected = -sum(terms) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert stats["clip_frac"] == pytest.approx(0.5)  # tokens 0 and 1 are clipped


def test_ppo_clip_gradient_masks_non_policy_tokens():
    lp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    loss, _ = ppo_clip_loss(lp, lp.detach(), torch.tensor([1.0]), torch.tensor([[1.0, 0.0]]))
    loss.backward()
    assert lp.grad[0, 1].item() == 0.0 and lp.grad[0, 0].item() == pytest.approx(-1.0)


def test_kl_estimators_hand_computed():
    lp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])  # log-ratio 0.5
    assert kl_estimate(lp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_estimate(lp, ref, "k2").item() == pytest.approx(0.125)
    assert kl_estimate(lp, ref, "k3").item() == pytest.approx(math.exp(-0.5) - 1 + 0.5)
    assert kl_estimate(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError, match="available"):
        kl_estimate(lp, ref, "k9")


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert masked_mean(x, torch.tensor([[1.0, 0.0, 1.0]])).item() == 2.0
