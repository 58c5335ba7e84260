"""Loss, advantage, KL and shaping math against small hand-computed values, plus property tests.

Expected values are written out as arithmetic (in comments or as Python expressions); they are never
produced by calling the function under test.
"""
import math
from types import SimpleNamespace

import pytest
import torch

from rl.algorithms import (ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS, NEEDS_CRITIC, POLICY_LOSSES,
                           AdvantageInputs, AdvantageParams, aggregate, compute_advantages, discounted_returns, gae,
                           group_normalized_advantages, groups_with_signal, gspo, kl_estimate, kl_reward_penalty,
                           last_token_rewards, leave_one_out_advantages, masked_mean, overlong_penalty,
                           policy_objective, ppo_clip, ppo_clip_loss, register_advantage, register_policy_loss,
                           value_loss, value_objective, whiten)

ATOL = 1e-6


def close(a, b, atol=ATOL):
    b = torch.as_tensor(b, dtype=a.dtype)
    return a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=0.0)


def py_whiten(values):
    """Plain-Python whitening (biased variance) of a list, the reference for `whiten` over a mask."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / std for v in values]


def cfg(**kw):
    base = dict(advantage="grpo", kl_in_reward=False, kl_coef=0.0, kl_estimator="k1", gamma=1.0, lam=1.0,
                normalize_std=True, whiten_advantages=False)
    base.update(kw)
    return SimpleNamespace(**base)


def random_mask(gen, B, T, p=0.7):
    m = (torch.rand(B, T, generator=gen) < p).float()
    m[:, 0] = 1.0  # every row has at least one policy token
    return m


# =============================================================================================
# GRPO / Dr. GRPO
# =============================================================================================
def test_grpo_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_normalized_advantages(r, group_size=4)
    # group 1: mean 0.5, unbiased std sqrt(1/3) -> +-0.5/0.57735 = +-0.866025
    expected = torch.tensor([0.866025, -0.866025, -0.866025, 0.866025, 0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(adv, expected, atol=1e-4)
    assert abs(adv[:4].sum().item()) < 1e-6  # zero mean within a group


def test_grpo_advantages_hand_computed_asymmetric():
    # [1, 0, 0, 0]: mean 0.25, deviations (0.75, -0.25 x3), unbiased var (0.5625 + 3*0.0625)/3 = 0.25 -> std 0.5
    adv = group_normalized_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4, eps=0.0)
    assert close(adv, [0.75 / 0.5, -0.25 / 0.5, -0.25 / 0.5, -0.25 / 0.5])
    # eps is added to the std: 0.75 / (0.5 + 0.5)
    adv = group_normalized_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4, eps=0.5)
    assert close(adv, [0.75, -0.25, -0.25, -0.25])


def test_grpo_advantages_without_std_normalisation():
    # Dr. GRPO: r - group mean only. groups (3, 1) mean 2 and (2, 6) mean 4
    r = torch.tensor([3.0, 1.0, 2.0, 6.0])
    adv = group_normalized_advantages(r, group_size=2, normalize_std=False)
    assert adv.tolist() == [1.0, -1.0, -2.0, 2.0]


@pytest.mark.parametrize("group_size", [2, 3, 4, 8])
@pytest.mark.parametrize("normalize_std", [True, False])
def test_grpo_zero_mean_within_each_group(group_size, normalize_std):
    gen = torch.Generator().manual_seed(group_size)
    r = torch.randn(5 * group_size, generator=gen) * 3 + 1
    adv = group_normalized_advantages(r, group_size, normalize_std=normalize_std)
    assert torch.allclose(adv.view(-1, group_size).mean(1), torch.zeros(5), atol=1e-5)
    groups = r.view(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    if normalize_std:
        # unit unbiased std within each group (eps = 1e-6 is negligible at these scales)
        assert torch.allclose(adv.view(-1, group_size).std(1), torch.ones(5), atol=1e-4)
        assert torch.allclose(adv.view(-1, group_size), centred / (groups.std(1, keepdim=True) + 1e-6), atol=1e-5)
    else:
        assert torch.allclose(adv.view(-1, group_size), centred, atol=1e-5)


def test_grpo_all_equal_group_gives_zero():
    r = torch.tensor([0.7, 0.7, 0.7, 1.0, 0.0, 1.0])
    for normalize_std in (True, False):
        adv = group_normalized_advantages(r, group_size=3, normalize_std=normalize_std)
        assert adv[:3].tolist() == [0.0, 0.0, 0.0]
        assert adv[3:].abs().min().item() > 0.1


def test_grpo_rejects_ragged_groups():
    with pytest.raises(ValueError, match="groups of 3"):
        group_normalized_advantages(torch.zeros(4), group_size=3)
    with pytest.raises(ValueError, match="groups of 4"):
        ADVANTAGE_ESTIMATORS["grpo"](AdvantageInputs(torch.zeros(6), torch.ones(6, 2), 4), AdvantageParams())


def test_grpo_estimator_broadcasts_over_mask():
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    adv, ret = ADVANTAGE_ESTIMATORS["grpo"](AdvantageInputs(torch.tensor([3.0, 1.0]), mask, 2),
                                            AdvantageParams(normalize_std=False))
    # scores 3-2 = 1, 1-2 = -1 on each sample's policy tokens
    assert close(adv, [[1.0, 1.0, 0.0], [0.0, -1.0, -1.0]])
    assert ret is None


# =============================================================================================
# RLOO
# =============================================================================================
def test_rloo_hand_computed():
    r = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    adv = leave_one_out_advantages(r, group_size=3)
    expected = [1 - (2 + 6) / 2, 2 - (1 + 6) / 2, 6 - (1 + 2) / 2,  # -3, -1.5, 4.5
                0 - (0 + 3) / 2, 0 - (0 + 3) / 2, 3 - (0 + 0) / 2]  # -1.5, -1.5, 3
    assert close(adv, expected)


@pytest.mark.parametrize("group_size", [2, 3, 5, 8])
def test_rloo_equals_scaled_group_centred(group_size):
    gen = torch.Generator().manual_seed(100 + group_size)
    r = torch.randn(4 * group_size, generator=gen)
    groups = r.view(-1, group_size)
    expected = group_size / (group_size - 1) * (groups - groups.mean(1, keepdim=True))
    assert torch.allclose(leave_one_out_advantages(r, group_size), expected.view(-1), atol=1e-5)


def test_rloo_needs_two_samples_and_even_groups():
    with pytest.raises(ValueError, match="group_size >= 2"):
        leave_one_out_advantages(torch.zeros(3), group_size=1)
    with pytest.raises(ValueError, match="groups of 2"):
        leave_one_out_advantages(torch.zeros(3), group_size=2)


def test_rloo_estimator_broadcasts_over_mask():
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    adv, ret = ADVANTAGE_ESTIMATORS["rloo"](AdvantageInputs(torch.tensor([1.0, 4.0]), mask, 2), AdvantageParams())
    assert close(adv, [[1.0 - 4.0, 0.0], [4.0 - 1.0, 4.0 - 1.0]])
    assert ret is None


# =============================================================================================
# last_token_rewards, discounted_returns
# =============================================================================================
def test_last_token_rewards_places_score_on_last_policy_token():
    mask = torch.tensor([[1, 1, 1, 0, 0],   # last policy token at t=2
                         [1, 1, 0, 0, 1],   # multi-turn: env tokens at 2,3, last policy token at 4
                         [0, 0, 0, 0, 0],   # no policy token: stays zero
                         [0, 1, 0, 1, 0],   # holes: last at 3
                         [1, 1, 1, 1, 1]])  # full row: last at 4
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = torch.zeros(5, 5)
    expected[0, 2], expected[1, 4], expected[3, 3], expected[4, 4] = 1.0, 2.0, 4.0, 5.0
    for m in (mask, mask.float(), mask.bool()):
        out = last_token_rewards(scores, m)
        assert out.dtype == torch.float32
        assert torch.equal(out, expected)


def test_discounted_returns_hand_computed_with_hole():
    # row 0: policy tokens at 0, 1, 4 (2, 3 are env tokens: their reward 5 is ignored), gamma 0.9
    #   G4 = 2, G1 = 0 + 0.9*2 = 1.8, G0 = 1 + 0.9*1.8 = 2.62
    # row 1: policy tokens 0..2, padding at 3-4: G2 = 1, G1 = 0.5 + 0.9 = 1.4, G0 = -1 + 0.9*1.4 = 0.26
    rewards = torch.tensor([[1.0, 0.0, 5.0, 5.0, 2.0], [-1.0, 0.5, 1.0, 3.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0, 0.0]])
    ret = discounted_returns(rewards, mask, gamma=0.9)
    assert close(ret, [[1 + 0.9 * (0 + 0.9 * 2), 0 + 0.9 * 2, 0.0, 0.0, 2.0],
                       [-1 + 0.9 * (0.5 + 0.9 * 1), 0.5 + 0.9 * 1, 1.0, 0.0, 0.0]])
    # gamma 1: plain reward-to-go
    assert close(discounted_returns(rewards, mask), [[3.0, 2.0, 0.0, 0.0, 2.0], [0.5, 1.5, 1.0, 0.0, 0.0]])


# =============================================================================================
# GAE
# =============================================================================================
def test_gae_hand_computed_with_hole():
    gamma, lam = 0.9, 0.8
    # row 0: policy tokens 0, 1, 3 (t=2 is an env token: its value 9 is skipped; V after the end = 0)
    #   t3: delta = 1 + 0.9*0 - 0.4 = 0.6                        A3 = 0.6
    #   t1: delta = 0 + 0.9*0.4 - 0.2 = 0.16 (next state = t3)   A1 = 0.16 + 0.72*0.6 = 0.592
    #   t0: delta = 0 + 0.9*0.2 - 0.5 = -0.32                    A0 = -0.32 + 0.72*0.592 = 0.10624
    # row 1: policy tokens 0..2, padding at 3 (value 7 ignored)
    #   t2: delta = 1 - 0.25 = 0.75                              A2 = 0.75
    #   t1: delta = 0 + 0.9*0.25 - 0.5 = -0.275                  A1 = -0.275 + 0.72*0.75 = 0.265
    #   t0: delta = 0.2 + 0.9*0.5 - 1 = -0.35                    A0 = -0.35 + 0.72*0.265 = -0.1592
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.2, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 9.0, 0.4], [1.0, 0.5, 0.25, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    a0 = [-0.32 + 0.72 * (0.16 + 0.72 * 0.6), 0.16 + 0.72 * 0.6, 0.0, 0.6]
    a1 = [-0.35 + 0.72 * (-0.275 + 0.72 * 0.75), -0.275 + 0.72 * 0.75, 0.75, 0.0]
    assert close(adv, [a0, a1])
    assert close(ret, [[a0[0] + 0.5, a0[1] + 0.2, 0.0, a0[3] + 0.4], [a1[0] + 1.0, a1[1] + 0.5, a1[2] + 0.25, 0.0]])


def test_gae_lambda_one_zero_values_equals_discounted_returns():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(6, 9, generator=gen)
    mask = random_mask(gen, 6, 9)
    adv, ret = gae(rewards, torch.zeros(6, 9), mask, gamma=0.95, lam=1.0)
    expected = discounted_returns(rewards, mask, gamma=0.95)
    assert torch.allclose(adv, expected, atol=1e-5)
    assert torch.allclose(ret, expected, atol=1e-5)


def test_gae_lambda_one_is_return_minus_value():
    # with lam = 1 the TD errors telescope: A_t = G_t - V(s_t) for any values (holes included)
    gen = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(5, 8, generator=gen), torch.randn(5, 8, generator=gen)
    mask = random_mask(gen, 5, 8, p=0.6)
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    assert torch.allclose(adv, (discounted_returns(rewards, mask, 0.9) - values) * mask, atol=1e-5)


def test_gae_returns_are_advantages_plus_values_on_mask():
    gen = torch.Generator().manual_seed(2)
    rewards, values = torch.randn(5, 8, generator=gen), torch.randn(5, 8, generator=gen)
    mask = random_mask(gen, 5, 8)
    adv, ret = gae(rewards, values, mask, gamma=0.97, lam=0.9)
    assert torch.allclose(ret, (adv + values) * mask, atol=1e-6)
    assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)
    assert (adv[mask == 1] != 0).all()


def test_gae_estimator_hand_computed_and_whitened():
    # same row-0 setup as the hand example, with the episode reward 1 on the last policy token
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 9.0, 0.4]])
    a = [-0.32 + 0.72 * (0.16 + 0.72 * 0.6), 0.16 + 0.72 * 0.6, 0.6]  # A at t = 0, 1, 3
    inp = AdvantageInputs(torch.tensor([1.0]), mask, 1, values=values)
    adv, ret = ADVANTAGE_ESTIMATORS["gae"](inp, AdvantageParams(gamma=0.9, lam=0.8))
    assert close(adv, [[a[0], a[1], 0.0, a[2]]])
    assert close(ret, [[a[0] + 0.5, a[1] + 0.2, 0.0, a[2] + 0.4]])
    adv_w, ret_w = ADVANTAGE_ESTIMATORS["gae"](inp, AdvantageParams(gamma=0.9, lam=0.8, whiten=True))
    w = py_whiten(a)
    assert close(adv_w, [[w[0], w[1], 0.0, w[2]]], atol=1e-5)
    assert torch.equal(ret_w, ret)  # whitening touches the advantages only, not the critic targets
    assert "gae" in NEEDS_CRITIC and "grpo" not in NEEDS_CRITIC


def test_gae_estimator_without_values_raises():
    with pytest.raises(ValueError, match="critic values"):
        ADVANTAGE_ESTIMATORS["gae"](AdvantageInputs(torch.ones(2), torch.ones(2, 3), 2), AdvantageParams())


# =============================================================================================
# whiten, REINFORCE++
# =============================================================================================
def test_whiten_hand_computed():
    x = torch.tensor([[1.0, 100.0, 3.0], [5.0, -50.0, -50.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    # masked entries 1, 3, 5: mean 3, biased var (4 + 0 + 4)/3
    s = math.sqrt(8 / 3)
    assert close(whiten(x, mask), [[-2 / s, 0.0, 0.0], [2 / s, 0.0, 0.0]], atol=1e-5)


def test_reinforce_pp_hand_computed():
    # gamma 0.5. row 0 mask 111 -> returns (0.25, 0.5, 1); row 1 mask 110 -> (-0.5, -1, off)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = ADVANTAGE_ESTIMATORS["reinforce_pp"](AdvantageInputs(torch.tensor([1.0, -1.0]), mask, 2),
                                                    AdvantageParams(gamma=0.5))
    # masked mean 0.25/5 = 0.05; squared deviations 0.04 + 0.2025 + 0.9025 + 0.3025 + 1.1025 = 2.55 -> var 0.51
    s = math.sqrt(0.51)
    assert close(adv, [[0.2 / s, 0.45 / s, 0.95 / s], [-0.55 / s, -1.05 / s, 0.0]], atol=1e-5)
    assert ret is None


def test_reinforce_pp_whitened_over_masked_tokens():
    gen = torch.Generator().manual_seed(3)
    B, T = 8, 10
    mask = random_mask(gen, B, T)
    mask[2] = 0.0  # a row without policy tokens
    tok = torch.randn(B, T, generator=gen) * 0.1
    inp = AdvantageInputs(torch.randn(B, generator=gen) * 5 + 2, mask, 4, token_rewards=tok)
    adv, _ = ADVANTAGE_ESTIMATORS["reinforce_pp"](inp, AdvantageParams(gamma=0.9))
    on = adv[mask == 1]
    assert abs(on.mean().item()) < 1e-5
    assert on.var(unbiased=False).sqrt().item() == pytest.approx(1.0, abs=1e-4)
    assert torch.all(adv[mask == 0] == 0)


def test_reinforce_pp_with_token_rewards_hand_computed():
    # gamma 1, one row with policy tokens at 0, 2 (t=1 env): token rewards 0.1 at t0, 0.3 at env t1 (ignored),
    # -0.2 at t2 plus score 1 at t2: returns t2 = 0.8, t0 = 0.1 + 0.8 = 0.9; second row one token, return -1
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    tok = torch.tensor([[0.1, 0.3, -0.2], [0.0, 0.0, 0.0]])
    adv, _ = ADVANTAGE_ESTIMATORS["reinforce_pp"](AdvantageInputs(torch.tensor([1.0, -1.0]), mask, 1, tok),
                                                  AdvantageParams())
    w = py_whiten([0.9, 0.8, -1.0])
    assert close(adv, [[w[0], 0.0, w[1]], [w[2], 0.0, 0.0]], atol=1e-5)


def test_reinforce_pp_baseline_hand_computed():
    # groups of 2: (1, 0) mean 0.5 -> (0.5, -0.5); (2, 5) mean 3.5 -> (-1.5, 1.5); gamma 1 broadcasts them
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    params = AdvantageParams()
    adv, _ = ADVANTAGE_ESTIMATORS["reinforce_pp_baseline"](AdvantageInputs(torch.tensor([1.0, 0.0, 2.0, 5.0]),
                                                                           mask, 2), params)
    w = py_whiten([0.5, 0.5, -0.5, -1.5, -1.5, 1.5])
    assert close(adv, [[w[0], w[1]], [w[2], 0.0], [w[3], w[4]], [0.0, w[5]]], atol=1e-5)
    # adding a constant to every reward of a group changes nothing (the group mean absorbs it) ...
    adv_shift, _ = ADVANTAGE_ESTIMATORS["reinforce_pp_baseline"](
        AdvantageInputs(torch.tensor([1.0 + 10, 0.0 + 10, 2.0, 5.0]), mask, 2), params)
    assert torch.allclose(adv_shift, adv, atol=1e-5)
    # ... while plain REINFORCE++ (no per-group baseline) does change
    plain, _ = ADVANTAGE_ESTIMATORS["reinforce_pp"](AdvantageInputs(torch.tensor([1.0, 0.0, 2.0, 5.0]), mask, 2),
                                                    params)
    plain_shift, _ = ADVANTAGE_ESTIMATORS["reinforce_pp"](
        AdvantageInputs(torch.tensor([11.0, 10.0, 2.0, 5.0]), mask, 2), params)
    assert (plain - plain_shift).abs().max().item() > 0.1


# =============================================================================================
# ppo_clip / gspo
# =============================================================================================
def test_ppo_clip_ratio_one_is_policy_gradient():
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    adv = torch.tensor([2.0])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = ppo_clip_loss(lp, lp.clone(), adv, mask)
    assert loss.item() == pytest.approx(-2.0)  # -(1*2 + 1*2)/2
    assert float(stats["clip_frac"]) == 0.0


def test_ppo_clip_per_token_ratio_one_is_minus_advantage():
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, -1.0]])
    adv = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -4.0]])
    per_token, stats = ppo_clip(lp, lp.clone(), adv, torch.ones(2, 3))
    assert close(per_token, [[-2.0, 1.0, -0.5], [0.0, -3.0, 4.0]])
    assert float(stats["clip_frac"]) == 0.0 and float(stats["ratio_mean"]) == pytest.approx(1.0)
    # [B] advantages broadcast over the tokens
    per_token, _ = ppo_clip(lp, lp.clone(), torch.tensor([1.5, -2.0]), torch.ones(2, 3))
    assert close(per_token, [[-1.5] * 3, [2.0] * 3])


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
    assert float(stats["clip_frac"]) == pytest.approx(0.5)  # tokens 0 and 1 are clipped


def test_ppo_clip_higher_hand_computed():
    # token 0: ratio 1.25, A = 2; token 1: ratio 0.75, A = -1
    old = torch.zeros(1, 2)
    lp = torch.tensor([[math.log(1.25), math.log(0.75)]])
    adv = torch.tensor([[2.0, -1.0]])
    mask = torch.ones(1, 2)
    # symmetric eps 0.2: token 0 -> -min(1.25*2, 1.2*2) = -2.4; token 1 -> -min(-0.75, -0.8) = 0.8; both clipped
    pt, st = ppo_clip(lp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert close(pt, [[-2.4, 0.8]], atol=1e-5) and float(st["clip_frac"]) == pytest.approx(1.0)
    # clip-higher eps_high 0.28: 1.25 < 1.28 is not clipped -> -2.5; the low side is unchanged
    pt, st = ppo_clip(lp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert close(pt, [[-2.5, 0.8]], atol=1e-5) and float(st["clip_frac"]) == pytest.approx(0.5)
    # widening only the low side: 0.75 > 1 - 0.3 is not clipped -> 0.75; the high side clips again
    pt, st = ppo_clip(lp, old, adv, mask, clip_low=0.3, clip_high=0.2)
    assert close(pt, [[-2.4, 0.75]], atol=1e-5) and float(st["clip_frac"]) == pytest.approx(0.5)


def test_ppo_clip_pessimistic_side_is_not_clipped():
    # A > 0 with a small ratio, A < 0 with a large ratio: min() keeps the unclipped term (no clip counted)
    old = torch.zeros(1, 2)
    lp = torch.tensor([[math.log(0.5), math.log(1.5)]])
    pt, st = ppo_clip(lp, old, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2))
    assert close(pt, [[-0.5, 1.5]], atol=1e-6)
    assert float(st["clip_frac"]) == 0.0


def test_ppo_clip_frac_and_ratio_mean_count_masked_tokens_only():
    # ratios 1.5 (A>0: clipped), 1.0, 1.1 (inside), 3.0 (clipped but off-mask)
    old = torch.zeros(1, 4)
    lp = torch.log(torch.tensor([[1.5, 1.0, 1.1, 3.0]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    _, st = ppo_clip(lp, old, torch.tensor([1.0]), mask)
    assert float(st["clip_frac"]) == pytest.approx(1 / 3)
    assert float(st["ratio_mean"]) == pytest.approx((1.5 + 1.0 + 1.1) / 3, rel=1e-6)
    _, st = ppo_clip(lp, old, torch.tensor([1.0]), torch.ones(1, 4))
    assert float(st["clip_frac"]) == pytest.approx(2 / 4)


def test_ppo_clip_gradient_masks_non_policy_tokens():
    lp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    loss, _ = ppo_clip_loss(lp, lp.detach(), torch.tensor([1.0]), torch.tensor([[1.0, 0.0]]))
    loss.backward()
    assert lp.grad[0, 1].item() == 0.0 and lp.grad[0, 0].item() == pytest.approx(-1.0)


def test_ppo_clip_clipped_token_has_no_gradient():
    old = torch.zeros(1, 2)
    lp = torch.tensor([[0.5, 0.05]], requires_grad=True)  # ratio e^0.5 clipped (A > 0), e^0.05 not
    per_token, _ = ppo_clip(lp, old, torch.tensor([1.0]), torch.ones(1, 2))
    per_token.sum().backward()
    assert lp.grad[0, 0].item() == 0.0
    assert lp.grad[0, 1].item() == pytest.approx(-math.exp(0.05), rel=1e-6)  # d(-rho*A)/dlp = -rho*A


def test_gspo_sequence_ratio_hand_computed():
    # log-ratios 0.3, -0.1, 0.1 on the policy tokens (mean 0.1), 5.0 on an off-mask token (ignored)
    old = torch.zeros(1, 4)
    lp = torch.tensor([[0.3, -0.1, 0.1, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    s = math.exp((0.3 - 0.1 + 0.1) / 3)  # 1.10517
    pt, st = gspo(lp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.2)
    assert close(pt * mask, [[-s, -s, -s, 0.0]], atol=1e-6)  # the same ratio on every token
    assert float(st["ratio_mean"]) == pytest.approx(s, rel=1e-6) and float(st["clip_frac"]) == 0.0
    # default GSPO eps (3e-4, 4e-4): clipped at 1 + 4e-4
    pt, st = gspo(lp, old, torch.tensor([1.0]), mask)
    assert close(pt * mask, [[-(1 + 4e-4)] * 3 + [0.0]], atol=1e-6)
    assert float(st["clip_frac"]) == pytest.approx(1.0)
    # a negative advantage with the same ratio is not clipped (pessimistic side): -(s * -2)
    pt, st = gspo(lp, old, torch.tensor([-2.0]), mask)
    assert close(pt * mask, [[2 * s] * 3 + [0.0]], atol=1e-6) and float(st["clip_frac"]) == 0.0


@pytest.mark.parametrize("per_token_adv", [False, True])
def test_gspo_equals_ppo_clip_with_one_policy_token_per_sequence(per_token_adv):
    gen = torch.Generator().manual_seed(4)
    B, T = 16, 6
    mask = torch.zeros(B, T)
    mask[torch.arange(B), torch.randint(0, T, (B,), generator=gen)] = 1.0
    lp, old = -torch.rand(B, T, generator=gen) * 2, -torch.rand(B, T, generator=gen) * 2
    old = lp + (old - lp) * 0.3  # log-ratios in about [-0.6, 0.6]: some clipped, some not
    adv = torch.randn(B, T, generator=gen) if per_token_adv else torch.randn(B, generator=gen)
    pt_g, st_g = gspo(lp, old, adv, mask, clip_low=0.2, clip_high=0.25)
    pt_p, st_p = ppo_clip(lp, old, adv, mask, clip_low=0.2, clip_high=0.25)
    assert torch.allclose(pt_g * mask, pt_p * mask, atol=1e-6)
    assert 0.0 < float(st_p["clip_frac"]) < 1.0  # the example exercises both branches
    assert float(st_g["clip_frac"]) == pytest.approx(float(st_p["clip_frac"]))
    assert float(st_g["ratio_mean"]) == pytest.approx(float(st_p["ratio_mean"]), rel=1e-6)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_gspo_gradient_is_sequence_ratio_times_advantage(mode):
    gen = torch.Generator().manual_seed(5)
    B, T = 4, 5
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    base = -torch.rand(B, T, generator=gen) * 2
    old = base + torch.randn(B, T, generator=gen) * 0.05  # small log-ratios: no sequence is clipped
    adv = torch.tensor([1.0, -2.0, 0.5, -0.7])
    lp = base.clone().requires_grad_(True)
    per_token, st = gspo(lp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert float(st["clip_frac"]) == 0.0
    aggregate(per_token, mask, mode).backward()
    n = mask.sum(1)
    s = torch.exp(((base - old) * mask).sum(1) / n)  # s_i = exp(mean log-ratio over policy tokens)
    w = {"token-mean": torch.full((B,), 1.0 / mask.sum()),
         "seq-mean-token-mean": 1.0 / (n * B),
         "seq-mean-token-sum": torch.full((B,), 1.0 / B)}[mode]
    expected = (-s * adv * w).unsqueeze(1) * mask
    assert torch.allclose(lp.grad, expected, atol=1e-6)


def test_gspo_token_gradient_with_per_token_advantages():
    # GSPO-token: s_i,t = sg[s_i] * pi_t / sg[pi_t], so d loss / d logp_t = -s_i * A_i,t * w_t (token-mean w = 1/N);
    # a non-detached sequence ratio would instead spread the sequence's mean advantage over its tokens.
    old = torch.zeros(1, 3)
    base = torch.tensor([[0.02, -0.04, 0.05]])  # mean log-ratio 0.01, inside the clip range
    lp = base.clone().requires_grad_(True)
    adv = torch.tensor([[1.0, -3.0, 0.5]])
    per_token, _ = gspo(lp, old, adv, torch.ones(1, 3), clip_low=0.2, clip_high=0.2)
    aggregate(per_token, torch.ones(1, 3)).backward()
    s = math.exp((0.02 - 0.04 + 0.05) / 3)
    assert close(lp.grad, [[-s * 1.0 / 3, -s * -3.0 / 3, -s * 0.5 / 3]], atol=1e-6)


def test_gspo_clipped_sequence_has_no_gradient():
    old = torch.zeros(2, 2)
    lp = torch.tensor([[0.5, 0.3], [0.01, -0.01]], requires_grad=True)  # seq 0: ratio e^0.4 clipped, A > 0
    per_token, _ = gspo(lp, old, torch.tensor([1.0, 1.0]), torch.ones(2, 2), clip_low=0.2, clip_high=0.2)
    per_token.sum().backward()
    assert lp.grad[0].tolist() == [0.0, 0.0]
    assert close(lp.grad[1], [-1.0, -1.0], atol=1e-6)  # s = exp(0) = 1


# =============================================================================================
# aggregate
# =============================================================================================
AGG_X = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 100.0, 100.0]])
AGG_M = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])


def test_aggregate_modes_hand_computed():
    assert aggregate(AGG_X, AGG_M, "token-mean").item() == pytest.approx((1 + 2 + 3 + 4 + 5) / 5)  # 3
    assert aggregate(AGG_X, AGG_M, "seq-mean-token-mean").item() == pytest.approx((6 / 3 + 9 / 2) / 2)  # 3.25
    assert aggregate(AGG_X, AGG_M, "seq-mean-token-sum").item() == pytest.approx(15 / 2)
    assert aggregate(AGG_X, AGG_M, "seq-mean-token-sum-norm", norm_tokens=4).item() == pytest.approx(15 / (2 * 4))
    assert aggregate(AGG_X, AGG_M).item() == pytest.approx(3.0)  # default mode: token-mean


def test_aggregate_count_overrides():
    assert aggregate(AGG_X, AGG_M, "token-mean", num_tokens=10).item() == pytest.approx(15 / 10)
    assert aggregate(AGG_X, AGG_M, "token-mean", num_seqs=7).item() == pytest.approx(3.0)  # num_seqs unused
    assert aggregate(AGG_X, AGG_M, "seq-mean-token-mean", num_seqs=4).item() == pytest.approx((2 + 4.5) / 4)
    assert aggregate(AGG_X, AGG_M, "seq-mean-token-sum", num_seqs=5).item() == pytest.approx(15 / 5)
    assert aggregate(AGG_X, AGG_M, "seq-mean-token-sum", num_tokens=1).item() == pytest.approx(15 / 2)
    assert aggregate(AGG_X, AGG_M, "seq-mean-token-sum-norm", num_seqs=3,
                     norm_tokens=5).item() == pytest.approx(15 / (3 * 5))


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_aggregate_micro_batches_sum_to_full_batch(mode):
    gen = torch.Generator().manual_seed(6)
    B, T = 7, 9
    x = torch.randn(B, T, generator=gen)
    mask = random_mask(gen, B, T, p=0.5)
    mask[3] = 0.0  # an empty row still counts as a sequence
    kw = dict(norm_tokens=16) if mode == "seq-mean-token-sum-norm" else {}
    full = aggregate(x, mask, mode, **kw)
    for cut in (1, 3, 5):
        parts = [(x[:cut], mask[:cut]), (x[cut:], mask[cut:])]
        total = sum(aggregate(px, pm, mode, num_tokens=float(mask.sum()), num_seqs=B, **kw) for px, pm in parts)
        assert total.item() == pytest.approx(full.item(), abs=1e-6)
    # without the overrides the micro-batch results do not add up (the check above is not vacuous)
    naive = aggregate(x[:3], mask[:3], mode, **kw) + aggregate(x[3:], mask[3:], mode, **kw)
    assert abs(naive.item() - full.item()) > 1e-3


def test_aggregate_errors():
    with pytest.raises(ValueError, match="unknown loss aggregation 'sum'") as e:
        aggregate(AGG_X, AGG_M, "sum")
    for name in LOSS_AGGREGATIONS:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="norm_tokens"):
        aggregate(AGG_X, AGG_M, "seq-mean-token-sum-norm")


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert masked_mean(x, torch.tensor([[1.0, 0.0, 1.0]])).item() == 2.0
    assert masked_mean(x, torch.zeros(1, 3)).item() == 0.0  # empty mask: 0, not NaN
    rows = masked_mean(torch.tensor([[1.0, 2.0], [3.0, 5.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=1)
    assert rows.tolist() == [1.0, 4.0]


# =============================================================================================
# value loss
# =============================================================================================
V = torch.tensor([[1.0, 2.0, 1.5, 0.0]])
V_OLD = torch.tensor([[0.5, 2.0, 1.0, 9.0]])
V_RET = torch.tensor([[2.0, 1.0, 1.0, 0.0]])
V_MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0]])


def test_value_loss_clipped_hand_computed():
    pt, st = value_loss(V, V_OLD, V_RET, V_MASK, clip=0.2)
    # t0: err (1-2)^2 = 1; clipped V 0.5 + 0.2 = 0.7 -> (0.7-2)^2 = 1.69 larger -> 0.845 (clip counted)
    # t1: V = V_old: both 1 -> 0.5 (not counted: equal)
    # t2: err 0.25; clipped V 1.2 -> 0.04 smaller -> max keeps 0.25 -> 0.125
    # t3 (off-mask): err 0; clipped V 9 - 0.2 = 8.8 -> 77.44 -> 38.72 (would count as clipped)
    assert close(pt, [[0.5 * 1.69, 0.5, 0.125, 0.5 * 8.8 ** 2]], atol=1e-4)
    assert st["value_clip_frac"] == pytest.approx(1 / 3)
    _, st = value_loss(V, V_OLD, V_RET, torch.ones(1, 4), clip=0.2)
    assert st["value_clip_frac"] == pytest.approx(2 / 4)
    loss, st = value_objective(V, V_OLD, V_RET, V_MASK, clip=0.2)
    assert loss.item() == pytest.approx((0.845 + 0.5 + 0.125) / 3, rel=1e-5)
    assert st["value_loss"] == pytest.approx(loss.item()) and st["value_clip_frac"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("clip", [None, 0, 0.0])
def test_value_loss_unclipped_hand_computed(clip):
    pt, st = value_loss(V, V_OLD, V_RET, V_MASK, clip=clip)
    assert close(pt, [[0.5 * 1.0, 0.5 * 1.0, 0.5 * 0.25, 0.0]])
    assert st["value_clip_frac"] == 0.0


def test_value_loss_wide_clip_equals_unclipped():
    pt, st = value_loss(V, V_OLD, V_RET, V_MASK, clip=100.0)
    assert close(pt, [[0.5, 0.5, 0.125, 0.0]]) and st["value_clip_frac"] == 0.0


# =============================================================================================
# KL
# =============================================================================================
def test_kl_estimators_hand_computed():
    lp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])  # log-ratio 0.5
    assert kl_estimate(lp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_estimate(lp, ref, "k2").item() == pytest.approx(0.125)
    assert kl_estimate(lp, ref, "k3").item() == pytest.approx(math.exp(-0.5) - 1 + 0.5)
    assert kl_estimate(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError, match="available"):
        kl_estimate(lp, ref, "k9")


def test_kl_estimators_negative_log_ratio():
    lp, ref = torch.tensor([-2.0]), torch.tensor([-1.0])  # log-ratio -1
    assert kl_estimate(lp, ref, "k1").item() == pytest.approx(-1.0)
    assert kl_estimate(lp, ref, "k2").item() == pytest.approx(0.5)
    assert kl_estimate(lp, ref, "k3").item() == pytest.approx(math.e - 2, rel=1e-6)  # e^1 - 1 - 1
    assert kl_estimate(lp, ref).item() == pytest.approx(math.e - 2, rel=1e-6)  # default k3


def test_kl_k3_non_negative():
    gen = torch.Generator().manual_seed(7)
    lp, ref = torch.randn(2000, generator=gen) * 3, torch.randn(2000, generator=gen) * 3
    k3 = kl_estimate(lp, ref, "k3")
    assert (k3 >= 0).all()
    assert (kl_estimate(lp, ref, "k1") < 0).any()  # k1 is not (the property is specific to k3)


def test_kl_unknown_estimator_lists_available():
    with pytest.raises(ValueError, match="unknown KL estimator 'k9'") as e:
        kl_estimate(torch.zeros(1), torch.zeros(1), "k9")
    for name in ("k1", "k2", "k3"):
        assert name in str(e.value)


def test_kl_reward_penalty_on_mask_only():
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -3.0]])  # log-ratios 0.5, -1, 2.5
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert close(kl_reward_penalty(lp, ref, mask, 0.1, "k1"), [[-0.1 * 0.5, -0.1 * -1.0, 0.0]])
    assert close(kl_reward_penalty(lp, ref, mask, 0.1, "k2"), [[-0.1 * 0.125, -0.1 * 0.5, 0.0]])
    assert close(kl_reward_penalty(lp, ref, mask, 0.1), [[-0.05, 0.1, 0.0]])  # default k1
    assert close(kl_reward_penalty(lp, ref, mask, 0.1, "k3"),
                 [[-0.1 * (math.exp(-0.5) - 0.5), -0.1 * (math.exp(1.0) - 2.0), 0.0]])


# =============================================================================================
# policy_objective
# =============================================================================================
PO_LP = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
PO_ADV = torch.tensor([2.0, -1.0])
PO_MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
PO_REF = torch.tensor([[-1.5, -0.5, 0.0], [-1.0, 0.0, 0.0]])  # log-ratios 0.5, -0.5 | -1 on the mask


def test_policy_objective_plain_equals_aggregated_policy_loss():
    # ratio 1: per-token loss -A: row 0 (-2, -2), row 1 (1)
    loss, st = policy_objective(PO_LP, PO_LP.clone(), PO_ADV, PO_MASK)
    assert loss.item() == pytest.approx((-2 - 2 + 1) / 3)
    assert st["pg_loss"] == pytest.approx(-1.0) and float(st["clip_frac"]) == 0.0 and "kl_ref" not in st
    loss, _ = policy_objective(PO_LP, PO_LP.clone(), PO_ADV, PO_MASK, loss_agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx((-4 / 2 + 1 / 1) / 2)
    loss, _ = policy_objective(PO_LP, PO_LP.clone(), PO_ADV, PO_MASK, loss_agg="seq-mean-token-sum", num_seqs=4)
    assert loss.item() == pytest.approx(-3 / 4)
    loss, _ = policy_objective(PO_LP, PO_LP.clone(), PO_ADV, PO_MASK, loss_agg="seq-mean-token-sum-norm",
                               norm_tokens=3)
    assert loss.item() == pytest.approx(-3 / (2 * 3))
    # a reference without kl_coef, or an entropy without entropy_coef, changes nothing
    loss, st = policy_objective(PO_LP, PO_LP.clone(), PO_ADV, PO_MASK, ref_logprobs=PO_REF, kl_coef=0.0,
                                entropy=torch.ones(2, 3), entropy_coef=0.0)
    assert loss.item() == pytest.approx(-1.0) and "kl_ref" not in st


def test_policy_objective_matches_aggregate_of_policy_loss_random():
    gen = torch.Generator().manual_seed(8)
    lp, old = -torch.rand(4, 6, generator=gen), -torch.rand(4, 6, generator=gen)
    adv, mask = torch.randn(4, generator=gen), random_mask(gen, 4, 6)
    for name in ("ppo_clip", "gspo"):
        for mode in ("token-mean", "seq-mean-token-mean"):
            loss, _ = policy_objective(lp, old, adv, mask, policy_loss=name, loss_agg=mode,
                                       clip_low=0.2, clip_high=0.28)
            pt, _ = POLICY_LOSSES[name](lp, old, adv, mask, clip_low=0.2, clip_high=0.28)
            assert loss.item() == pytest.approx(aggregate(pt, mask, mode).item(), abs=1e-6)


def test_policy_objective_kl_term_hand_computed():
    # k1 token-mean over the mask: (0.5 - 0.5 - 1)/3 = -1/3; loss = -1 + 0.5 * (-1/3)
    loss, st = policy_objective(PO_LP, PO_LP.clone(), PO_ADV, PO_MASK, ref_logprobs=PO_REF, kl_coef=0.5,
                                kl_estimator="k1")
    assert loss.item() == pytest.approx(-1.0 + 0.5 * (-1 / 3))
    assert st["kl_ref"] == pytest.approx(-1 / 3) and st["pg_loss"] == pytest.approx(-1.0)
    # k3 (default): (e^-0.5 - 0.5) + (e^0.5 - 1.5) + (e^1 - 2) over 3 tokens
    k3 = ((math.exp(-0.5) - 0.5) + (math.exp(0.5) - 1.5) + (math.e - 2)) / 3
    loss, st = policy_objective(PO_LP, PO_LP.clone(), PO_ADV, PO_MASK, ref_logprobs=PO_REF, kl_coef=0.1)
    assert loss.item() == pytest.approx(-1.0 + 0.1 * k3, rel=1e-6)
    assert st["kl_ref"] == pytest.approx(k3, rel=1e-6)
    # kl_coef without a reference: no KL term
    loss, st = policy_objective(PO_LP, PO_LP.clone(), PO_ADV, PO_MASK, kl_coef=0.5)
    assert loss.item() == pytest.approx(-1.0) and "kl_ref" not in st


def test_policy_objective_kl_uses_aggregation_mode():
    # seq-mean-token-mean: pg (-2 + 1)/2 = -0.5; k1 per seq (0.5 - 0.5)/2 = 0 and -1 -> (0 - 1)/2 = -0.5
    loss, _ = policy_objective(PO_LP, PO_LP.clone(), PO_ADV, PO_MASK, ref_logprobs=PO_REF, kl_coef=0.2,
                               kl_estimator="k1", loss_agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx(-0.5 + 0.2 * -0.5)


def test_policy_objective_entropy_bonus():
    entropy = torch.tensor([[1.0, 2.0, 50.0], [3.0, 50.0, 50.0]])  # off-mask entries ignored: mean (1+2+3)/3 = 2
    loss, _ = policy_objective(PO_LP, PO_LP.clone(), PO_ADV, PO_MASK, entropy=entropy, entropy_coef=0.01)
    assert loss.item() == pytest.approx(-1.0 - 0.01 * 2.0)
    loss, _ = policy_objective(PO_LP, PO_LP.clone(), PO_ADV, PO_MASK, entropy=entropy, entropy_coef=0.01,
                               ref_logprobs=PO_REF, kl_coef=0.5, kl_estimator="k1")
    assert loss.item() == pytest.approx(-1.0 + 0.5 * (-1 / 3) - 0.01 * 2.0)


def test_policy_objective_unknown_loss_lists_available():
    with pytest.raises(ValueError, match="unknown policy loss 'nope'") as e:
        policy_objective(PO_LP, PO_LP, PO_ADV, PO_MASK, policy_loss="nope")
    assert "ppo_clip" in str(e.value) and "gspo" in str(e.value)


# =============================================================================================
# compute_advantages (pipeline)
# =============================================================================================
def test_compute_advantages_grpo_broadcasts_group_scores():
    # one group [1, 0, 0, 0]: mean 0.25, unbiased std 0.5 -> scores (1.5, -0.5, -0.5, -0.5) (eps 1e-6)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
    adv, ret, st = compute_advantages(cfg(), torch.tensor([1.0, 0.0, 0.0, 0.0]), mask, group_size=4)
    s = [0.75 / (0.5 + 1e-6), -0.25 / (0.5 + 1e-6)]
    assert close(adv, [[s[0], s[0], 0, 0], [s[1], 0, s[1], s[1]], [0, s[1], s[1], s[1]], [s[1]] * 4])
    assert ret is None
    assert st["advantage/mean"] == pytest.approx((2 * s[0] + 10 * s[1]) / 12, rel=1e-5)  # 12 policy tokens
    assert st["advantage/abs_mean"] == pytest.approx((2 * s[0] - 10 * s[1]) / 12, rel=1e-5)
    assert "kl/reward_penalty" not in st and "critic/returns_mean" not in st
    # Dr. GRPO: no std division
    adv, _, _ = compute_advantages(cfg(normalize_std=False), torch.tensor([1.0, 0.0, 0.0, 0.0]), mask, 4)
    assert close(adv, [[0.75, 0.75, 0, 0], [-0.25, 0, -0.25, -0.25], [0, -0.25, -0.25, -0.25], [-0.25] * 4])


def test_compute_advantages_kl_in_reward_hand_computed():
    # Dr. GRPO scores for the group (1, 0): +0.5, -0.5. kl_coef 0.1, k1, gamma 1.
    # row 0, policy tokens 0, 1, 3 (t=2 env): log-ratios 0.5, -1, (7 ignored), 0.2 -> penalties -0.05, 0.1, -0.02
    #   A3 = 0.5 - 0.02 = 0.48; A1 = 0.1 + 0.48 = 0.58; A0 = -0.05 + 0.58 = 0.53
    # row 1, policy tokens 0..2: log-ratios 0.2, 0.3, -0.4 -> penalties -0.02, -0.03, 0.04
    #   A2 = -0.5 + 0.04 = -0.46; A1 = -0.03 - 0.46 = -0.49; A0 = -0.02 - 0.49 = -0.51
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    ref = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-2.0, -2.0, -2.0, -2.0]])
    old = ref + torch.tensor([[0.5, -1.0, 7.0, 0.2], [0.2, 0.3, -0.4, 9.0]])
    algo = cfg(kl_in_reward=True, kl_coef=0.1, kl_estimator="k1", normalize_std=False)
    adv, ret, st = compute_advantages(algo, torch.tensor([1.0, 0.0]), mask, 2, old_logprobs=old, ref_logprobs=ref)
    assert close(adv, [[0.53, 0.58, 0.0, 0.48], [-0.51, -0.49, -0.46, 0.0]], atol=1e-5)
    assert ret is None
    assert st["kl/reward_penalty"] == pytest.approx((-0.05 + 0.1 - 0.02 - 0.02 - 0.03 + 0.04) / 6, abs=1e-6)
    # k2 penalties -0.1 * l^2/2: row 0 (-0.0125, -0.05, -0.002): A3 = 0.498, A1 = 0.448, A0 = 0.4355
    adv, _, _ = compute_advantages(cfg(kl_in_reward=True, kl_coef=0.1, kl_estimator="k2", normalize_std=False),
                                   torch.tensor([1.0, 0.0]), mask, 2, old, ref)
    assert close(adv[0], [-0.0125 - 0.05 + 0.5 - 0.002, -0.05 + 0.5 - 0.002, 0.0, 0.5 - 0.002], atol=1e-5)
    # gamma 0.5 on row 0: A3 = 0.48; A1 = 0.1 + 0.5*0.48 = 0.34; A0 = -0.05 + 0.5*0.34 = 0.12
    adv, _, _ = compute_advantages(cfg(kl_in_reward=True, kl_coef=0.1, kl_estimator="k1", normalize_std=False,
                                       gamma=0.5), torch.tensor([1.0, 0.0]), mask, 2, old, ref)
    assert close(adv[0], [0.12, 0.34, 0.0, 0.48], atol=1e-5)
    # KL as a loss (kl_in_reward False) or kl_coef 0: the advantages are the plain broadcast scores
    for algo in (cfg(kl_coef=0.1, normalize_std=False), cfg(kl_in_reward=True, kl_coef=0.0, normalize_std=False)):
        adv, _, st = compute_advantages(algo, torch.tensor([1.0, 0.0]), mask, 2, old, ref)
        assert close(adv, [[0.5, 0.5, 0.0, 0.5], [-0.5, -0.5, -0.5, 0.0]]) and "kl/reward_penalty" not in st


def test_compute_advantages_kl_in_reward_needs_logprobs():
    with pytest.raises(ValueError, match="logprobs"):
        compute_advantages(cfg(kl_in_reward=True, kl_coef=0.1), torch.tensor([1.0, 0.0]), torch.ones(2, 3), 2)


def test_compute_advantages_gae_returns_and_stats():
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 9.0, 0.4]])
    a = [-0.32 + 0.72 * (0.16 + 0.72 * 0.6), 0.16 + 0.72 * 0.6, 0.6]  # as in test_gae_hand_computed_with_hole
    adv, ret, st = compute_advantages(cfg(advantage="gae", gamma=0.9, lam=0.8), torch.tensor([1.0]), mask, 1,
                                      values=values)
    assert close(adv, [[a[0], a[1], 0.0, a[2]]])
    assert close(ret, [[a[0] + 0.5, a[1] + 0.2, 0.0, a[2] + 0.4]])
    assert st["critic/returns_mean"] == pytest.approx((a[0] + 0.5 + a[1] + 0.2 + a[2] + 0.4) / 3, rel=1e-5)
    adv_w, _, _ = compute_advantages(cfg(advantage="gae", gamma=0.9, lam=0.8, whiten_advantages=True),
                                     torch.tensor([1.0]), mask, 1, values=values)
    w = py_whiten(a)
    assert close(adv_w, [[w[0], w[1], 0.0, w[2]]], atol=1e-5)
    with pytest.raises(ValueError, match="critic values"):
        compute_advantages(cfg(advantage="gae"), torch.tensor([1.0]), mask, 1)


def test_compute_advantages_unknown_estimator():
    with pytest.raises(ValueError, match="algorithm.advantage='nope' is unknown") as e:
        compute_advantages(cfg(advantage="nope"), torch.zeros(2), torch.ones(2, 2), 2)
    for name in ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gae"):
        assert name in str(e.value)


# =============================================================================================
# shaping
# =============================================================================================
def test_overlong_penalty_hand_computed():
    # max_len 10, buffer 4 -> free up to 6 tokens, then -(len - 6)/4 * 0.5, capped at -0.5
    lengths = torch.tensor([3, 6, 7, 8, 10, 12])
    out = overlong_penalty(lengths, max_len=10, buffer=4, penalty=0.5)
    assert close(out, [0.0, 0.0, -0.5 * 1 / 4, -0.5 * 2 / 4, -0.5, -0.5])
    assert close(overlong_penalty(torch.tensor([9.0]), max_len=10, buffer=4), [-3 / 4])  # default penalty 1
    for buffer in (0, 0.0, -1):
        out = overlong_penalty(lengths, max_len=10, buffer=buffer)
        assert out.shape == (6,) and torch.all(out == 0)


def test_groups_with_signal():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0, 0.5, 0.5 + 1e-3])
    assert groups_with_signal(r, 2).tolist() == [False, True, False, True]
    assert groups_with_signal(r, 4).tolist() == [True, True]
    assert groups_with_signal(r, 2, tol=1e-2).tolist() == [False, True, False, False]
    # a spread of exactly tol does not count (strictly greater)
    assert groups_with_signal(torch.tensor([0.0, 0.5, 0.0, 0.75]), 2, tol=0.5).tolist() == [False, True]


# =============================================================================================
# registries
# =============================================================================================
def test_register_advantage_used_by_compute_advantages():
    name = "_test_constant_adv"

    @register_advantage(name, needs_critic=True)
    def constant(inp, p):
        # 7 * gamma on policy tokens; returns = ones (checks the params and values reach the estimator)
        return inp.mask * 7.0 * p.gamma, inp.values

    try:
        assert ADVANTAGE_ESTIMATORS[name] is constant and name in NEEDS_CRITIC
        mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        adv, ret, st = compute_advantages(cfg(advantage=name, gamma=0.5), torch.zeros(2), mask, 2,
                                          values=torch.ones(2, 2))
        assert close(adv, [[3.5, 0.0], [3.5, 3.5]])
        assert st["critic/returns_mean"] == pytest.approx(1.0)
    finally:
        ADVANTAGE_ESTIMATORS.pop(name, None)
        NEEDS_CRITIC.discard(name)
    assert name not in ADVANTAGE_ESTIMATORS
    with pytest.raises(ValueError, match="unknown"):
        compute_advantages(cfg(advantage=name), torch.zeros(2), torch.ones(2, 2), 2)


def test_register_policy_loss_used_by_policy_objective():
    name = "_test_vanilla_pg"
    seen = {}

    @register_policy_loss(name)
    def vanilla(logprobs, old_logprobs, advantages, mask, clip_low, clip_high):
        seen["clip"] = (clip_low, clip_high)
        return -logprobs * advantages.unsqueeze(1), {"custom": 1.0}

    try:
        assert POLICY_LOSSES[name] is vanilla
        # per-token -lp*A: row 0 -(-1)*2 = 2 on two tokens, row 1 -(-2)*(-1) = -2 on one -> (2 + 2 - 2)/3
        loss, st = policy_objective(PO_LP, PO_LP, PO_ADV, PO_MASK, policy_loss=name, clip_low=0.1, clip_high=0.3)
        assert loss.item() == pytest.approx(2 / 3)
        assert st["custom"] == 1.0 and seen["clip"] == (0.1, 0.3)
    finally:
        POLICY_LOSSES.pop(name, None)
    with pytest.raises(ValueError, match="unknown policy loss"):
        policy_objective(PO_LP, PO_LP, PO_ADV, PO_MASK, policy_loss=name)


def test_builtin_registries():
    assert {"grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gae"} <= set(ADVANTAGE_ESTIMATORS)
    assert {"ppo_clip", "gspo"} <= set(POLICY_LOSSES)
    assert {"k1", "k2", "k3"} <= set(KL_ESTIMATORS)


# -- off-policy correction (rl/algorithms/importance.py) -------------------------------------------
def test_is_weights_are_one_when_behaviour_equals_learner():
    from rl.algorithms import importance_weights

    lp = torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.float32)
    for mode in ("tis", "mis"):
        w, st = importance_weights(lp, lp.clone(), mask, mode, cap=2.0)
        assert torch.equal(w, mask) and st["is/mean"] == 1.0 and st["is/clipped_frac"] == 0.0


def test_tis_truncates_and_mis_masks_hand_computed():
    from rl.algorithms import importance_weights

    old = torch.tensor([[0.0, 0.0, 0.0]])
    beh = torch.tensor([[0.0, -math.log(3.0), math.log(2.0)]])  # w = 1, 3, 0.5
    mask = torch.ones(1, 3)
    w, st = importance_weights(old, beh, mask, "tis", cap=2.0)
    assert w.tolist()[0] == pytest.approx([1.0, 2.0, 0.5])
    assert st["is/mean"] == pytest.approx((1 + 3 + 0.5) / 3) and st["is/clipped_frac"] == pytest.approx(1 / 3)
    assert st["is/max"] == pytest.approx(3.0)
    w, _ = importance_weights(old, beh, mask, "mis", cap=2.0)
    assert w.tolist()[0] == pytest.approx([1.0, 0.0, 0.5])
    w, st = importance_weights(old, beh, mask, "none", cap=2.0)
    assert w.tolist()[0] == [1.0, 1.0, 1.0] and st["is/clipped_frac"] == 0.0
    with pytest.raises(ValueError, match="tis"):
        importance_weights(old, beh, mask, "bad")


def test_is_weights_scale_the_policy_loss_per_token():
    from rl.algorithms import policy_objective

    lp = torch.zeros(1, 2, requires_grad=True)
    adv, mask = torch.tensor([[1.0, 1.0]]), torch.ones(1, 2)
    loss, _ = policy_objective(lp, lp.detach(), adv, mask, is_weights=torch.tensor([[2.0, 0.0]]))
    loss.backward()
    assert loss.item() == pytest.approx(-1.0)  # -(2*1 + 0*1) / 2
    assert lp.grad.tolist() == [[-1.0, 0.0]]
