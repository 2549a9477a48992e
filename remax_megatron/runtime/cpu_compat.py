"""Let unmodified megatron-core run on CPU (gloo) when no GPU is present.

megatron-core assumes CUDA in places where it needs no GPU at all: it allocates with
``device=torch.cuda.current_device()`` or ``device="cuda"``, calls ``torch.cuda.synchronize()``,
creates CUDA streams and events, checks ``param.type() == 'torch.cuda.FloatTensor'`` and keeps its
RNG tracker in the CUDA generator. This module removes those assumptions without editing megatron:

* a ``TorchFunctionMode`` rewrites every CUDA device argument to CPU, makes ``Tensor.cuda()`` a
  no-op and reports ``torch.cuda.*Tensor`` type names for CPU tensors;
* the handful of ``torch.cuda`` functions megatron calls get CPU equivalents (the "CUDA" RNG is
  the CPU generator, streams and events do nothing, synchronize returns at once);
* megatron's private RNG helpers read and write the CPU generator;
* a backward started with ``torch.autograd.backward`` / ``Tensor.backward`` (megatron's activation
  recompute starts one inside its own backward) keeps the mode on in its backward functions.

``install()`` is a strict no-op when CUDA is available, and idempotent.

Two start-up costs that buy nothing on the CPU go too (each paid by every process of a run, and
by every launch of the test suite): megatron's import-time ``torch.compile`` of fused kernels
that no model of ours calls (``import_megatron``), and the ``spawn``ed interpreter megatron's
checkpoint writer starts for its results queue (a forked one serves as well).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_lock = threading.Lock()
_installed = False
_mode: "_CudaToCpuMode | None" = None

_CPU = torch.device("cpu")
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.int8: "torch.cuda.CharTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is how torch.cuda.current_device() names a GPU.
    return isinstance(device, int) and not isinstance(device, bool)


def _to_cpu_device(device):
    return _CPU if _is_cuda_device(device) else device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement requests to CPU; every other call passes through untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.autograd.backward or func is torch.Tensor.backward:
            return _backward_under(self, func, args, kwargs)
        if func is torch.Tensor.type:
            return _tensor_type(*args, **kwargs)
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        if func is torch.distributed.all_to_all_single:
            args, kwargs = _split_sizes_as_lists(args, kwargs)
        if func is torch.distributed.all_gather and _uneven(args[0]):
            return _uneven_all_gather(func, *args, **kwargs)
        if func is torch.distributed.reduce_scatter and _uneven(args[1]):
            return _uneven_reduce_scatter(*args, **kwargs)
        return func(*args, **kwargs)


# megatron's MoE dispatcher at tp > 1 gathers / reduce-scatters the tokens each tensor-parallel
# rank received, a different number per rank; gloo needs equal sizes: these pad / all-reduce.
def _uneven(tensors) -> bool:
    return isinstance(tensors, (list, tuple)) and len({t.shape for t in tensors}) > 1


def _uneven_all_gather(all_gather, outputs, tensor, group=None, async_op=False):
    rows = max(t.size(0) for t in outputs)
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))
    padded[:tensor.size(0)] = tensor
    buffers = [tensor.new_empty((rows, *tensor.shape[1:])) for _ in outputs]
    all_gather(buffers, padded, group=group)
    for out, buf in zip(outputs, buffers):
        out.copy_(buf[:out.size(0)])


def _uneven_reduce_scatter(output, inputs, op=None, group=None, async_op=False):
    import torch.distributed as dist

    whole = torch.cat(inputs)
    dist.all_reduce(whole, op=op or dist.ReduceOp.SUM, group=group)
    start = sum(t.size(0) for t in inputs[:dist.get_rank(group)])
    output.copy_(whole[start:start + output.size(0)])


def _split_sizes_as_lists(args, kwargs):
    """megatron's MoE all-to-all gives its split sizes as what its device-to-host copy made of
    them: numpy arrays from CUDA tensors, but the tensors themselves when they are already on
    the CPU (it copies only ``is_cuda`` tensors); torch's binding takes lists of ints."""
    args = list(args)
    for index, name in ((2, "output_split_sizes"), (3, "input_split_sizes")):
        if name in kwargs and torch.is_tensor(kwargs[name]):
            kwargs[name] = kwargs[name].tolist()
        elif len(args) > index and torch.is_tensor(args[index]):
            args[index] = args[index].tolist()
    return tuple(args), kwargs


def _backward_under(mode, func, args, kwargs):
    """``torch.autograd.backward`` / ``Tensor.backward`` with the mode on during the backward.

    torch runs a mode's handler with the mode popped, and the autograd engine runs every backward
    function under the mode stack it was started with: a backward started through the handler
    would run megatron's backward functions without the mode. The main backward (megatron's
    schedules call the engine directly) keeps it, but megatron's activation recompute calls
    ``torch.autograd.backward`` inside its own backward, and under sequence parallelism the
    recomputed layers' backward gathers into ``device=torch.cuda.current_device()`` buffers.
    So the engine is started here, with the mode pushed back, as torch.autograd.backward does."""
    import inspect

    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward
    from torch.overrides import is_tensor_like

    bound = inspect.signature(func).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if func is torch.Tensor.backward:
        tensors, grad_tensors = (a["self"],), a["gradient"]
    else:
        tensors, grad_tensors = a["tensors"], a["grad_tensors"]
        if grad_tensors is None:
            grad_tensors = a.get("grad_variables")
        tensors = (tensors,) if is_tensor_like(tensors) else tuple(tensors)
    inputs = a["inputs"]
    inputs = () if inputs is None else (inputs,) if is_tensor_like(inputs) else inputs
    if not isinstance(inputs, (tuple, list)) or (a["inputs"] is not None and not inputs) or not all(
            is_tensor_like(t) for t in (*tensors, *inputs)):
        return func(*args, **kwargs)  # gradient edges, inputs by name, errors: torch's own way
    inputs = tuple(inputs)
    create_graph = bool(a["create_graph"])
    retain_graph = create_graph if a["retain_graph"] is None else a["retain_graph"]
    with mode:
        grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(grad_tensors, len(tensors)),
                            is_grads_batched=False)
        _engine_run_backward(tensors, grads, retain_graph, create_graph, inputs,
                             allow_unreachable=True, accumulate_grad=True)


def _tensor_type(tensor, dtype=None, non_blocking=False, **kwargs):
    # megatron asserts 'torch.cuda.FloatTensor' etc.; report the CUDA name for a CPU tensor.
    if dtype is None:
        if tensor.device.type == "cpu" and tensor.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[tensor.dtype]
        return torch.Tensor.type(tensor)
    if isinstance(dtype, str):
        dtype = dtype.replace("torch.cuda.", "torch.")
    elif isinstance(dtype, type) and "cuda" in dtype.__module__:
        dtype = f"torch.{dtype.__name__}"
    return torch.Tensor.type(tensor, dtype, non_blocking, **kwargs)


class _CpuEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end_event):
        return 0.0


class _CpuStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _CpuEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _NullContext:
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_DEFAULT_STREAM = _CpuStream()


def _manual_seed(seed) -> None:
    # torch.manual_seed would call torch.cuda.manual_seed_all again: seed the generator directly.
    torch.default_generator.manual_seed(int(seed))


def _torch_cuda_replacements() -> dict:
    return {
        "current_device": lambda: 0,
        "device_count": lambda: 0,
        "set_device": lambda device: None,
        "synchronize": lambda device=None: None,
        "empty_cache": lambda: None,
        "Stream": _CpuStream,
        "Event": _CpuEvent,
        "stream": _NullContext,
        "current_stream": lambda device=None: _DEFAULT_STREAM,
        "default_stream": lambda device=None: _DEFAULT_STREAM,
        "set_stream": lambda stream: None,
        "get_rng_state": lambda device="cuda": torch.get_rng_state(),
        "set_rng_state": lambda new_state, device="cuda": torch.set_rng_state(new_state),
        "manual_seed": _manual_seed,
        "manual_seed_all": _manual_seed,
    }


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = (
        lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    )
    mcore_random._set_cuda_rng_state = (
        lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    )


def _patch_nvtx() -> None:
    # megatron brackets regions with nvtx ranges; without CUDA they must do nothing.
    nvtx = torch.cuda.nvtx
    nvtx.range_push = lambda msg: 0
    nvtx.range_pop = lambda: 0
    nvtx.mark = lambda msg: None
    nvtx.range = _NullContext


def _plain(model=None, **options):
    """torch.compile's two call forms, returning the function uncompiled."""
    return model if model is not None else (lambda function: function)


def import_megatron() -> None:
    """Import megatron-core; without CUDA, without compiling its fused kernels.

    megatron wraps a few fused element-wise kernels in ``torch.compile`` when it is imported
    (its ``jit_fuser``), which loads torch's compiler stack: ~2 s of every process's start on a
    2-core CPU. Every model remax_megatron builds turns those fusions off (models/builder.py:
    ``*_fusion=False``), so on the CPU they are imported as the plain functions they wrap. A
    no-op with CUDA, or when megatron is already imported.
    """
    if "megatron.core" in sys.modules or torch.cuda.is_available():
        return
    compile_ = torch.compile
    torch.compile = _plain
    try:
        import megatron.core  # noqa: F401
    finally:
        torch.compile = compile_


def _patch_checkpoint_results_queue() -> None:
    """megatron's checkpoint writer collects its results through a queue served by a
    ``spawn``ed Manager: a fresh interpreter that re-imports the entry script (~3 s and ~0.3 GB
    at the first save). A forked Manager serves the same queue at once (the writers themselves
    are forked too)."""
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def results_queue():
        if filesystem_async._results_queue is None:
            manager = multiprocessing.get_context("fork").Manager()
            filesystem_async._results_queue = manager.Queue()
        return filesystem_async._results_queue

    filesystem_async._get_write_results_queue = results_queue


def install(force: bool = False) -> bool:
    """Install the CPU layer once. Returns True when it is active after the call.

    A strict no-op when CUDA is available (unless ``force``, used only by this module's tests).
    """
    global _installed, _mode
    if torch.cuda.is_available() and not force:
        return False
    with _lock:
        if _installed:
            _ensure_mode_on_this_thread()
            return True
        for name, replacement in _torch_cuda_replacements().items():
            setattr(torch.cuda, name, replacement)
        _patch_nvtx()
        import_megatron()
        _patch_megatron_rng()
        _patch_checkpoint_results_queue()
        _mode = _CudaToCpuMode()
        _installed = True
        _ensure_mode_on_this_thread()
        log.info(
            "CUDA is not available: megatron-core runs on CPU through remax_megatron's "
            "compatibility layer (CUDA device requests go to CPU, CUDA streams/events are no-ops)."
        )
        return True


def _ensure_mode_on_this_thread() -> None:
    # Torch function modes live on a per-thread stack; keep ours at the bottom of this thread's.
    from torch.overrides import _get_current_function_mode_stack

    if _mode is not None and _mode not in _get_current_function_mode_stack():
        _mode.__enter__()
        if threading.current_thread() is not threading.main_thread():
            _thread_exit.sentinel = _EmptyStackOnThreadExit()


class _EmptyStackOnThreadExit:
    """Empties the exiting thread's torch-function mode stack while its Python state is cleared
    (thread-local objects are released on the exiting thread, before join() returns). Left to
    torch's C++ thread-local destructor, the mode would be released after the thread's Python
    state is gone, racing the interpreter's shutdown: "terminate called without an active
    exception" at exit, now and then."""

    def __del__(self):
        try:
            while torch._C._len_torch_function_stack():
                torch._C._pop_torch_function_stack()
        except Exception:  # interpreter shutting down: nothing left to protect
            pass


_thread_exit = threading.local()


def is_installed() -> bool:
    return _installed


@contextlib.contextmanager
def suspended():
    """Run the block without the torch-function mode: every torch call of a hot loop (a decode
    step makes thousands) otherwise goes through Python first. Only for code that never asks for
    a CUDA placement (ours, and megatron's forward once its buffers exist); the torch.cuda
    stand-ins stay. Does nothing when the mode is not the innermost one on this thread."""
    from torch.overrides import _get_current_function_mode_stack, _pop_mode_temporarily

    stack = _get_current_function_mode_stack()
    if _mode is None or not stack or stack[-1] is not _mode:
        yield
        return
    with _pop_mode_temporarily():
        yield


@contextlib.contextmanager
def active():
    """The mode back on inside a ``suspended`` block, around a megatron call that asks for CUDA."""
    from torch.overrides import _get_current_function_mode_stack

    if _mode is None or _mode in _get_current_function_mode_stack():
        yield
        return
    with _mode:
        yield
