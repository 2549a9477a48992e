#!/usr/bin/env bash
# The GPU checks in one command, for a CUDA machine without network access whose python3 already
# has torch with CUDA (and transformers etc.) but not megatron-core. From the repository root:
#
#   bash tools/gpu_check.sh [--log FILE] [--venv DIR] [--wheels DIR] [--python PYTHON]
#
# 1. checks that a CUDA GPU is visible to torch, and that megatron-core is either importable
#    already or carried as a wheel in --wheels (default .whl/, which
#    ../shared/tools/device-wheels.sh fills on a machine with network access: megatron-core for
#    cp312, plus any package named on its command line, e.g. transformer-engine wheels);
# 2. makes a virtual environment that reuses python3's torch (--system-site-packages, plus a .pth
#    file when python3 is itself a virtual environment; default /tmp/remax-gpu-venv) and
#    installs the carried wheels and this package into it, offline (pip --no-index
#    --find-links WHEELS);
# 3. prints the versions (python, torch, CUDA, GPU, megatron-core, transformers, TE);
# 4. runs `pytest -m gpu` (tests/test_gpu.py: bf16 greedy generation vs transformers, the TE spec
#    vs the local spec, bf16 demo steps on NCCL and a bit-exact resume);
# 5. runs the decode benchmark: tools/bench_generate.py --device cuda --dtype bf16 --batches 1,16,64,
#    for the GPT-2-124M shape and a Llama-1B shape (--model llama-1b), our decode step replayed as
#    one CUDA graph; then GPT-2 at batch 1 and 16 with eager steps (--cuda-graph off).
#
# Everything it prints also goes to the log file (default gpu-check.log). It stops at the first
# problem with setup (no GPU, no wheel, a failed install) with a line saying what to do; a failed
# test or benchmark does not stop the rest, but the script then exits 1.
set -uo pipefail

log=gpu-check.log
py=python3
venv=/tmp/remax-gpu-venv
wheels=.whl
while [ $# -gt 0 ]; do
  case "$1" in
    --log) log=$2; shift 2 ;;
    --venv) venv=$2; shift 2 ;;
    --wheels) wheels=$2; shift 2 ;;
    --python) py=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 2
mkdir -p "$(dirname "$log")"
: > "$log" || { echo "gpu_check.sh: cannot write the log file $log" >&2; exit 2; }
exec > >(tee -a "$log") 2>&1

die() {
  echo
  echo "gpu_check.sh: FAILED: $*"
  echo "(log: $log)"
  exit 1
}
section() { echo; echo "=== $* ($(date '+%H:%M:%S'))"; }

section "GPU"
command -v "$py" >/dev/null || die "no python3 on PATH"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi -L || die "nvidia-smi sees no GPU"
else
  echo "(no nvidia-smi on PATH: asking torch)"
fi
"$py" - <<'EOF' || die "torch cannot use a CUDA GPU here (torch missing, a CPU-only build, or no device visible: check CUDA_VISIBLE_DEVICES); these checks need one"
import sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print(f"{torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}")
EOF

section "wheels"
tag=$("$py" -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')
if "$py" -c "import megatron.core" 2>/dev/null; then
  echo "megatron-core is importable already"
else
  ls "$wheels"/megatron_core-*-"$tag"-*.whl >/dev/null 2>&1 || die "megatron-core is not installed and no megatron_core-*-$tag-*.whl is in $wheels/: on a machine with network access run ../shared/tools/device-wheels.sh from the repository root (it fills .whl/ for Python 3.12), and carry .whl to this one (or pass --wheels DIR)"
fi
[ -d "$wheels" ] && ls -1 "$wheels"

section "install (offline) into $venv"
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv --system-site-packages "$venv" || die "cannot create the virtual environment $venv"
fi
vpy="$venv/bin/python"
# --system-site-packages reaches the BASE interpreter's packages; when python3 is itself a
# virtual environment (torch lives in ITS site-packages), a .pth file adds those after ours
parent=$("$py" -c 'import site, sys; print("\n".join(site.getsitepackages()) if sys.prefix != sys.base_prefix else "")')
if [ -n "$parent" ]; then
  purelib=$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$parent" > "$purelib/_remax_gpu_check_z_parent.pth"
  echo "python3 is a virtual environment: its packages are visible through $purelib/_remax_gpu_check_z_parent.pth"
fi
"$vpy" -c "import torch; assert torch.cuda.is_available()" || die "torch with CUDA is not visible inside $venv"
pipi=("$vpy" -m pip install -q --no-index --no-cache-dir --disable-pip-version-check)
[ -d "$wheels" ] && pipi+=(--find-links "$wheels")
if compgen -G "$wheels/*.whl" >/dev/null; then
  "${pipi[@]}" "$wheels"/*.whl || die "installing the wheels in $wheels failed (above: a wheel for another Python, or a dependency missing here; carry it with ../shared/tools/device-wheels.sh NAME==VERSION)"
fi
# --no-build-isolation: setuptools comes from the system (nothing can be downloaded here)
if ! "${pipi[@]}" --no-build-isolation -e .; then
  # pip cannot build it with the build tools here (an old setuptools without bdist_wheel, say):
  # the source tree on the path through a .pth file does what an editable install does, once
  # every dependency is checked to be installed
  echo "(pip could not install this package here: using the source tree through a .pth file)"
  purelib=$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$root" > "$purelib/_remax_gpu_check_a_source.pth"
  "$vpy" - <<'EOF' || die "remax-megatron's dependencies are not all here (above): carry the missing ones with ../shared/tools/device-wheels.sh NAME==VERSION"
import importlib.metadata as md
import sys
import tomllib

from packaging.requirements import Requirement

missing = []
for spec in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    req = Requirement(spec)
    try:
        found = md.version(req.name)
    except md.PackageNotFoundError:
        missing.append(f"{spec} (not installed)")
        continue
    if not req.specifier.contains(found, prereleases=True):
        missing.append(f"{spec} (found {found})")
if missing:
    sys.exit("missing: " + "; ".join(missing))
print("every dependency of remax-megatron is installed")
EOF
fi

section "versions"
"$vpy" - <<'EOF' || die "the installed environment does not import"
import importlib.metadata as md
import sys

import torch

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"

print(f"python {sys.version.split()[0]} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
print(f"GPU {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
for name in ("remax-megatron", "megatron-core", "transformers", "tokenizers", "safetensors",
             "transformer-engine", "transformer_engine_torch", "pytest"):
    print(f"{name} {version(name)}")
import megatron.core  # noqa: E402,F401
import remax_megatron  # noqa: E402,F401
EOF
"$vpy" -m remax_megatron info || die "remax-megatron info failed"

status=0
section "pytest -m gpu"
if ! "$vpy" -m pytest -m gpu -rs -v -p no:cacheprovider; then
  echo "pytest -m gpu: FAILED"
  status=1
fi

for model in gpt2 llama-1b; do
  section "decode benchmark (tools/bench_generate.py --model $model --device cuda --dtype bf16 --batches 1,16,64)"
  if ! PYTHONUNBUFFERED=1 "$vpy" tools/bench_generate.py --model "$model" --device cuda --dtype bf16 \
      --batches 1,16,64; then
    echo "bench_generate.py --model $model: FAILED"
    status=1
  fi
done
# what the CUDA graph gains: the same decode steps launched eagerly
section "decode benchmark without the CUDA graph (--model gpt2 --cuda-graph off --batches 1,16)"
if ! PYTHONUNBUFFERED=1 "$vpy" tools/bench_generate.py --model gpt2 --device cuda --dtype bf16 \
    --batches 1,16 --cuda-graph off; then
  echo "bench_generate.py --cuda-graph off: FAILED"
  status=1
fi

section "done"
if [ $status -eq 0 ]; then
  echo "gpu_check.sh: all passed (log: $log)"
else
  echo "gpu_check.sh: FAILED: see above (log: $log)"
fi
exit $status
