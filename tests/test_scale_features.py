"""Megatron's scale features as config: activation recompute (train.recompute) and sequence
parallelism (parallel.sequence_parallel), each equivalent to the run without it.

- recompute: none / selective / full give bit-identical gradients, gradient norms and weights
  after an optimizer step on one process, and megatron really recomputes (layers / core attention
  run twice per micro-batch);
- sequence parallelism at tp2 (and tp2 x pp2), alone and with recompute, against a single-process
  reference: loss, gathered gradients (the norms' are partial sums per rank, all-reduced by
  megatron), gradient norm, weights after the step, and the rollout's tokens with sequence
  parallelism switched off around it (every attribute restored afterwards);
- the trainer: a 2-rank run with sequence parallelism (or recompute) logs the metrics of the same
  run without it;
- virtual pipeline stages (parallel.virtual_pp, megatron's interleaved schedule) at pp2: a run
  with two chunks per stage logs the metrics of the pp2 run without them (micro-batches of
  different lengths, in groups of pp and in one odd group; KL to a chunked reference), its
  checkpoints hold the same weights under the same global names (the pp2 run's, and any layout
  loads them), and a run killed after its step-2 checkpoint resumes without chunks exactly;
  PPO's critic is chunked as the policy (same metrics, critic included); at GPT-2 width the
  interleaved schedule's gradients equal the 1F1B schedule's to the bit;
- bad values fail with one line before anything is built.
"""

from __future__ import annotations

import pytest
import torch

from conftest import (
    WORKERS, full_and_resumed_runs, read_json, run_metrics, run_python, run_torchrun, same_run,
)
from remax_megatron.config_io import ConfigError
from remax_megatron.models.builder import (
    RECOMPUTE, build_policy, sequence_multiple, sequence_parallel_off, transformer_config,
)
from remax_megatron.models.checkpoint import load_model
from remax_megatron.models.config import ModelConfig
from remax_megatron.training import demo
from remax_megatron.training.config import load_config
from remax_megatron.training.trainer import Trainer

WORKER = str(WORKERS / "scale_features.py")
LLAMA = ModelConfig.llama(num_layers=2, hidden_size=64, num_attention_heads=4,
                          num_key_value_heads=2, ffn_hidden_size=96, vocab_size=100,
                          max_position_embeddings=64)
GPT2 = ModelConfig.gpt2(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=130,
                        max_position_embeddings=64)


# --- config -------------------------------------------------------------------------------------


def fails(overrides, needle):
    cfg = load_config(None, overrides, base=demo.config())
    with pytest.raises(ConfigError) as err:
        Trainer(cfg)
    assert needle in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_defaults_are_off():
    cfg = load_config(None, [], base=demo.config())
    assert cfg.train.recompute == "none" and cfg.parallel.sequence_parallel is False


def test_unknown_recompute_mode(nothing_built):
    fails(["train.recompute=partial"], "train.recompute='partial': use none, selective or full")


def test_sequence_parallel_needs_tensor_parallelism(nothing_built):
    fails(["parallel.sequence_parallel=true"],
          "parallel.sequence_parallel=true needs parallel.tp >= 2")


def test_sequence_parallel_must_be_a_bool(nothing_built):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["parallel.sequence_parallel=sometimes"], base=demo.config())
    assert "parallel.sequence_parallel" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, needle", [
    (["parallel.virtual_pp=0"], "parallel.virtual_pp=0 must be a positive integer (1: off)"),
    (["parallel.virtual_pp=2"], "parallel.virtual_pp=2 needs pipeline parallelism: set "
                                "parallel.pp >= 2"),
    (["parallel.virtual_pp=2", "parallel.pp=2", "train.micro_batch_size=32"],
     "parallel.virtual_pp=2 needs at least pp=2 micro-batches per update, got 1: lower "
     "train.micro_batch_size"),
    (["parallel.virtual_pp=3", "parallel.pp=2", "policy.model.num_layers=4"],
     "the policy's 4 layers do not split into parallel.pp x virtual_pp = 6 chunks"),
])
def test_virtual_pp_bad_values(overrides, needle, nothing_built, monkeypatch):
    monkeypatch.setenv("RANK", "0")  # as torchrun with 2 ranks would say
    monkeypatch.setenv("WORLD_SIZE", "2")
    fails(overrides, needle)


def test_builder_rejects_bad_values():
    with pytest.raises(ConfigError, match="recompute='everything' is unknown"):
        transformer_config(LLAMA, recompute="everything")
    with pytest.raises(ConfigError, match="sequence_parallel needs tensor parallelism"):
        transformer_config(LLAMA, tp=1, sequence_parallel=True)
    with pytest.raises(ConfigError, match="virtual_pp=2 needs pipeline parallelism"):
        transformer_config(LLAMA, pp=1, virtual_pp=2)
    with pytest.raises(ConfigError, match="2 layers do not split into pp\\*virtual_pp=2\\*2"):
        transformer_config(LLAMA, pp=2, virtual_pp=2)
    assert transformer_config(LLAMA, pp=2).virtual_pipeline_model_parallel_size is None


def test_transformer_config_settings():
    assert transformer_config(LLAMA).recompute_granularity is None
    selective = transformer_config(LLAMA, recompute="selective")
    assert (selective.recompute_granularity, selective.recompute_modules) == (
        "selective", ["core_attn"])
    full = transformer_config(LLAMA, recompute="full")
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == (
        "full", "uniform", 1)


def test_switch_is_a_no_op_without_sequence_parallelism(megatron_runtime):
    model = build_policy(LLAMA)
    before = [(name, m.sequence_parallel) for name, m in model.named_modules()
              if isinstance(getattr(m, "sequence_parallel", None), bool)]
    with sequence_parallel_off(model):
        assert model.config.sequence_parallel is False
    assert before == [(name, m.sequence_parallel) for name, m in model.named_modules()
                      if isinstance(getattr(m, "sequence_parallel", None), bool)]
    assert sequence_multiple(model) == 1


def test_cpu_layer_stays_on_in_a_backward_started_inside_a_backward(megatron_runtime):
    """megatron's recompute calls torch.autograd.backward inside its own backward; the backward
    functions it reaches (sequence-parallel gathers) allocate on "the CUDA device". torch runs a
    mode's handler with the mode popped, so the CPU layer starts such a backward itself."""
    from remax_megatron.runtime import cpu_compat

    if not cpu_compat.is_installed():
        pytest.skip("the CPU layer is only installed without CUDA")

    class OnCudaDevice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            out = torch.empty(grad.shape, device=torch.cuda.current_device())
            return out.copy_(grad) * 2

    class Recomputed(torch.autograd.Function):  # megatron's CheckpointFunction in small
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            with torch.no_grad():
                return OnCudaDevice.apply(x) * 3

        @staticmethod
        def backward(ctx, grad):
            x = ctx.saved_tensors[0].detach().requires_grad_()
            with torch.enable_grad():
                out = OnCudaDevice.apply(x) * 3
            torch.autograd.backward(out, grad)
            return x.grad

    x = torch.ones(3, requires_grad=True)
    Recomputed.apply(x).sum().backward()
    assert x.grad.tolist() == [6.0] * 3
    x.grad = None
    torch.autograd.backward([Recomputed.apply(x).sum()], [torch.tensor(2.0)], inputs=[x])
    assert x.grad.tolist() == [12.0] * 3


# --- recompute on one process --------------------------------------------------------------------
def _one_step(config: ModelConfig, recompute: str) -> dict:
    from remax_megatron.models.sharding import load_full_state_dict, seeded_full_weights
    from remax_megatron.ops.logprobs import vocab_parallel_log_probs
    from remax_megatron.training.engine import (
        OptimizerSettings, build_optimizer, update, wrap_ddp,
    )

    model = build_policy(config, perform_initialization=False, recompute=recompute)
    load_full_state_dict(model, seeded_full_weights(model, 11))
    calls = {"layer": 0, "core_attention": 0}
    for layer in model.decoder.layers:
        layer.register_forward_hook(lambda *a: calls.__setitem__("layer", calls["layer"] + 1))
        layer.self_attention.core_attention.register_forward_hook(
            lambda *a: calls.__setitem__("core_attention", calls["core_attention"] + 1))
    ddp = wrap_ddp(model)
    optimizer = build_optimizer(ddp, OptimizerSettings(lr=1e-3, weight_decay=0.0, clip_grad=0.5))
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, config.vocab_size, (4, 11), generator=g)
    weight = torch.randn(4, 10, generator=g)
    batches = [{"input_ids": ids[s:s + 2], "position_ids": torch.arange(11).expand(2, 11),
                "weight": weight[s:s + 2]} for s in (0, 2)]
    losses = []

    def loss_fn(output, batch):
        lp = vocab_parallel_log_probs(output[:, :-1], batch["input_ids"][:, 1:],
                                      config.vocab_size)
        loss = -(lp * batch["weight"]).sum()
        losses.append(loss.detach())
        return loss, torch.tensor(lp.numel(), dtype=torch.int), {}

    applied, grad_norm = update(ddp, optimizer, batches, loss_fn, 11, 2)
    assert applied
    return {"loss": torch.stack(losses), "grad_norm": grad_norm, "calls": calls,
            "grads": {n: p.main_grad.clone() for n, p in model.named_parameters()},
            "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}


@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_recompute_gives_identical_gradients_and_update(config, megatron_runtime):
    runs = {mode: _one_step(config, mode) for mode in RECOMPUTE}
    none = runs["none"]
    micro_batches, layers = 2, config.num_layers
    assert none["calls"] == {"layer": micro_batches * layers,
                             "core_attention": micro_batches * layers}
    # selective: core attention again in the backward; full: whole layers again
    assert runs["selective"]["calls"] == {"layer": micro_batches * layers,
                                          "core_attention": 2 * micro_batches * layers}
    assert runs["full"]["calls"] == {"layer": 2 * micro_batches * layers,
                                     "core_attention": 2 * micro_batches * layers}
    for mode in ("selective", "full"):
        run = runs[mode]
        assert torch.equal(run["loss"], none["loss"]), mode
        assert run["grad_norm"] == none["grad_norm"], mode
        for key in ("grads", "weights"):
            for name, value in none[key].items():
                assert torch.equal(run[key][name], value), (mode, key, name)
    assert any(v.abs().max() > 0 for v in none["grads"].values())


# --- sequence parallelism (and recompute) across ranks ------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "reference.pt"
    run_python([WORKER, "--reference", str(path)])
    return path


TOL = {"loss": 1e-5, "grad_norm": 1e-5, "grads": 2e-5, "weights": 1e-5, "applied": 0.0,
       "tokens": 0.0, "restored": 0.0}
LAYOUTS = {
    "tp2": (2, ["--tp", "2"], ("no_sp", "sp", "sp_selective", "sp_full")),
    "tp2_pp2": (4, ["--tp", "2", "--pp", "2"], ("no_sp", "sp")),
}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sequence_parallel_matches_single_rank(layout, reference, tmp_path):
    nproc, flags, settings = LAYOUTS[layout]
    run_torchrun(nproc, [WORKER, "--check", str(reference), "--report", str(tmp_path / "r.json"),
                         *flags, "--settings", ",".join(settings)])
    report = read_json(tmp_path / "r.json")
    for case in ("llama_gqa", "gpt2_tied"):
        for setting in settings:
            tag = f"{case}/{setting}"
            bad = {k: report[f"{tag}/{k}"] for k, tol in TOL.items()
                   if not report[f"{tag}/{k}"] <= tol}
            assert not bad, f"{layout} {tag} differs from the single-rank reference: {bad}"
            sp = setting != "no_sp"
            # under sequence parallelism a norm sees 1/tp of the sequence, and megatron's
            # linears are switched back on after the rollout
            assert report[f"{tag}/norm_rows"] == ([5] if sp else [10]), tag
            assert (report[f"{tag}/sp_modules"] > 0) == sp, tag
            if sp:
                assert report[f"{tag}/off_inside"] == 0.0, tag


# --- the trainer ---------------------------------------------------------------------------------
# with a KL penalty: the frozen reference (built without either feature) scores the same
# micro-batches
SMALL = ["train.steps=3", "train.global_batch_size=8", "train.micro_batch_size=4",
         "rollout.max_new_tokens=8", "train.lr=1e-2", "policy.model.tie_word_embeddings=true",
         "algorithm.kl_coef=0.05", "parallel.tp=2", "log.tensorboard=false", "log.plot=false"]


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tp2") / "run"
    run_torchrun(2, ["-m", "remax_megatron", "train", "--output-dir", str(run), *SMALL])
    return run_metrics(run)


@pytest.mark.distributed
@pytest.mark.parametrize("extra", [["parallel.sequence_parallel=true"], ["train.recompute=full"]],
                         ids=["sequence_parallel", "recompute_full"])
def test_training_run_matches_the_run_without_it(extra, tp2_run, tmp_path):
    run = tmp_path / "run"
    run_torchrun(2, ["-m", "remax_megatron", "train", "--output-dir", str(run), *SMALL, *extra])
    rows = run_metrics(run)
    same_run(tp2_run, rows, tol=1e-5)
    for row in rows:
        # the KV-cached rollout (sequence parallelism switched off) and the training forward
        # (on) agree on every sampled token
        assert row["logprob_mismatch"] < 1e-4


# --- virtual pipeline stages ----------------------------------------------------------------------
# 4 layers at pp2: two chunks of one layer per stage; tied embeddings (the first and the last
# chunk share the word embeddings across the ranks) and a KL penalty (the frozen reference is
# chunked as well)
PP2 = ["train.steps=3", "rollout.max_new_tokens=8", "train.lr=1e-2",
       "policy.model.tie_word_embeddings=true", "policy.model.num_layers=4",
       "algorithm.kl_coef=0.05", "parallel.pp=2", "checkpoint.save_every=2",
       "log.tensorboard=false", "log.plot=false"]
VPP_CASES = {
    # 8 responses in 4 micro-batches: two groups of pp
    "remax_4_micro_batches": ["train.global_batch_size=8", "train.micro_batch_size=2"],
    # 3 prompts x 2 samples in 3 micro-batches: one group of 3 (pp does not divide it)
    "rloo_3_micro_batches": ["algorithm.name=rloo", "rollout.n_samples=2",
                             "train.global_batch_size=3", "train.micro_batch_size=2"],
    # PPO: the critic (from the policy's weights) chunked as the policy, saved and resumed too
    "ppo_critic": ["algorithm.name=ppo", "train.global_batch_size=8", "train.micro_batch_size=2",
                   "critic.load=policy"],
}


def _final_weights(run) -> dict:
    model, _ = load_model(run / "checkpoints" / "step_000003")
    return {name: param.detach().clone() for name, param in model.named_parameters()}


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(VPP_CASES))
def test_virtual_pipeline_run_matches_the_pp2_run(case, tmp_path, megatron_runtime):
    args = [*PP2, *VPP_CASES[case]]
    reference = tmp_path / "pp2"
    run_torchrun(2, ["-m", "remax_megatron", "train", "--output-dir", str(reference), *args])
    full, resumed = full_and_resumed_runs([*args, "parallel.virtual_pp=2"], tmp_path, nproc=2,
                                          resume_args=("parallel.virtual_pp=1",))
    want, rows = run_metrics(reference), run_metrics(full)
    assert "virtual_pp: 2" in (full / "config.yaml").read_text()
    assert "virtual_pp: 1" in (resumed / "config.yaml").read_text()  # resumed without chunks
    same_run(want, rows, tol=1e-5)
    same_run(rows, run_metrics(resumed), tol=1e-5)
    for row in rows:
        assert row["logprob_mismatch"] < 1e-4  # the chunked rollout and training forward agree
        assert row["grad_norm"] > 0
        if "critic/grad_norm" in row:
            assert row["critic/grad_norm"] > 0
    assert any(row["kl"] > 0 for row in rows)
    # the same weights under the same global names, loaded here at tp1 pp1
    weights, chunked = _final_weights(reference), _final_weights(full)
    assert weights.keys() == chunked.keys()
    for name, value in weights.items():
        assert torch.allclose(chunked[name], value, atol=1e-5, rtol=0), name


@pytest.mark.distributed
def test_interleaved_schedule_gradients_with_large_activations():
    """tools/bench_virtual_pp.py at GPT-2 width: activations of 2 x 64 x 768 fp32 (384 KiB, past
    the size where freed memory goes back to the system) sent between the stages with megatron's
    overlapped sends give the 1F1B schedule's gradients to the bit (on gloo a sent activation must
    not be freed before the send has read it)."""
    proc = run_torchrun(2, ["tools/bench_virtual_pp.py", "--layers", "4", "--seq", "64",
                            "--chunks", "2", "--repeats", "1"])
    line = next(l for l in proc.stdout.splitlines() if "gradients vs the baseline" in l)
    diff = float(line.split("max |diff| ")[1].split()[0])
    assert diff == 0.0, line
    assert "2 chunks per stage" in proc.stdout
