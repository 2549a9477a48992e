"""What every multi-rank worker shares: its command line and writing its report on rank 0."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch.distributed as dist


def layout_parser() -> argparse.ArgumentParser:
    """--ref (the reference file), --report (JSON written by rank 0), --tp, --pp, --ep."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--ref", required=True)
    parser.add_argument("--report", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    return parser


def reference_parser() -> argparse.ArgumentParser:
    """For workers with two modes: --reference PATH (one process writes the plain-torch
    reference) or --check PATH --report OUT (every rank runs the layout: --tp, --pp)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference")
    parser.add_argument("--check")
    parser.add_argument("--report")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    return parser


def write_report(path: str, report: dict) -> None:
    if dist.get_rank() == 0:
        Path(path).write_text(json.dumps(report, indent=1))


def gather_full_grads(ddp, exchange: Path, vocab_size: int, ep: int = 1) -> dict | None:
    """Every rank's main gradients, assembled into full tensors under their checkpoint names on
    rank 0 (None elsewhere). Through files: a 135M model's pickled through all_gather_object
    take tens of seconds."""
    import torch
    from megatron.core import parallel_state as ps

    from remax_megatron.models.builder import unwrap
    from remax_megatron.models.sharding import assemble_full, local_shards

    grads = {name: p.main_grad.clone() for name, p in unwrap(ddp).named_parameters()}
    torch.save({"tp": ps.get_tensor_model_parallel_rank(),
                "pp": ps.get_pipeline_model_parallel_rank(), "dp": ps.get_data_parallel_rank(),
                "grads": local_shards(ddp, grads)}, exchange / f"grads_{dist.get_rank()}.pt")
    dist.barrier()
    if dist.get_rank() != 0:
        return None
    per_rank = [torch.load(exchange / f"grads_{r}.pt", weights_only=False)
                for r in range(dist.get_world_size())]
    # the first ep dp ranks hold every expert between them (and the same dense gradients)
    stages: dict = {}
    for r in sorted((r for r in per_rank if r["dp"] < ep),
                    key=lambda r: (r["dp"], r["pp"], r["tp"])):
        stages.setdefault((r["dp"], r["pp"]), []).append(r["grads"])
    full = {}
    for shards in stages.values():
        full.update(assemble_full(shards, vocab_size))
    return full


def grad_report(full: dict, expected: dict) -> dict:
    """Each gradient's largest difference relative to the largest expected entry, the norm's
    relative difference, and names_match (0: the same names)."""
    scale = max(t.abs().max().item() for t in expected.values())
    report = {}
    for name, want in expected.items():
        got = full[name]
        if got.shape != want.shape:
            print("SHAPE", name, tuple(got.shape), tuple(want.shape), flush=True)
        report[f"grad/{name}"] = (got - want).abs().max().item() / scale

    def norm(grads):
        return sum(g.double().pow(2).sum() for g in grads).sqrt().item()

    want_norm = norm(expected.values())
    report["grad_norm"] = abs(norm(full.values()) - want_norm) / want_norm
    report["names_match"] = 0.0 if not set(expected) ^ set(full) else float("inf")
    return report
