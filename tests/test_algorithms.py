"""Every estimator and loss term against hand-computed values (GAE also against a plain reversed
loop), and the algorithm options: per-algorithm defaults and one-line errors."""

import math

import pytest
import torch

from remax_megatron.algorithms import ALGORITHMS, AlgorithmConfig, grpo, ppo, reinforce, remax, rloo
from remax_megatron.algorithms.common import (
    clipped_surrogate, clipped_value_loss, discounted_returns, gae, k3_kl, kl_penalty, last_token,
    policy_gradient_loss, reduce, whiten,
)
from remax_megatron.config_io import ConfigError


def cfg(name="remax", **kw):
    return AlgorithmConfig(name=name, **kw)


# --- sequence-level estimators --------------------------------------------------------------
def test_remax_advantage_is_sampled_minus_greedy_and_clips():
    rs, rg = torch.tensor([[1.0], [0.5], [9.0]]), torch.tensor([0.25, 2.0, -1.0])
    assert remax.sequence_advantages(rs, rg, cfg()).flatten().tolist() == [0.75, -1.5, 10.0]
    clipped = remax.sequence_advantages(rs, rg, cfg(clip_advantage=5.0))
    assert clipped.flatten().tolist() == [0.75, -1.5, 5.0]


def test_remax_with_n_samples_subtracts_the_one_greedy_reward_from_each():
    rs, rg = torch.tensor([[1.0, 0.0, 3.0], [2.0, 2.0, 0.5]]), torch.tensor([1.0, 0.5])
    assert remax.sequence_advantages(rs, rg, cfg()).tolist() == [[0.0, -1.0, 2.0],
                                                                 [1.5, 1.5, 0.0]]


def test_reinforce_advantage_is_the_reward():
    r = torch.tensor([[0.25, -2.0]])
    assert reinforce.sequence_advantages(r, None, cfg("reinforce")).tolist() == [[0.25, -2.0]]
    clipped = reinforce.sequence_advantages(r, None, cfg("reinforce", clip_advantage=1.0))
    assert clipped.tolist() == [[0.25, -1.0]]


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    r = torch.tensor([[1.0, 2.0, 4.0], [5.0, 5.0, 5.0]])
    # others' means: (2+4)/2 = 3, (1+4)/2 = 2.5, (1+2)/2 = 1.5
    adv = rloo.sequence_advantages(r, None, cfg("rloo"))
    assert adv.tolist() == [[-2.0, -0.5, 2.5], [0.0, 0.0, 0.0]]


def test_grpo_normalizes_by_the_groups_mean_and_unbiased_std():
    r = torch.tensor([[1.0, 2.0, 4.0]])
    # mean 7/3; deviations -4/3, -1/3, 5/3; unbiased variance (16 + 1 + 25) / 9 / 2 = 7/3
    std = math.sqrt(7 / 3)
    adv = grpo.sequence_advantages(r, None, cfg("grpo", std_eps=1e-6))
    want = [-4 / 3 / (std + 1e-6), -1 / 3 / (std + 1e-6), 5 / 3 / (std + 1e-6)]
    assert adv[0].tolist() == pytest.approx(want, rel=1e-6)
    same = grpo.sequence_advantages(torch.tensor([[2.0, 2.0]]), None, cfg("grpo"))
    assert same.tolist() == [[0.0, 0.0]]  # no signal, no NaN


def test_ppo_outcome_is_the_clipped_score():
    r = torch.tensor([[7.0], [-0.5], [-9.0]])
    assert ppo.sequence_advantages(r, None, cfg("ppo")).flatten().tolist() == [5.0, -0.5, -5.0]
    unclipped = ppo.sequence_advantages(r, None, cfg("ppo", clip_reward=None))
    assert unclipped.flatten().tolist() == [7.0, -0.5, -9.0]


# --- per-token returns and KL -----------------------------------------------------------------
def test_returns_paper_default_is_the_advantage_on_every_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    r = discounted_returns(torch.tensor([2.0, -1.0]), mask)
    assert r.tolist() == [[2.0, 2.0, 2.0, 0.0], [-1.0, 0.0, 0.0, 0.0]]


def test_returns_with_gamma_and_kl_official_formula():
    # T = 3: return_t = kl_t + gamma^(3 - t) * A  ->  gamma^3 A, gamma^2 A, gamma A
    mask = torch.tensor([[1, 1, 1, 0]])
    kl = torch.tensor([[0.1, -0.2, 0.3, 99.0]])
    r = discounted_returns(torch.tensor([1.0]), mask, gamma=0.5, kl=kl)
    torch.testing.assert_close(r, torch.tensor([[0.125 + 0.1, 0.25 - 0.2, 0.5 + 0.3, 0.0]]))


def test_returns_use_each_rows_own_length_and_offset():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    r = discounted_returns(torch.tensor([1.0, 1.0]), mask, gamma=0.9)
    assert r[0, :2].tolist() == pytest.approx([0.81, 0.9])
    assert r[1].tolist() == pytest.approx([0.9 ** 3, 0.81, 0.9])
    at_start = discounted_returns(torch.tensor([1.0]), torch.tensor([[1, 1, 1, 0, 0]]), 0.5)
    shifted = discounted_returns(torch.tensor([1.0]), torch.tensor([[0, 0, 1, 1, 1]]), 0.5)
    assert at_start[0, :3].tolist() == shifted[0, 2:].tolist() == [0.125, 0.25, 0.5]


def test_remax_token_advantages_put_the_kl_from_the_given_log_probs():
    mask = torch.tensor([[0, 1, 1]])
    old, ref = torch.tensor([[0.0, -1.0, -2.0]]), torch.tensor([[0.0, -1.5, -1.0]])
    adv, rets = remax.token_advantages(torch.tensor([1.0]), mask, old, ref, None,
                                       cfg(kl_coef=0.1))
    assert rets is None
    torch.testing.assert_close(adv, torch.tensor([[0.0, 1.0 - 0.05, 1.0 + 0.1]]))


def test_kl_penalty_sign_and_k3_by_hand():
    lp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    torch.testing.assert_close(kl_penalty(lp, ref, 0.1), torch.tensor([[-0.05, 0.1]]))
    # k3 = exp(ref - lp) - (ref - lp) - 1: diff -0.5 and +1
    want = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1 - 1]
    assert k3_kl(lp, ref)[0].tolist() == pytest.approx(want)
    assert k3_kl(lp, lp).abs().max().item() == 0.0


# --- reductions and losses ----------------------------------------------------------------------
def test_reductions_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert [x.item() for x in reduce(per_token, mask, "sequence_sum")] == [7.0, 2.0]
    assert [x.item() for x in reduce(per_token, mask, "token_mean")] == [7.0, 3.0]
    # (1 + 2) / 2 + 4 / 1 = 5.5 over 2 sequences
    assert [x.item() for x in reduce(per_token, mask, "sequence_mean")] == [5.5, 2.0]
    with pytest.raises(ConfigError, match="loss reduction 'mean'"):
        reduce(per_token, mask, "mean")


def test_policy_gradient_loss_and_its_gradient_by_hand():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rets = discounted_returns(torch.tensor([2.0, -1.0]), mask)
    loss_sum, n = policy_gradient_loss(logp, rets, mask, "sequence_sum")
    # -(2*(-1) + 2*(-2) + (-1)*(-0.5)) = 5.5 over 2 sequences
    assert loss_sum.item() == pytest.approx(5.5) and n.item() == 2
    (loss_sum / n).backward()
    assert logp.grad.tolist() == [[-1.0, -1.0, 0.0], [0.5, 0.0, 0.0]]


def test_paper_loss_equals_mean_of_advantage_times_sequence_logprob():
    torch.manual_seed(0)
    logp = -torch.rand(4, 6)
    mask = (torch.arange(6) < torch.tensor([[6], [2], [4], [1]])).long()
    adv = torch.randn(4)
    loss_sum, n = policy_gradient_loss(logp, discounted_returns(adv, mask), mask)
    paper = -(adv * (logp * mask).sum(-1)).mean()
    assert (loss_sum / n).item() == pytest.approx(paper.item(), abs=1e-6)


def test_clipped_surrogate_by_hand():
    old = torch.zeros(1, 4)
    lp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]]))  # ratios
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, clipped = clipped_surrogate(lp, old, adv, 0.2)
    # -min(1.5, 1.2) = -1.2 (clipped); -min(-1.5, -1.2) = 1.5; -min(0.5, 0.8) = -0.5;
    # -min(-0.5, -0.8) = 0.8 (clipped)
    assert loss[0].tolist() == pytest.approx([-1.2, 1.5, -0.5, 0.8])
    assert clipped[0].tolist() == [True, False, False, True]


def test_gaps_off_the_mask_never_overflow():
    # a prompt / padding position may hold any log-prob: exp of its gap must not give inf * 0
    lp = torch.tensor([[-200.0, -1.0]], requires_grad=True)
    other = torch.tensor([[0.0, -1.0]])
    mask = torch.tensor([[0, 1]])
    loss, _ = clipped_surrogate(lp, other, torch.ones(1, 2), 0.2, mask)
    kl = k3_kl(lp, other, mask)
    total, _ = reduce(loss + kl, mask, "token_mean")
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(lp.grad).all()
    assert math.isinf(k3_kl(lp, other)[0, 0].item())  # what the mask prevents


def test_first_ppo_update_gradient_is_the_plain_policy_gradient():
    # one epoch, one mini-batch: pi_old is the current policy, the ratio is exactly 1
    torch.manual_seed(1)
    lp = (-torch.rand(3, 5)).requires_grad_()
    adv = torch.randn(3, 5)
    loss, clipped = clipped_surrogate(lp, lp.detach(), adv, 0.2)
    assert not clipped.any()
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, -adv)


def test_clipped_value_loss_by_hand():
    old = torch.tensor([[1.0, 1.0, 1.0]])
    new = torch.tensor([[1.5, 1.1, 0.0]])
    rets = torch.tensor([[2.0, 0.0, 0.0]])
    loss, clipped = clipped_value_loss(new, old, rets, 0.2)
    # v=1.5: clipped 1.2 -> max(0.25, 0.64) / 2; v=1.1: inside -> 1.21 / 2;
    # v=0.0: clipped 0.8 -> max(0, 0.64) / 2
    assert loss[0].tolist() == pytest.approx([0.32, 0.605, 0.32])
    assert clipped[0].tolist() == [True, False, True]


# --- GAE ------------------------------------------------------------------------------------------
def plain_gae(rewards, values, gamma, lam):
    """The textbook reversed loop over one response (V after the last token is 0)."""
    adv, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
        adv[t] = running
    return adv


def test_gae_by_hand():
    # gamma = lam = 1: A_1 = r_1 - v_1; A_0 = r_0 + v_1 - v_0 + A_1 = r_0 + r_1 - v_0
    adv, rets = gae(torch.tensor([[0.5, 2.0]]), torch.tensor([[0.25, 1.0]]),
                    torch.tensor([[1, 1]]), 1.0, 1.0)
    assert adv[0].tolist() == [2.25, 1.0]
    assert rets[0].tolist() == [2.5, 2.0]  # = A + V: the reward to go


def test_gae_matches_a_reversed_loop_on_each_rows_tokens():
    torch.manual_seed(3)
    rewards, values = torch.randn(4, 9), torch.randn(4, 9)
    spans = [(0, 9), (2, 7), (5, 6), (3, 9)]  # responses anywhere in the row (prompt first)
    mask = torch.zeros(4, 9)
    for row, (a, b) in enumerate(spans):
        mask[row, a:b] = 1
    adv, rets = gae(rewards * mask, values, mask, 0.9, 0.8)
    for row, (a, b) in enumerate(spans):
        want = plain_gae(rewards[row, a:b].tolist(), values[row, a:b].tolist(), 0.9, 0.8)
        assert adv[row, a:b].tolist() == pytest.approx(want, abs=1e-6)
        assert rets[row, a:b].tolist() == pytest.approx(
            [w + v for w, v in zip(want, values[row, a:b].tolist())], abs=1e-6)
        assert adv[row, :a].abs().sum() == 0 and adv[row, b:].abs().sum() == 0


def test_ppo_token_rewards_kl_everywhere_score_at_the_last_token():
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    old = torch.tensor([[0.0, -1.0, -1.0, -1.0, 0.0]])
    ref = torch.tensor([[0.0, -2.0, -1.0, -0.5, 0.0]])
    r = ppo.token_rewards(torch.tensor([3.0]), mask, old, ref, cfg("ppo", kl_coef=0.1))
    torch.testing.assert_close(r, torch.tensor([[0.0, -0.1, 0.0, 3.05, 0.0]]))
    assert last_token(mask).tolist() == [[0, 0, 0, 1, 0]]


def test_whiten_uses_the_given_statistics_and_the_mask():
    out = whiten(torch.tensor([[1.0, 3.0, 7.0]]), torch.tensor([[1, 1, 0]]), 2.0, 1.0, eps=0.0)
    assert out.tolist() == [[-1.0, 1.0, 0.0]]


# --- options ----------------------------------------------------------------------------------------
def test_each_algorithm_gets_its_own_defaults():
    assert cfg().loss_reduction == "sequence_sum" and cfg().kl_coef == 0.0
    p = cfg("ppo")
    assert (p.kl_coef, p.clip_reward, p.gamma, p.lam, p.clip_ratio, p.clip_value) == (
        0.1, 5.0, 1.0, 0.95, 0.2, 0.2)
    assert (p.ppo_epochs, p.mini_batches, p.whiten_advantages) == (1, 1, False)
    g = cfg("grpo")
    assert (g.kl_loss_coef, g.loss_reduction, g.clip_ratio) == (0.04, "sequence_mean", 0.2)
    assert g.kl_coef is None and cfg().clip_ratio is None  # options an algorithm does not read
    for name, module in ALGORITHMS.items():
        c = cfg(name)
        assert all(getattr(c, option) == value for option, value in module.DEFAULTS.items())


def test_explicit_values_win_and_null_turns_a_clip_off():
    assert cfg("ppo", clip_reward=None).clip_reward is None
    assert cfg(kl_coef=0.05, gamma=0.99).gamma == 0.99
    assert cfg("rloo", clip_ratio=None).clip_ratio is None  # null for an unread option is fine


@pytest.mark.parametrize("kw,needle", [
    (dict(name="dpo"), "algorithm.name='dpo' is unknown: use one of remax, ppo, reinforce"),
    (dict(clip_ratio=0.2), "algorithm.clip_ratio=0.2 is not an option of algorithm.name=remax: "
                           "its options are clip_advantage, gamma, kl_coef, loss_reduction"),
    (dict(name="grpo", kl_coef=0.1), "algorithm.kl_coef=0.1 is not an option of algorithm.name=grpo"),
    (dict(loss_reduction="mean"), "algorithm.loss_reduction='mean' must be one of sequence_sum"),
    (dict(kl_coef=-1.0), "algorithm.kl_coef=-1.0 must be in [0, 100]"),
    # finite and sane: each of these trained nothing but NaN weights, exit 0 (issue 18)
    (dict(kl_coef=float("inf")), "algorithm.kl_coef=inf must be in [0, 100]"),
    (dict(kl_coef=1e30), "algorithm.kl_coef=1e+30 must be in [0, 100]"),
    (dict(name="grpo", kl_loss_coef=float("nan")), "algorithm.kl_loss_coef=nan must be in [0, 100]"),
    (dict(clip_advantage=float("inf")), "algorithm.clip_advantage=inf must be a finite number > 0, "
                                        "or null (no clip)"),
    (dict(name="grpo", std_eps=float("inf")), "algorithm.std_eps=inf must be a finite number > 0"),
    (dict(gamma=0.0), "algorithm.gamma=0.0 must be in (0, 1]"),
    (dict(clip_advantage=0.0), "algorithm.clip_advantage=0.0 must be a finite number > 0, or null"),
    (dict(name="ppo", lam=1.5), "algorithm.lam=1.5 must be in [0, 1]"),
    (dict(name="ppo", ppo_epochs=0), "algorithm.ppo_epochs=0 must be at least 1"),
    (dict(name="grpo", clip_ratio=-0.1), "algorithm.clip_ratio=-0.1 must be a finite number > 0"),
    (dict(kl_coef=None), "algorithm.kl_coef=null: algorithm.name=remax needs a value (its "
                         "default is 0.0)"),
])
def test_option_errors_are_one_line(kw, needle):
    with pytest.raises(ConfigError) as err:
        AlgorithmConfig(**kw)
    assert needle in str(err.value) and "\n" not in str(err.value)
