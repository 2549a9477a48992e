"""Multi-rank worker: load converted checkpoints at this tp/pp with the one loading function and
compare the Megatron logits (causal LMs) or scores (reward models) on a padded batch with
transformers' outputs, computed beforehand and stored in the reference file.

  torchrun --nproc-per-node N convert_equivalence.py --ref REF.pt --tp T --pp P --report OUT.json
      [--resave DIR]   # also save each loaded model at this layout (a "training" checkpoint)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from remax_megatron.models.checkpoint import WEIGHTS_DIR, load_model, save_weights
from remax_megatron.models.checksums import CHECKSUMS
from remax_megatron.ops import padding
from remax_megatron.runtime.distributed import init_runtime, shutdown
from worker_io import layout_parser, write_report


def _gather_tp(tensor):
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def forward_last_stage(model, ids, mask):
    """Forward through get_forward_backward_func (pipeline aware); output on the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    outputs = []
    pos, attn = padding.position_ids(mask), padding.attention_mask(mask)

    def step(data_iterator, m):
        next(data_iterator)
        out = m(ids, pos, attn)
        return out, lambda o: (o.sum() * 0, {"out": o.detach()})

    model.config.calculate_per_token_loss = False
    result = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([None]), model=[model], num_microbatches=1,
        seq_length=ids.size(1), micro_batch_size=ids.size(0), forward_only=True)
    for r in result:
        outputs.append(r["out"])
    return outputs[0] if outputs else None


def main() -> int:
    parser = layout_parser()
    parser.add_argument("--resave")
    args = parser.parse_args()
    init_runtime(tp=args.tp, pp=args.pp, ep=args.ep, timeout_minutes=5)
    ref = torch.load(args.ref, weights_only=False)
    report = {}
    for name, case in ref["cases"].items():
        model, ckpt = load_model(case["checkpoint"])
        model.eval()
        with torch.no_grad():
            out = forward_last_stage(model, ref["input_ids"], ref["mask"])
        if out is not None and not ckpt.meta.is_reward:
            out = _gather_tp(out)[..., :ckpt.config.vocab_size]
        real = ref["mask"].bool()
        err = None
        if out is not None:
            want = case["expected"]
            err = (out[real] - want[real]).abs().max().item() if out.shape == want.shape else \
                float("inf")
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, err)
        measured = [e for e in errors if e is not None]
        report[name] = max(measured) if measured else float("inf")
        if args.resave:
            target = Path(args.resave) / name
            save_weights(model, target / WEIGHTS_DIR)
            if dist.get_rank() == 0:
                for item in Path(case["checkpoint"]).iterdir():
                    if item.name not in (WEIGHTS_DIR, CHECKSUMS):  # not this save's weights
                        copy = shutil.copytree if item.is_dir() else shutil.copy2
                        copy(item, target / item.name)
            dist.barrier()
    write_report(args.report, report)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
