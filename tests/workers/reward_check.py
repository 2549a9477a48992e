"""Multi-rank worker: a reward model on its own tp/pp groups (independent of the policy's layout)
scores each policy data-parallel rank's rollouts; rank 0 reports the largest difference from
transformers' scores (stored in the reference file).

  torchrun --nproc-per-node N reward_check.py --ref REF.pt --report OUT.json \
      [--tp T --pp P] [--rm-tp T --rm-pp P]
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from remax_megatron.data.loader import share_of
from remax_megatron.reward import Scored
from remax_megatron.reward.model import RewardModelReward
from remax_megatron.runtime.distributed import init_runtime, shutdown
from worker_io import layout_parser, write_report


def main() -> int:
    parser = layout_parser()
    parser.add_argument("--rm-tp", type=int, default=1)
    parser.add_argument("--rm-pp", type=int, default=1)
    args = parser.parse_args()
    ref = torch.load(args.ref, weights_only=False)
    runtime = init_runtime(tp=args.tp, pp=args.pp, timeout_minutes=5)
    from megatron.core import parallel_state as ps

    policy_tokenizer = AutoTokenizer.from_pretrained(ref["policy_tokenizer"])
    speaker = ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage()
    report = {}
    for name, case in ref["cases"].items():
        reward = RewardModelReward(case["checkpoint"], args.rm_tp, args.rm_pp, 3, policy_tokenizer,
                                   None, speaker, runtime.device)
        items = [Scored(uid=i, prompt_text=p, response_text=r,
                        prompt_ids=policy_tokenizer(p).input_ids,
                        response_ids=policy_tokenizer(r, add_special_tokens=False).input_ids,
                        ended_with_eos=False)
                 for i, (p, r) in enumerate(case["texts"])]
        mine = share_of(items, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        scores = reward.score(mine)
        want = torch.tensor([case["expected"][i.uid] for i in mine])
        err = torch.tensor((scores - want).abs().max().item())
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        report[f"{name}/max_err"] = err.item()
        report[f"{name}/retokenized"] = reward.retokenize
    write_report(args.report, report)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
