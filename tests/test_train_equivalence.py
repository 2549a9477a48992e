"""The loss and its gradients on the same weights and rollouts, for ReMax, GRPO and PPO: megatron
at tp2, pp2 and dp2 (through the trainer's own micro-batching and loss) against a single-process
plain-torch computation with transformers, written out longhand from the papers' / official
formulas (PPO's GAE as a plain reversed loop)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import WORKERS, read_json, run_torchrun
from remax_megatron import tiny
from remax_megatron.convert import rules
from remax_megatron.convert.commands import family_module, hf_to_mcore
from remax_megatron.models.hf_config import from_hf_config
from remax_megatron.runtime import precision

WORKER = str(WORKERS / "train_equivalence.py")
N = 8  # trained responses
TOL = 2e-5
# bf16 against the fp32 reference: the loss relative to max(1, |loss|), each gradient's largest
# difference relative to the largest gradient entry (bf16 keeps 8 significant bits: 2^-8 = 0.4%)
BF16_LOSS_TOL = 1e-2
BF16_GRAD_TOL = 5e-2


def response_log_probs(model, prompt, response, temperature=1.0):
    """log softmax(logits / T) at the response's tokens: the distribution a rollout at
    temperature T samples from (rollout.tempered_log_probs, the default)."""
    logits = model(torch.tensor([prompt + response])).logits[0]
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return [logp[len(prompt) - 1 + t, token] for t, token in enumerate(response)]


def remax_terms(lps, outcome, ref, values, alg):
    """-return_t * log pi(y_t), return_t = gamma^(T - t) * A + kl_coef * (log pi_ref - log pi)
    (the KL term from the policy's own log-prob, held constant)."""
    T = len(lps)
    return [-(alg["gamma"] ** (T - t) * outcome + alg["kl_coef"] * (ref[t] - lp.detach())) * lp
            for t, lp in enumerate(lps)]


def surrogate(lp, adv, clip):
    """-min(rho A, clip(rho) A) with rho = pi / pi_old = exp(lp - lp.detach()) (one update: the
    old policy is the current one)."""
    ratio = torch.exp(lp - lp.detach())
    return -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)


def grpo_terms(lps, outcome, ref, values, alg):
    """surrogate(A) + beta * (exp(ref - lp) - (ref - lp) - 1)."""
    return [surrogate(lp, outcome, alg["clip_ratio"]) + alg["kl_loss_coef"] * (
        torch.exp(ref[t] - lp) - (ref[t] - lp) - 1) for t, lp in enumerate(lps)]


def ppo_terms(lps, score, ref, values, alg):
    """GAE by a plain reversed loop over r_t = -kl_coef (log pi - log pi_ref) + [t = T-1] score,
    V after the last token = 0; then the clipped surrogate of each token's advantage."""
    T = len(lps)
    rewards = [-alg["kl_coef"] * (lp.item() - ref[t]) for t, lp in enumerate(lps)]
    rewards[-1] += score
    adv, running = [0.0] * T, 0.0
    for t in reversed(range(T)):
        next_value = values[t + 1] if t + 1 < T else 0.0
        delta = rewards[t] + alg["gamma"] * next_value - values[t]
        running = delta + alg["gamma"] * alg["lam"] * running
        adv[t] = running
    return [surrogate(lp, adv[t], alg["clip_ratio"]) for t, lp in enumerate(lps)]


TERMS = {"remax": remax_terms, "grpo": grpo_terms, "ppo": ppo_terms}


def plain_torch_loss(model, prompts, responses, outcomes, ref_lp, values, alg):
    """Sum the per-token terms, then reduce: sequence_sum (/ sequences), token_mean (/ tokens),
    sequence_mean (each response's token mean, / sequences)."""
    n = alg["n_samples"]
    total, tokens = torch.zeros(()), 0
    for i, response in enumerate(responses):
        lps = response_log_probs(model, prompts[i // n], response, alg.get("temperature", 1.0))
        terms = TERMS[alg["name"]](lps, outcomes[i], ref_lp[i], values[i], alg)
        per_response = sum(terms)
        total = total + (per_response / len(terms) if alg["loss_reduction"] == "sequence_mean"
                         else per_response)
        tokens += len(terms)
    return total / (tokens if alg["loss_reduction"] == "token_mean" else len(responses))


ALGORITHMS = {
    "paper": {"name": "remax", "n_samples": 1, "loss_reduction": "sequence_sum", "gamma": 1.0,
              "kl_coef": 0.0},
    "official": {"name": "remax", "n_samples": 1, "loss_reduction": "token_mean", "gamma": 0.9,
                 "kl_coef": 0.1},
    # sampled at temperature 0.7: the loss's log-probs (and the KL term's) are at T = 0.7
    "grpo": {"name": "grpo", "n_samples": 2, "loss_reduction": "sequence_mean",
             "kl_loss_coef": 0.05, "clip_ratio": 0.2, "temperature": 0.7},
    "ppo": {"name": "ppo", "n_samples": 1, "loss_reduction": "token_mean", "kl_coef": 0.1,
            "gamma": 0.9, "lam": 0.8, "clip_ratio": 0.2},
}


LLAMA = "LlamaForCausalLM"


def build_reference(root, alg_name, arch=LLAMA):
    tokenizer = tiny.build_tokenizer(300)
    # a mixture of experts without its load-balancing loss: the loss is the algorithm's alone
    extra = {"router_aux_loss_coef": 0.0} if "Moe" in arch or "Mixtral" in arch else {}
    model = tiny.build_hf_model(arch, len(tokenizer), seed=9, **extra)
    ckpt = hf_to_mcore(tiny.save_hf(model, tokenizer, root / "hf"), root / "ckpt")
    return write_reference(root, alg_name, model, ckpt, len(tokenizer))


def grads_as_saved(model, directory) -> dict:
    """The gradients under the names a checkpoint stores (transformers keeps a mixture of experts'
    weights fused in memory and writes them one expert at a time): saved with transformers' own
    save_pretrained in the weights' place."""
    from safetensors.torch import load_file

    params = list(model.parameters())
    weights = [p.data for p in params]
    try:
        for p in params:
            p.data = p.grad.detach().clone()
        model.save_pretrained(directory)
    finally:
        for p, w in zip(params, weights):
            p.data = w
    return load_file(str(directory / "model.safetensors"))


def write_reference(root, alg_name, model, ckpt, vocab: int, low_id: int = 3):
    """Random prompts, responses (ids in [low_id, vocab)), outcomes and per-token log-probs; the
    plain-torch loss on ``model`` (a transformers causal LM, converted to ``ckpt``) and its
    gradients in megatron's layout, saved for the worker. Returns the file's path."""
    alg = ALGORITHMS[alg_name]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(low_id, vocab, (int(k),), generator=g).tolist()
               for k in torch.randint(2, 7, (N // alg["n_samples"],), generator=g)]
    responses = [torch.randint(low_id, vocab, (int(k),), generator=g).tolist()
                 for k in torch.randint(1, 6, (N,), generator=g)]
    outcomes = torch.randn(N, generator=g).tolist()
    rollout_lp = [(-torch.rand(6, generator=g) * 5).tolist() for _ in range(N)]
    ref_lp = [(-torch.rand(6, generator=g) * 5).tolist() for _ in range(N)]
    values = [torch.randn(6, generator=g).tolist() for _ in range(N)]
    loss = plain_torch_loss(model, prompts, responses, outcomes, ref_lp, values, alg)
    assert math.isfinite(loss.item())
    model.zero_grad()
    loss.backward()
    hf_grads = {name: p.grad for name, p in model.named_parameters()}
    if any(".experts." in name for name in hf_grads):
        hf_grads = grads_as_saved(model, root / "hf_grads")
    info = from_hf_config(model.config.to_dict())
    family = family_module(info.model_type)
    expected = dict(rules.to_mcore(family.rules(info.config, False), hf_grads.__getitem__))
    model.zero_grad()
    path = root / f"ref_{alg_name}.pt"
    torch.save({"checkpoint": str(ckpt), "prompts": prompts, "responses": responses,
                "outcomes": outcomes, "rollout_log_probs": rollout_lp, "ref_log_probs": ref_lp,
                "values": values, "algorithm": alg, "expected_loss": loss.item(),
                "expected_grads": expected}, path)
    return path


CASES = {
    "tp2_paper": (2, ["--tp", "2"], "paper", LLAMA),
    # bf16 weights (Float16Module, fp32 main params and gradients): the precision path of GPU
    # runs, here on the CPU's bf16 kernels; compared with the fp32 plain-torch reference
    "tp2_paper_bf16": pytest.param(
        2, ["--tp", "2", "--dtype", "bf16"], "paper", LLAMA,
        marks=pytest.mark.skipif(not precision.bf16_supported(),
                                 reason="no native bf16 on this machine")),
    "pp2_official": (2, ["--pp", "2"], "official", LLAMA),
    "dp2_official": (2, [], "official", LLAMA),
    "tp2_grpo": (2, ["--tp", "2"], "grpo", LLAMA),
    "pp2_ppo": (2, ["--pp", "2"], "ppo", LLAMA),
    "dp2_ppo": (2, [], "ppo", LLAMA),
    # a mixture of experts (Qwen3-MoE: q/k norms, 4 experts, top-2) with its experts split
    # over the two data-parallel ranks, which exchange tokens in every MoE layer
    "ep2_qwen3_moe_paper": (2, ["--ep", "2"], "paper", "Qwen3MoeForCausalLM"),
    "ep2_qwen3_moe_grpo": (2, ["--ep", "2"], "grpo", "Qwen3MoeForCausalLM"),
    # megatron trains MoE layers at tp > 1 only with sequence parallelism
    "tp2_ep2_sp_mixtral_paper": (4, ["--tp", "2", "--ep", "2", "--sequence-parallel"], "paper",
                                 "MixtralForCausalLM"),
    "pp2_ep2_qwen3_moe_paper": (4, ["--pp", "2", "--ep", "2"], "paper", "Qwen3MoeForCausalLM"),
    "tp2_ep2_sp_qwen3_moe_grpo": (4, ["--tp", "2", "--ep", "2", "--sequence-parallel"], "grpo",
                                  "Qwen3MoeForCausalLM"),
}


@pytest.mark.distributed
@pytest.mark.parametrize("nproc, flags, alg, arch", list(CASES.values()), ids=list(CASES))
def test_loss_and_gradients_match_plain_torch(nproc, flags, alg, arch, tmp_path, request):
    case = request.node.callspec.id
    ref = build_reference(tmp_path, alg, arch)
    run_torchrun(nproc, [WORKER, "--ref", str(ref), "--report", str(tmp_path / "r.json"), *flags])
    report = read_json(tmp_path / "r.json")
    bf16 = "bf16" in case
    assert report.pop("names_match") == 0.0
    assert report.pop("loss") < (BF16_LOSS_TOL if bf16 else 1e-5)
    assert report.pop("grad_norm") < (BF16_GRAD_TOL if bf16 else TOL)
    assert len(report) > 10
    tol = BF16_GRAD_TOL if bf16 else TOL
    bad = {k: v for k, v in report.items() if not v < tol}
    assert not bad, f"{case}: gradients differ from plain torch: {bad}"
