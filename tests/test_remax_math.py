"""ReMax advantage, returns and loss against hand-computed values."""

import math

import pytest
import torch

from remax_megatron.algorithms.remax import (
    ReMaxConfig, advantage, kl_penalty, policy_loss, returns,
)
from remax_megatron.config_io import ConfigError


def test_advantage_is_sampled_minus_greedy_and_clips():
    rs, rg = torch.tensor([1.0, 0.5, 9.0]), torch.tensor([0.25, 2.0, -1.0])
    assert advantage(rs, rg).tolist() == [0.75, -1.5, 10.0]
    assert advantage(rs, rg, clip=5.0).tolist() == [0.75, -1.5, 5.0]


def test_returns_paper_default_is_the_advantage_on_every_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    r = returns(torch.tensor([2.0, -1.0]), mask)
    assert r.tolist() == [[2.0, 2.0, 2.0, 0.0], [-1.0, 0.0, 0.0, 0.0]]


def test_returns_with_gamma_and_kl_official_formula():
    # T = 3: return_t = kl_t + gamma^(3 - t) * A  ->  gamma^3 A, gamma^2 A, gamma A
    mask = torch.tensor([[1, 1, 1, 0]])
    kl = torch.tensor([[0.1, -0.2, 0.3, 99.0]])
    r = returns(torch.tensor([1.0]), mask, gamma=0.5, kl=kl)
    torch.testing.assert_close(r, torch.tensor([[0.125 + 0.1, 0.25 - 0.2, 0.5 + 0.3, 0.0]]))


def test_kl_penalty_sign():
    lp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    torch.testing.assert_close(kl_penalty(lp, ref, 0.1), torch.tensor([[-0.05, 0.1]]))


def test_loss_reductions_by_hand():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rets = returns(torch.tensor([2.0, -1.0]), mask)
    loss_sum, n = policy_loss(logp, rets, mask, "sequence_sum")
    # -(2*(-1) + 2*(-2) + (-1)*(-0.5)) = 5.5 over 2 sequences
    assert loss_sum.item() == pytest.approx(5.5) and n.item() == 2
    loss_sum_t, n_t = policy_loss(logp, rets, mask, "token_mean")
    assert loss_sum_t.item() == pytest.approx(5.5) and n_t.item() == 3
    (loss_sum / n).backward()
    assert logp.grad.tolist() == [[-1.0, -1.0, 0.0], [0.5, 0.0, 0.0]]


def test_paper_loss_equals_mean_of_advantage_times_sequence_logprob():
    torch.manual_seed(0)
    logp = -torch.rand(4, 6)
    mask = (torch.arange(6) < torch.tensor([[6], [2], [4], [1]])).long()
    adv = torch.randn(4)
    loss_sum, n = policy_loss(logp, returns(adv, mask), mask)
    paper = -(adv * (logp * mask).sum(-1)).mean()
    assert (loss_sum / n).item() == pytest.approx(paper.item(), abs=1e-6)


@pytest.mark.parametrize("kw,needle", [
    (dict(loss_reduction="mean"), "loss_reduction='mean'"),
    (dict(kl_coef=-1.0), "kl_coef=-1.0 must be >= 0"),
    (dict(gamma=0.0), "gamma=0.0 must be in (0, 1]"),
    (dict(clip_advantage=0.0), "clip_advantage=0.0 must be > 0"),
])
def test_config_errors(kw, needle):
    with pytest.raises(ConfigError) as err:
        ReMaxConfig(**kw)
    assert needle in str(err.value)


def test_discount_uses_each_rows_own_length():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    r = returns(torch.tensor([1.0, 1.0]), mask, gamma=0.9)
    assert r[0, :2].tolist() == pytest.approx([0.81, 0.9])
    assert r[1].tolist() == pytest.approx([math.pow(0.9, 3), 0.81, 0.9])


def test_returns_do_not_depend_on_where_the_response_sits():
    # the trainer's rows hold the prompt first: the response starts at any offset
    at_start = returns(torch.tensor([1.0]), torch.tensor([[1, 1, 1, 0, 0]]), gamma=0.5)
    shifted = returns(torch.tensor([1.0]), torch.tensor([[0, 0, 1, 1, 1]]), gamma=0.5)
    assert at_start[0, :3].tolist() == shifted[0, 2:].tolist() == [0.125, 0.25, 0.5]
