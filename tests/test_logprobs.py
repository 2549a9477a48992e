"""Vocab-parallel log-probs and entropy on one rank: hand-computed values, a full-vocabulary
log_softmax reference, padded vocab ids ignored, and the gradient against autograd.
(The tp=2 case runs in test_parallel_equivalence, against a full-vocabulary log_softmax.)"""

import math

import pytest
import torch

from remax_megatron.ops.logprobs import masked_mean, vocab_parallel_log_probs


def test_hand_computed_values_and_padding_ignored():
    # softmax over the 3 real ids is (1, 2, 3) / 6; id 3 is vocab padding with a huge logit.
    logits = torch.tensor([[[0.0, math.log(2), math.log(3), 100.0]]])
    target = torch.tensor([[2]])
    logp, entropy = vocab_parallel_log_probs(logits, target, true_vocab_size=3, with_entropy=True)
    assert logp.item() == pytest.approx(math.log(0.5), abs=1e-6)
    p = [1 / 6, 2 / 6, 3 / 6]
    assert entropy.item() == pytest.approx(-sum(x * math.log(x) for x in p), abs=1e-6)


def test_matches_full_vocab_log_softmax_and_gradient():
    torch.manual_seed(0)
    true_vocab, padded = 50, 64
    logits = (3 * torch.randn(2, 7, padded, dtype=torch.float64)).requires_grad_()
    target = torch.randint(0, true_vocab, (2, 7))
    logp, entropy = vocab_parallel_log_probs(logits, target, true_vocab, with_entropy=True)

    ref_logits = logits[..., :true_vocab]
    ref_lsm = torch.log_softmax(ref_logits, dim=-1)
    ref_logp = ref_lsm.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ref_entropy = -(ref_lsm.exp() * ref_lsm).sum(-1)
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=1e-6, rtol=0)

    weights = torch.randn(2, 7, dtype=torch.float64)
    (grad,) = torch.autograd.grad((logp * weights).sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref_logp * weights).sum(), logits)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=0)
    assert grad[..., true_vocab:].abs().max() == 0  # padded ids get no gradient


def test_does_not_modify_logits_and_takes_bf16():
    logits = torch.randn(3, 5, 16).to(torch.bfloat16)
    before = logits.clone()
    target = torch.randint(0, 16, (3, 5))
    logp = vocab_parallel_log_probs(logits, target, 16)
    assert torch.equal(logits, before)
    assert logp.dtype == torch.float32
    ref = torch.log_softmax(logits.float(), -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=0)


def test_masked_mean_excludes_padded_rows():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)


def test_frame_log_probs_from_the_logits_at_response_positions_only():
    """Logits computed only at the loss mask's positions give, in the frame, exactly the
    log-softmax values (and entropy) there and zero elsewhere; plain log_softmax is the reference."""
    from remax_megatron.ops.logprobs import frame_log_probs

    g = torch.Generator().manual_seed(3)
    rows, seq, vocab = 3, 7, 11
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    mask = torch.zeros(rows, seq - 1)
    mask[0, 2:6] = 1
    mask[1, 1:3] = 1
    mask[2, 4:5] = 1
    logits = torch.randn(rows, seq, vocab, generator=g)
    positions = mask.nonzero()
    picked = logits[positions[:, 0], positions[:, 1]].unsqueeze(0).requires_grad_()  # [1, n, v]
    batch = {"input_ids": ids, "loss_mask": mask, "logit_positions": positions}
    lp, entropy = frame_log_probs(picked, batch, vocab, with_entropy=True)
    full = torch.log_softmax(logits[:, :-1], -1)
    want = full.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask
    assert lp.shape == (rows, seq - 1)
    torch.testing.assert_close(lp, want, rtol=0, atol=1e-6)
    want_entropy = -(full.exp() * full).sum(-1) * mask
    torch.testing.assert_close(entropy, want_entropy, rtol=0, atol=1e-5)
    # gradient: d(sum lp)/d logit = onehot - softmax at each picked position
    lp.sum().backward()
    soft = torch.softmax(logits[positions[:, 0], positions[:, 1]], -1)
    onehot = torch.nn.functional.one_hot(ids[positions[:, 0], positions[:, 1] + 1], vocab)
    torch.testing.assert_close(picked.grad[0], onehot - soft, rtol=0, atol=1e-6)
    # without positions: every position's logits, the same values on the mask
    dense = frame_log_probs(logits, {"input_ids": ids, "loss_mask": mask}, vocab)
    torch.testing.assert_close(dense * mask, want, rtol=0, atol=1e-6)
