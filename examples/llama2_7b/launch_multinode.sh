#!/usr/bin/env bash
# Multi-node torchrun launch: run this on every node with the same MASTER_ADDR.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash examples/llama2_7b/launch_multinode.sh [key=value ...]
# (CONFIG=other.yaml to train another config; GPUS_PER_NODE, MASTER_PORT as set, else 8, 29500.)
# A rank that dies restarts the workers (up to MAX_RESTARTS, default 3), which resume from the
# newest complete checkpoint (--resume auto).
# Convert first (once, on a shared filesystem):
#   remax-megatron convert hf-to-mcore --hf /models/llama-2-7b-sft --out ckpt/llama2-7b-sft --dtype bf16
#   remax-megatron convert hf-to-mcore --hf /models/llama-2-7b-rm --out ckpt/llama2-7b-rm --model-type reward --dtype bf16
set -euo pipefail
: "${NNODES:?}" "${NODE_RANK:?}" "${MASTER_ADDR:?}"
torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "${GPUS_PER_NODE:-8}" \
  --max-restarts "${MAX_RESTARTS:-3}" --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}" \
  -m remax_megatron train --config "${CONFIG:-examples/llama2_7b/config.yaml}" --resume auto "$@"
