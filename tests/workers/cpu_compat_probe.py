"""Probe the CPU compatibility layer in a fresh process; prints one JSON object of observations.

  python cpu_compat_probe.py            # CPU machine: the layer installs
  python cpu_compat_probe.py --pretend-cuda   # torch reports CUDA: the layer must do nothing
"""

import json
import logging
import sys
import threading

import torch


def main() -> None:
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("remax_megatron").addHandler(Keep())
    logging.getLogger("remax_megatron").setLevel(logging.INFO)
    from torch.overrides import _get_current_function_mode_stack

    from remax_megatron.runtime import cpu_compat

    out = {}
    if "--pretend-cuda" in sys.argv:
        original = torch.cuda.current_device
        torch.cuda.is_available = lambda: True
        out["installed"] = cpu_compat.install()
        out["current_device_untouched"] = torch.cuda.current_device is original
        out["mode_stack"] = len(_get_current_function_mode_stack())
        print(json.dumps(out))
        return

    out["installed"] = cpu_compat.install()
    out["installed_again"] = cpu_compat.install()
    out["log_lines"] = sum("compatibility layer" in r for r in records)
    out["zeros_cuda"] = str(torch.zeros(2, device="cuda").device)
    out["empty_current_device"] = str(torch.empty(3, device=torch.cuda.current_device()).device)
    t = torch.ones(2)
    out["cuda_is_noop"] = t.cuda() is t
    out["to_cuda"] = str(t.to("cuda").device)
    out["to_device_cuda"] = str(t.to(torch.device("cuda", 0)).device)
    out["type_fp32"] = t.type()
    out["type_bf16"] = t.bfloat16().type()
    out["type_convert"] = t.type("torch.cuda.HalfTensor").dtype == torch.float16
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        pass
    event = torch.cuda.Event()
    event.record()
    out["streams_events"] = True

    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0,
                                                    force_reset_rng=True)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(1)
    plain = torch.rand(3)
    torch.manual_seed(1)
    with tracker.fork():
        inside_a = torch.rand(2)
    after_fork = torch.rand(3)
    out["fork_restores_default_stream"] = torch.equal(plain, after_fork)
    tensor_parallel.model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0,
                                                    force_reset_rng=True)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    with tracker.fork():
        inside_b = torch.rand(2)
    out["fork_stream_is_seeded"] = torch.equal(inside_a, inside_b)
    out["fork_stream_differs_from_default"] = not torch.equal(inside_a, plain[:2])

    seen = {}

    def in_thread():
        cpu_compat.install()
        seen["device"] = str(torch.zeros(1, device="cuda").device)

    worker = threading.Thread(target=in_thread)
    worker.start()
    worker.join()
    out["thread_zeros_cuda"] = seen.get("device")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
