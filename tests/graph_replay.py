"""CUDA-graph capture and replay emulated on CPU tensors, so that engine/cuda_graphs.py's decoder runs
where there is no GPU (Triton kernels in the interpreter).

A captured graph replays the device work its capture issued, on the same memory and with the same
launch arguments, and none of the Python that issued it; the capture itself runs nothing. The
stand-ins here record each torch op and each Triton launch made while capturing and replay exactly
those; what the capture's ops wrote is put back as it was when the capture ends. So a step that
depends on host state (a Python int baked in at capture, a tensor reallocated after it) replays
wrong here as it would on a GPU, and a host read during capture (`.item()`, `.tolist()`, a
data-dependent shape) fails at once, as it fails a real capture.

    with emulated_cuda_graphs(monkeypatch, allowed_host_reads={"rows"}):
        decoder = GraphDecoder(model, cache, capacity)   # captures through the stand-ins
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose result the host must wait for on a GPU: forbidden while a stream is captured.
_HOST_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.equal.default,
               aten.masked_select.default, aten._unique2.default, aten.unique_consecutive.default,
               aten.repeat_interleave.Tensor, aten.bincount.default}
# Nothing to redo on replay: their memory is whatever it was (as an uninitialised allocation is).
_NO_WORK = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default}


class HostReadDuringCapture(AssertionError):
    pass


class _State:
    steps: list | None = None  # the capture in progress, if any
    undo: list = []  # (tensor, its contents before the capture wrote it), to put back when it ends
    in_launch = 0  # inside an interpreted Triton launch (its own tensor work is the launch's) or the emulation's
    allowed: frozenset = frozenset()


_state = _State()


def _check_host_read(what: str) -> None:
    if _state.steps is None or _state.in_launch:
        return
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name in _state.allowed:
            return
        frame = frame.f_back
    raise HostReadDuringCapture(f"{what} during a CUDA graph capture (the host would wait for the device)")


def _written_arguments(schema, args, kwargs) -> list:
    written = []
    for index, argument in enumerate(schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            value = args[index] if index < len(args) else kwargs.get(argument.name)
            written += [value] if isinstance(value, torch.Tensor) else [v for v in value or () if isinstance(v, torch.Tensor)]
    return written


def _tensors(values) -> list:
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (tuple, list)):
            found += _tensors(value)
    return found


def _is_view(out, args, kwargs) -> bool:
    """Whether every output shares memory with an input (`to`, `contiguous`, `reshape` return their input
    or a view when they can, and a fresh tensor when they cannot)."""
    inputs = {t.untyped_storage().data_ptr() for t in _tensors([*args, *kwargs.values()])}
    outputs = _tensors([out])
    return bool(outputs) and all(t.untyped_storage().data_ptr() in inputs for t in outputs)


def _save_for_undo(tensors) -> None:
    _state.in_launch += 1  # the copies are the emulation's, not the step's: not recorded
    try:
        with torch.inference_mode():
            _state.undo += [(tensor, tensor.clone()) for tensor in tensors]
    finally:
        _state.in_launch -= 1


class _Recorder(TorchDispatchMode):
    """Runs each op and records how to redo its device work: in-place ops again on the same tensors,
    ops with fresh outputs again with the result copied into the outputs the capture handed out."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _state.in_launch:
            return func(*args, **kwargs)
        if func in _HOST_READS:
            _check_host_read(str(func))
        schema = func._schema
        if schema.is_mutable:
            _save_for_undo(_written_arguments(schema, args, kwargs))
        out = func(*args, **kwargs)
        if func in _NO_WORK or (not schema.is_mutable and _is_view(out, args, kwargs)):
            return out  # a view: the same memory, nothing runs on the device
        if schema.is_mutable:
            _state.steps.append(lambda: func(*args, **kwargs))
        else:
            outputs = out if isinstance(out, (tuple, list)) else (out,)

            def redo():
                fresh = func(*args, **kwargs)
                for old, new in zip(outputs, fresh if isinstance(fresh, (tuple, list)) else (fresh,)):
                    if isinstance(old, torch.Tensor):
                        old.copy_(new)

            _state.steps.append(redo)
        return out


class ReplayedGraph:
    """Stands in for torch.cuda.CUDAGraph."""

    def __init__(self):
        self.steps: list = []

    def replay(self) -> None:
        with torch.inference_mode():
            for step in self.steps:
                step()


@contextlib.contextmanager
def _capture(graph: ReplayedGraph, *args, **kwargs):
    if _state.steps is not None:
        raise RuntimeError("captures do not nest")
    _state.steps, _state.undo = graph.steps, []
    try:
        with _Recorder():
            yield
    finally:
        _state.steps = None
        with torch.inference_mode():
            for tensor, before in reversed(_state.undo):
                if not torch.equal(tensor, before):  # (weights may be a read-only map of their file)
                    tensor.copy_(before)
        _state.undo = []


class _Stream:
    def wait_stream(self, other) -> None:
        pass


def _patched_launches(monkeypatch) -> None:
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        def launch():
            _state.in_launch += 1
            try:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                _state.in_launch -= 1

        if _state.steps is not None and not _state.in_launch:
            _state.steps.append(launch)
            # Any pointer may be written: each is put back when the capture ends.
            _save_for_undo([arg for arg in args if isinstance(arg, torch.Tensor)])
        return launch()

    monkeypatch.setattr(InterpretedFunction, "run", run)


@contextlib.contextmanager
def emulated_cuda_graphs(monkeypatch, allowed_host_reads=()):
    """torch.cuda's graph, stream and capture-state calls answered on the CPU. `allowed_host_reads`:
    names of functions whose host reads are ones a GPU would not make (a check done for CPU tensors only)."""
    from qwen35.engine import cuda_graphs

    _patched_launches(monkeypatch)
    for name in ("tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def read(self, *args, _original=original, _name=name, **kwargs):
            _check_host_read(f"Tensor.{_name}()")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    monkeypatch.setattr(cuda_graphs, "graphs_supported", lambda model: True)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", ReplayedGraph)
    monkeypatch.setattr(torch.cuda, "graph", _capture)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *args: _Stream())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    from qwen35.engine import cache, paged_kv

    capturing = lambda: _state.steps is not None  # noqa: E731
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", capturing)
    for module in (cache, paged_kv):  # (torch.cuda.is_available() stays False: the CPU's paths stay)
        monkeypatch.setattr(module, "capturing", capturing)
    _state.allowed = frozenset(allowed_host_reads)
    try:
        yield
    finally:
        _state.allowed = frozenset()
