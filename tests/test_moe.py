"""Mixture-of-experts models (Mixtral, Qwen3-MoE, Qwen2-MoE with its gated shared expert) against
transformers: converted checkpoints give transformers' logits on a padded batch at tp1, ep2,
tp2 x ep2 and pp2 x ep2 (experts resharded on load); hf -> mcore -> hf is bit-identical, also
from a checkpoint re-saved at tp2 x ep2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from conftest import run_python, run_torchrun
from remax_megatron import tiny
from remax_megatron.convert.commands import hf_to_mcore, mcore_to_hf
from test_convert import (
    VOCAB, _assert_bit_identical, check_report, hf_outputs, layout_report, padded_batch,
)
ARCHS = ("MixtralForCausalLM", "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    tokenizer = tiny.build_tokenizer(VOCAB)
    ids, mask = padded_batch(len(tokenizer))
    cases = {}
    for seed, arch in enumerate(ARCHS):
        model = tiny.build_hf_model(arch, len(tokenizer), seed=seed)
        hf_dir = tiny.save_hf(model, tokenizer, root / f"{arch}_hf")
        cases[arch] = {"checkpoint": str(hf_to_mcore(hf_dir, root / arch)), "hf_dir": str(hf_dir),
                       "expected": hf_outputs(model, ids, mask)}
    torch.save({"cases": cases, "input_ids": ids, "mask": mask}, root / "reference.pt")
    return {"root": root, "ref": root / "reference.pt", "cases": cases, "ids": ids, "mask": mask,
            "models": {arch: tiny.build_hf_model(arch, len(tokenizer), seed=seed)
                       for seed, arch in enumerate(ARCHS)}}


def test_routing_is_not_trivial(converted):
    """Every expert of every layer gets tokens and no expert gets them all, so a wrong expert
    order or a wrong top-k weighting would change the logits."""
    for arch, model in converted["models"].items():
        counts = []
        hooks = [layer.mlp.gate.register_forward_hook(
            lambda _m, _i, out: counts.append(out[0] if isinstance(out, tuple) else out))
            for layer in _layers(model)]
        with torch.no_grad():
            model(input_ids=converted["ids"], attention_mask=converted["mask"])
        for hook in hooks:
            hook.remove()
        k = model.config.num_experts_per_tok
        for logits in counts:
            chosen = torch.bincount(logits.topk(k, dim=-1).indices.flatten(),
                                    minlength=logits.size(-1))
            assert chosen.min() > 0 and chosen.max() < logits.size(0), (arch, chosen.tolist())


def _layers(model):
    return model.model.layers


def test_single_rank_matches_transformers(converted, tmp_path):
    check_report(layout_report(converted["ref"], tmp_path), ARCHS)


LAYOUTS = {"ep2": (2, ["--ep", "2"]), "pp2_ep2": (4, ["--pp", "2", "--ep", "2"])}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_expert_parallel_layouts_match_transformers(layout, converted, tmp_path):
    check_report(layout_report(converted["ref"], tmp_path, *LAYOUTS[layout]), ARCHS)


@pytest.fixture(scope="module")
def resaved_tp2_ep2(converted, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp2ep2")
    report = layout_report(converted["ref"], out, 4,
                           ["--tp", "2", "--ep", "2", "--resave", str(out / "resaved")])
    return out, report


@pytest.mark.distributed
def test_tp2_ep2_matches_transformers(resaved_tp2_ep2):
    check_report(resaved_tp2_ep2[1], ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_is_bit_identical_and_loads(arch, converted, tmp_path):
    case = converted["cases"][arch]
    out = mcore_to_hf(case["checkpoint"], tmp_path / "hf")
    _assert_bit_identical(Path(case["hf_dir"]), out)
    model = getattr(transformers, arch).from_pretrained(out).eval()
    got = hf_outputs(model, converted["ids"], converted["mask"])
    real = converted["mask"].bool()
    assert torch.equal(got[real], case["expected"][real])


@pytest.mark.distributed
@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_saved_at_tp2_ep2_exports_bit_identically(arch, converted, resaved_tp2_ep2,
                                                             tmp_path):
    out = mcore_to_hf(resaved_tp2_ep2[0] / "resaved" / arch, tmp_path / "hf")
    _assert_bit_identical(Path(converted["cases"][arch]["hf_dir"]), out)


@pytest.mark.distributed
def test_expert_parallel_greedy_generation_equals_transformers(converted, tmp_path):
    """`generate --ep 2`: 5 prompts over 2 dp ranks (3 and 2: the second rank runs filler rows
    so that both step together) give transformers' greedy tokens, in input order."""
    import json

    from test_generate_cli import NEW, ROWS, check_output, read_output

    arch = "Qwen3MoeForCausalLM"
    model = converted["models"][arch]
    tokenizer = transformers.AutoTokenizer.from_pretrained(converted["cases"][arch]["hf_dir"])
    expected = []
    for row in ROWS:
        ids = (tokenizer(row["prompt"]).input_ids if "prompt" in row else
               tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"])
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
        expected.append(out[0, len(ids):].tolist())
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    run_torchrun(2, ["-m", "remax_megatron", "generate", "--load",
                     converted["cases"][arch]["checkpoint"], "--input", str(tmp_path / "in.jsonl"),
                     "--output", str(tmp_path / "out.jsonl"), "--greedy", "--max-new-tokens",
                     str(NEW), "--batch-size", "2", "--ep", "2"])
    check_output(read_output(tmp_path / "out.jsonl"), expected)


# the demo with a tiny Qwen3-MoE-shaped policy: 4 experts of 64, top-2, q/k norms
MOE_DEMO = ["policy.model.num_experts=4", "policy.model.moe_topk=2",
            "policy.model.moe_ffn_hidden_size=64", "policy.model.qk_norm=true",
            "policy.moe_aux_loss_coef=0.01", "parallel.ep=2", "train.steps=4",
            "checkpoint.save_every=2", "train.global_batch_size=8", "train.micro_batch_size=4",
            "rollout.max_new_tokens=8"]


@pytest.mark.distributed
def test_expert_parallel_run_resumes_exactly_and_logs_routing(tmp_path):
    """A ReMax run of an MoE policy at ep2, killed after its step-2 checkpoint and resumed, logs
    the uninterrupted run's metrics and ends with its weights; every row has the experts' token
    shares and the load-balancing loss; the checkpoint exports as a Qwen3-MoE model."""
    from safetensors.torch import load_file

    from conftest import full_and_resumed_runs, run_metrics, same_run

    full, broken = full_and_resumed_runs(MOE_DEMO, tmp_path, nproc=2)
    rows, resumed = run_metrics(full), run_metrics(broken)
    same_run(rows, resumed, tol=0.0)
    for key in ("moe/expert_share_min", "moe/expert_share_max", "moe/aux_loss"):
        assert [r[key] for r in rows] == [r[key] for r in resumed], key
    for row in rows:
        assert 0 < row["moe/expert_share_min"] <= 0.25 <= row["moe/expert_share_max"] < 1
        assert row["moe/aux_loss"] > 0 and row["moe/routing_mismatch"] < 0.01
    # the same first step on one process: the same rollout, loss and expert shares (tokens only,
    # whatever each rank's padding). Not the gradients: megatron's load-balancing loss is taken
    # per micro-batch, and the micro-batches differ with dp
    single = tmp_path / "single"
    run_python(["-m", "remax_megatron", "train", "--output-dir", str(single),
                *[a for a in MOE_DEMO if a != "parallel.ep=2"], "train.steps=1"])
    (one,) = run_metrics(single)
    for key in ("reward/sampled", "loss", "moe/expert_share_min", "moe/expert_share_max"):
        assert abs(rows[0][key] - one[key]) <= 1e-6 * max(1.0, abs(one[key])), key
    a = mcore_to_hf(full / "checkpoints" / "step_000004", tmp_path / "a")
    b = mcore_to_hf(broken / "checkpoints" / "step_000004", tmp_path / "b")
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(".mlp.experts.3.down_proj." in k for k in wa)
    assert transformers.AutoConfig.from_pretrained(a).architectures == ["Qwen3MoeForCausalLM"]


def test_a_forced_expert_choice_is_the_mixture_of_those_experts(megatron_runtime):
    """A router's Choice with a target: the layer's output is, per token, the softmax of the
    router's logits over the given experts weighting those experts' SwiGLU outputs (plain
    torch); without one, the choice recorded is the top-k of the logits."""
    import torch.nn.functional as F

    from remax_megatron.models.builder import build_model
    from remax_megatron.models.config import ModelConfig
    from remax_megatron.rollout.routes import routers
    from remax_megatron.runtime import cpu_compat

    config = ModelConfig.llama(num_layers=1, hidden_size=32, num_attention_heads=4,
                               ffn_hidden_size=48, vocab_size=64, max_position_embeddings=16,
                               num_experts=4, moe_topk=2)
    model = build_model(config)
    mlp, router = model.decoder.layers[0].mlp, routers(model)[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 32, generator=g)
    target = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(10)])
    logits = x.reshape(10, 32) @ router.weight.t()
    with torch.no_grad(), cpu_compat.active():
        router.router_replay.target = target
        forced, _ = mlp(x)
        router.router_replay.target, seen = None, []
        router.router_replay.sink = seen.append
        mlp(x)
        router.router_replay.sink = None
    assert torch.equal(seen[0].sort(-1).values, logits.topk(2, -1).indices.sort(-1).values)
    want = torch.zeros(10, 32)
    for t in range(10):
        weights = torch.softmax(logits[t, target[t]], -1)
        for w, e in zip(weights, target[t].tolist()):
            expert = mlp.experts.local_experts[e]
            gate, up = (x.reshape(10, 32)[t] @ expert.linear_fc1.weight.t()).chunk(2)
            want[t] += w * (F.silu(gate) * up) @ expert.linear_fc2.weight.t()
    assert torch.allclose(forced.reshape(10, 32), want, atol=1e-5)


def test_routing_replay_in_fp32_changes_nothing_where_the_choices_agree(tmp_path):
    """fp32 rollouts and training forwards route the same (moe/routing_mismatch below 1%: a
    misaligned record would disagree on most tokens); replaying those choices then gives the
    very same run, so the replay hands each token its own experts."""
    from conftest import run_metrics

    runs = {}
    for replay in ("false", "true"):
        run = tmp_path / replay
        run_python(["-m", "remax_megatron", "train", "--output-dir", str(run),
                    *[a for a in MOE_DEMO if not a.startswith(("parallel.ep", "checkpoint"))],
                    "train.steps=2", f"rollout.routing_replay={replay}"])
        runs[replay] = run_metrics(run)
    for off, on in zip(runs["false"], runs["true"]):
        assert off["moe/routing_mismatch"] < 0.01 and "moe/routing_mismatch" not in on
        for key in ("loss", "grad_norm", "logprob_mismatch", "moe/expert_share_max"):
            assert off[key] == on[key], key


def test_training_routes_compare_and_replay_a_batch_s_record(megatron_runtime):
    """TrainingRoutes on a micro-batch's ``routes`` ([positions, rows, k], -1 unknown): compared,
    a record equal to the router's own choice counts no difference and a shifted one counts every
    known token; replayed, the forward takes the record's experts (the same output as forcing
    them directly) and the router's own where the record is -1."""
    from remax_megatron.models.builder import build_model
    from remax_megatron.models.config import ModelConfig
    from remax_megatron.rollout.routes import TrainingRoutes, routers
    from remax_megatron.runtime import cpu_compat

    config = ModelConfig.llama(num_layers=1, hidden_size=32, num_attention_heads=4,
                               ffn_hidden_size=48, vocab_size=64, max_position_embeddings=16,
                               num_experts=4, moe_topk=2)
    model = build_model(config)
    choice = routers(model)[0].router_replay
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(5).expand(2, 5)

    def forward():
        with torch.no_grad(), cpu_compat.active():
            return model(ids, pos, None)

    seen = []
    choice.sink = seen.append
    natural_logits = forward()
    choice.sink = None
    natural = seen[0].view(5, 2, 2)  # [s, b, k]: the router's tokens are s-major
    shifted = (natural + 1) % 4
    compare = TrainingRoutes(model, replay=False)
    compare.before_forward({"routes": {0: natural}})
    forward()
    compare.before_forward({"routes": {0: shifted}})
    forward()
    assert compare.counts.tolist() == [10.0, 20.0]

    record = shifted.clone()
    record[4] = -1  # the last position unknown: routed by the router itself
    replay = TrainingRoutes(model, replay=True)
    replay.before_forward({"routes": {0: record}})
    replayed = forward()
    replay.after()
    choice.target = torch.cat([shifted[:4], natural[4:]]).view(10, 2)
    forced = forward()
    choice.target = None
    assert torch.equal(replayed, forced) and not torch.equal(replayed, natural_logits)
