"""The ReMax loss and its gradients on the same weights and rollouts: megatron at tp2, pp2 and
dp2 (through the trainer's own micro-batching and loss) against a single-process plain-torch
computation with transformers, written out longhand from the paper's / official formulas."""

from __future__ import annotations

import pytest
import torch

from conftest import WORKERS, read_json, run_torchrun
from remax_megatron import tiny
from remax_megatron.convert import llama, rules
from remax_megatron.convert.commands import hf_to_mcore
from remax_megatron.models.hf_config import from_hf_config

WORKER = str(WORKERS / "train_equivalence.py")
N = 8
TOL = 2e-5


def plain_torch_loss(model, prompts, responses, adv, ref_lp, alg):
    """sum over sequences and response tokens of -return_t * log pi(y_t), where
    return_t = kl_coef * (log pi_ref(y_t) - log pi(y_t)) + gamma^(T - t) * A (the KL term
    detached); divided by the number of sequences (sequence_sum) or of tokens (token_mean)."""
    total = torch.zeros(())
    tokens = 0
    for i in range(len(prompts)):
        seq = torch.tensor([prompts[i] + responses[i]])
        logp = torch.log_softmax(model(seq).logits[0], dim=-1)
        T = len(responses[i])
        for t in range(T):
            position = len(prompts[i]) - 1 + t
            token_logp = logp[position, responses[i][t]]
            # KL in the reward uses the policy's own log-prob (no gradient through it)
            ret = alg["gamma"] ** (T - t) * adv[i] + alg["kl_coef"] * (ref_lp[i][t] -
                                                                         token_logp.detach())
            total = total - ret * token_logp
        tokens += T
    return total / (len(prompts) if alg["loss_reduction"] == "sequence_sum" else tokens)


ALGORITHMS = {
    "paper": {"loss_reduction": "sequence_sum", "gamma": 1.0, "kl_coef": 0.0},
    "official": {"loss_reduction": "token_mean", "gamma": 0.9, "kl_coef": 0.1},
}


def build_reference(root, alg_name):
    tokenizer = tiny.build_tokenizer(300)
    model = tiny.build_hf_model("LlamaForCausalLM", len(tokenizer), seed=9)
    hf_dir = tiny.save_hf(model, tokenizer, root / "hf")
    ckpt = hf_to_mcore(hf_dir, root / "ckpt")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, len(tokenizer), (int(n),), generator=g).tolist()
               for n in torch.randint(2, 7, (N,), generator=g)]
    responses = [torch.randint(3, len(tokenizer), (int(n),), generator=g).tolist()
                 for n in torch.randint(1, 6, (N,), generator=g)]
    adv = torch.randn(N, generator=g).tolist()
    rollout_lp = [(-torch.rand(6, generator=g) * 5).tolist() for _ in range(N)]
    ref_lp = [(-torch.rand(6, generator=g) * 5).tolist() for _ in range(N)]
    alg = ALGORITHMS[alg_name]
    loss = plain_torch_loss(model, prompts, responses, adv, ref_lp, alg)
    model.zero_grad()
    loss.backward()
    hf_grads = {name: p.grad for name, p in model.named_parameters()}
    config = from_hf_config(model.config.to_dict()).config
    expected = dict(rules.to_mcore(llama.rules(config, False), hf_grads.__getitem__))
    path = root / "ref.pt"
    torch.save({"checkpoint": str(ckpt), "prompts": prompts, "responses": responses,
                "advantages": adv, "rollout_log_probs": rollout_lp, "ref_log_probs": ref_lp,
                "algorithm": alg, "expected_loss": loss.item(), "expected_grads": expected}, path)
    return path


CASES = {
    "tp2_paper": (2, ["--tp", "2"], "paper"),
    "pp2_official": (2, ["--pp", "2"], "official"),
    "dp2_official": (2, [], "official"),
}


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_match_plain_torch(case, tmp_path):
    nproc, flags, alg = CASES[case]
    ref = build_reference(tmp_path, alg)
    run_torchrun(nproc, [WORKER, "--ref", str(ref), "--report", str(tmp_path / "r.json"), *flags])
    report = read_json(tmp_path / "r.json")
    assert report.pop("names_match") == 0.0
    assert report.pop("loss") < 1e-5
    assert len(report) > 10
    bad = {k: v for k, v in report.items() if not v < TOL}
    assert not bad, f"{case}: gradients differ from plain torch: {bad}"
