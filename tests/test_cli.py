"""`remax-megatron info` as a console script, as `python -m`, and under torchrun."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_python, run_torchrun, worker_env


def test_console_script_info():
    script = Path(sys.executable).parent / "remax-megatron"
    if not script.exists():
        pytest.skip("console script not installed (pip install -e . installs it)")
    proc = subprocess.run([str(script), "info"], capture_output=True, text=True, env=worker_env(),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "megatron-core" in out and "0.16" in out
    assert "backend: gloo (auto)" in out
    assert "launch: single process" in out


def test_module_info_matches_script_verbs():
    out = run_python(["-m", "remax_megatron", "info"]).stdout
    assert "torch" in out and "transformer-engine" in out and "apex" in out


@pytest.mark.distributed
def test_info_under_torchrun_shows_layout():
    out = run_torchrun(2, ["-m", "remax_megatron", "info", "--tp", "2"]).stdout
    assert "layout tp=2 pp=1 dp=1 (world size 2)" in out
    assert "rank 0" in out and "rank 1" in out and "tp 1  pp 0  dp 0" in out
    assert "cpu compatibility layer: on" in out


@pytest.mark.distributed
def test_impossible_layout_is_one_line_error():
    proc = run_torchrun(2, ["-m", "remax_megatron", "info", "--tp", "3"], check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "info: error:" in line]
    assert len(errors) == 1, "rank 0 alone reports the error, once"
    assert "world size 2 is not divisible by tp*pp=3*1=3" in errors[0]
    assert "LayoutError" not in proc.stderr  # no traceback of ours
