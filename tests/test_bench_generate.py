"""tools/bench_generate.py runs end to end (--quick: a tiny GPT-2, a few tokens) and prints, per
batch, our decode step against transformers' (in a process of its own that never imports
remax_megatron) and against the bare weight GEMMs. Timings are not checked, only that every
ratio line is there."""

import re

from conftest import run_python


def test_quick_bench_prints_every_ratio_line():
    proc = run_python(["tools/bench_generate.py", "--quick", "--threads", "1"], timeout=180)
    out = proc.stdout
    for batch in (1, 2):
        assert re.search(rf"fp32 batch +{batch}: ours +[\d.]+ ms/step .* transformers +[\d.]+ "
                         rf"ms/step .* bare GEMMs +[\d.]+ ms", out), out
        assert re.search(rf"fp32 batch +{batch} ours/bare-GEMM ratio [\d.]+ ", out), out
        assert re.search(rf"fp32 batch +{batch} HF/ours speedup [\d.]+ \(target >= 0.95\): "
                         r"(PASS|MISS)", out), out
    assert "imported remax_megatron: no, torch-function modes active: none" in out, out
