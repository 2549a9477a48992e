#!/usr/bin/env bash
# GPT-2 124M ReMax on one node: convert the HF SFT policy and reward model, then train.
# Usage: bash examples/gpt2_124m/run.sh /path/to/gpt2-sft /path/to/gpt2-reward-model [GPUS]
set -euo pipefail
SFT=${1:?HF GPT2LMHeadModel directory}
RM=${2:?HF GPT2ForSequenceClassification directory (num_labels 1)}
GPUS=${3:-8}
remax-megatron convert hf-to-mcore --hf "$SFT" --out ckpt/gpt2-sft
remax-megatron convert hf-to-mcore --hf "$RM" --out ckpt/gpt2-rm --model-type reward
torchrun --nproc-per-node "$GPUS" -m remax_megatron train --config examples/gpt2_124m/config.yaml
# back to transformers when done:
remax-megatron convert mcore-to-hf --load runs/gpt2-124m-remax/checkpoints/$(cat runs/gpt2-124m-remax/checkpoints/latest) --out runs/gpt2-124m-remax/hf
