"""Linear layers whose weights stay in their GGUF blocks and are dequantized on use.

`QuantLinear` (a [out, in] weight) and `QuantExperts` (a stack of MoE expert
weights, [E, out, in]) hold the tensor's raw bytes, usually a view of the
memory-mapped file, so no fp32 copy of a weight lives between calls.

Each module has a `mode`:
- "reference" (default): exact fp32 dequantization (`dequant.dequantize`, bit-equal
  to gguf-py) followed by an fp32 matmul. Large weights are dequantized a slab of
  rows at a time so the temporary stays small.
- "fast": a registered fast kernel for the weight's type and device when there is one
  (see `register_fast_kernel`, and `register_fast_expert_kernel` for whole MoE calls;
  `qwen35.kernels.fast_cpu.install()` registers the AVX-512 CPU kernels for every
  quantized type and F16/BF16, `qwen35.kernels.fast_cuda.install()` the Triton GPU
  kernels), otherwise the reference path. The model never needs to
  know which: `set_mode(model, "fast")` switches every layer in place. A kernel may want
  the weights re-arranged: its `prepare` function runs once, when a module enters
  "fast" mode, and the result (`fast_weights`) is what the kernel then receives; leaving
  "fast" mode drops it.

Both return float32, whatever the input dtype. Weights from HF checkpoints
(F32/F16/BF16) go through `from_dense` and keep their dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType

from qwen35.errors import FormatError, Qwen35Error
from qwen35.kernels.dequant import as_byte_tensor, dequantize, row_nbytes, type_name

MODES = ("reference", "fast")

# Reference forward dequantizes at most this many weight elements at once (4 MiB of fp32):
# small temporaries stay in cache and are reused by the allocator.
SLAB_ELEMENTS = 1 << 20

_DENSE_TYPES = {
    torch.float32: GGMLQuantizationType.F32,
    torch.float16: GGMLQuantizationType.F16,
    torch.bfloat16: GGMLQuantizationType.BF16,
}

# A fast kernel computes x @ W^T from the weights in its own form (see WeightPrep):
#   kernel(weights, type_id, x [M, in] float32, in_features, out_features) -> [M, out] float32
FastKernel = Callable[[torch.Tensor, int, torch.Tensor, int, int], torch.Tensor]
_FAST_KERNELS: dict[tuple[str, int], FastKernel] = {}  # by (device type, ggml type)

# A fast expert kernel takes a whole QuantExperts call, or declines it by returning None:
#   kernel(weights, type_id, x [R, in] float32 (one row per slot, R = S, or one per token
#          shared by its S / R consecutive slots), expert_ids [S],
#          in_features, out_features) -> [S, out] float32 | None
FastExpertKernel = Callable[[torch.Tensor, int, torch.Tensor, torch.Tensor, int, int], torch.Tensor | None]
_FAST_EXPERT_KERNELS: dict[tuple[str, int], FastExpertKernel] = {}

# A fast group kernel applies several layers to one input in one call, or declines (None):
#   kernel([weights], [type_id], x [M, in] float32, in_features, [out_features]) -> [M, sum(out)] | None
FastGroupKernel = Callable[[list, list, torch.Tensor, int, list], torch.Tensor | None]
_FAST_GROUP_KERNEL: dict[str, FastGroupKernel] = {}  # by device type
# (first, second, x [M, in]) -> [M, out1 + out2], or None to decline: a fused LinearGroup's two block tensors
# of different types in one call, by device type.
_FAST_PAIR_KERNEL: dict[str, Callable] = {}

# The same for several QuantExperts on one input per slot (gate and up):
#   kernel([weights], [type_id], x [R, in] (as above), expert_ids [S], in_features, [out_features]) -> [S, sum(out)] | None
FastExpertGroupKernel = Callable[[list, list, torch.Tensor, torch.Tensor, int, list], torch.Tensor | None]
_FAST_EXPERT_GROUP_KERNEL: dict[str, FastExpertGroupKernel] = {}

# Rows of blocks -> fp32 rows, bit-equal to dequant.dequantize, for "fast" mode's `rows`
# (the embedding lookup), or None to decline:
#   dequantizer(blocks [N, row_bytes], type_id, in_features) -> [N, in] float32 | None
Dequantizer = Callable[[torch.Tensor, int, int], torch.Tensor | None]
_FAST_DEQUANTIZER: dict[str, Dequantizer] = {}

# The weights' form for a type's fast kernels, made once from the blocks:
#   prepare(blocks [out, row_bytes] or [E, out, row_bytes], type_id, in_features) -> weights
# Without one, the kernels take the blocks themselves.
WeightPrep = Callable[[torch.Tensor, int, int], torch.Tensor]
_WEIGHT_PREPS: dict[tuple[str, int], WeightPrep] = {}

# Every registration names the device type ("cpu", "cuda") whose weights the kernel takes:
# a module picks its kernels by where its blocks live.


def register_fast_kernel(type_id: int, kernel: FastKernel, prepare: WeightPrep | None = None,
                         device: str = "cpu") -> None:
    """Make `kernel` the "fast" mode matmul for weights of ggml type `type_id` on `device`, fed
    with `prepare(blocks, type_id, in_features)` when given (for QuantExperts too)."""
    key = (device, int(type_id))
    _FAST_KERNELS[key] = kernel
    if prepare is None:
        _WEIGHT_PREPS.pop(key, None)
    else:
        _WEIGHT_PREPS[key] = prepare


def fast_kernel_for(type_id: int, device: str = "cpu") -> FastKernel | None:
    return _FAST_KERNELS.get((device, int(type_id)))


def register_fast_group_kernel(kernel: FastGroupKernel, device: str = "cpu") -> None:
    """Let `kernel` take whole LinearGroup calls whose layers are all in "fast" mode."""
    _FAST_GROUP_KERNEL[device] = kernel


def register_fast_pair_kernel(kernel, device: str = "cpu") -> None:
    """Let `kernel` take fused LinearGroup calls of two block tensors (two block types) in "fast" mode."""
    _FAST_PAIR_KERNEL[device] = kernel


def register_fast_expert_group_kernel(kernel: FastExpertGroupKernel, device: str = "cpu") -> None:
    """Let `kernel` take whole ExpertGroup calls whose experts are all in "fast" mode."""
    _FAST_EXPERT_GROUP_KERNEL[device] = kernel


def register_fast_expert_kernel(type_id: int, kernel: FastExpertKernel, device: str = "cpu") -> None:
    """Let `kernel` take whole "fast" mode QuantExperts calls for weights of ggml type `type_id`."""
    _FAST_EXPERT_KERNELS[(device, int(type_id))] = kernel


def register_fast_dequantizer(dequantizer: Dequantizer, device: str = "cpu") -> None:
    """Let "fast" mode's `QuantLinear.rows` dequantize with `dequantizer` (bit-equal to the reference)."""
    _FAST_DEQUANTIZER[device] = dequantizer


def set_mode(root: torch.nn.Module, mode: str) -> None:
    """Switch every QuantLinear/QuantExperts under `root` (itself included) to `mode`."""
    if mode not in MODES:
        raise Qwen35Error(f"unknown kernel mode {mode!r} (choose from {', '.join(MODES)})")
    for module in root.modules():
        if isinstance(module, (QuantLinear, QuantExperts)):
            module.mode = mode


class _Modes:
    """The `mode` switch shared by QuantLinear and QuantExperts: entering "fast" prepares the
    kernel's weights once (see WeightPrep), leaving it frees them."""

    _mode = "reference"
    fast_weights: torch.Tensor | None = None

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise Qwen35Error(f"unknown kernel mode {mode!r} (choose from {', '.join(MODES)})")
        prepare = _WEIGHT_PREPS.get((self.device_type, self.type_id)) if mode == "fast" else None
        if prepare is None:
            self.fast_weights = None
        elif self._mode != "fast" or self.fast_weights is None:
            self.fast_weights = prepare(self.blocks, self.type_id, self.in_features)
        self._mode = mode

    def _kernel_weights(self) -> torch.Tensor:
        return self.blocks if self.fast_weights is None else self.fast_weights

    @property
    def device_type(self) -> str:
        return self.blocks.device.type

    def _apply(self, fn, recurse=True):
        # Moving to another device (`.to("cuda")`) re-prepares the weights for that device's kernels.
        super()._apply(fn, recurse)
        if self._mode == "fast":
            self.fast_weights = None
            self.mode = "fast"
        return self


def _dense_bytes(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    type_id = _DENSE_TYPES.get(weight.dtype)
    if type_id is None:
        raise Qwen35Error(f"weights of dtype {weight.dtype} are not supported (float32, float16, bfloat16 are)")
    return weight.detach().contiguous().view(torch.uint8).reshape(-1), int(type_id)


def _weight_bytes(raw, type_id: int, shape: tuple[int, ...]) -> torch.Tensor:
    """raw bytes checked against `shape` (PyTorch order) and viewed as [..., row_bytes]."""
    data = as_byte_tensor(raw)
    row_bytes = row_nbytes(type_id, shape[-1])
    n_rows = int(np.prod(shape[:-1], dtype=np.int64))
    if data.numel() != n_rows * row_bytes:
        raise FormatError(
            f"{type_name(type_id)} weight of shape {list(shape)} needs {n_rows * row_bytes} bytes, "
            f"got {data.numel()}"
        )
    return data.reshape(*shape[:-1], row_bytes)


def _as_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.to(torch.float32)


class QuantLinear(_Modes, torch.nn.Module):
    """y = x @ W^T (no bias) with W [out_features, in_features] kept as GGUF blocks."""

    def __init__(self, raw: torch.Tensor | np.ndarray, type_id: int, out_features: int, in_features: int):
        super().__init__()
        if out_features <= 0 or in_features <= 0:
            raise FormatError(f"bad linear weight shape [{out_features}, {in_features}]")
        self.type_id = int(type_id)
        self.out_features = int(out_features)
        self.in_features = int(in_features)
        blocks = _weight_bytes(raw, self.type_id, (self.out_features, self.in_features))
        # Not persistent: these are file bytes, not trainable state, and may be read-only.
        self.register_buffer("blocks", blocks, persistent=False)

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> QuantLinear:
        """Wrap an [out, in] float32/float16/bfloat16 weight, keeping its dtype (no copy if contiguous)."""
        if weight.dim() != 2:
            raise Qwen35Error(f"a linear weight must be 2-D, got shape {list(weight.shape)}")
        data, type_id = _dense_bytes(weight)
        return cls(data, type_id, weight.shape[0], weight.shape[1])

    @property
    def type_name(self) -> str:
        return type_name(self.type_id)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.type_name}, mode={self.mode}"

    def dequantized(self) -> torch.Tensor:
        """The whole weight, [out, in] float32 (a fresh tensor, except F32 weights: a read-only view)."""
        return dequantize(self.blocks, self.type_id, (self.out_features, self.in_features))

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` of the weight as float32 [*index.shape, in]: an embedding lookup."""
        index = torch.as_tensor(index, dtype=torch.long)
        # Checking ids on a GPU would wait for it; the model checks token ids before they get there.
        if index.numel() and index.device.type == "cpu" and (int(index.min()) < 0 or int(index.max()) >= self.out_features):
            raise Qwen35Error(f"row index out of range [0, {self.out_features})")
        picked = self.blocks[index.reshape(-1).to(self.blocks.device)]
        dequantizer = _FAST_DEQUANTIZER.get(self.device_type) if self.mode == "fast" else None
        if dequantizer is not None and picked.numel():
            rows = dequantizer(picked, self.type_id, self.in_features)
            if rows is not None:
                return rows.reshape(*index.shape, self.in_features)
        return dequantize(picked, self.type_id, (*index.shape, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input width {x.shape[-1]} does not match in_features {self.in_features}")
        flat = _as_float32(x.reshape(-1, self.in_features))
        kernel = fast_kernel_for(self.type_id, self.device_type) if self.mode == "fast" else None
        if kernel is not None:
            out = kernel(self._kernel_weights(), self.type_id, flat, self.in_features, self.out_features)
        else:
            out = reference_matmul(self.blocks, self.type_id, flat, self.in_features)
        return out.reshape(*x.shape[:-1], self.out_features)


class LinearGroup:
    """Several QuantLinear layers that read the same input, applied in one kernel call where
    a group kernel takes them (x quantized once, one pass of the threads: decode makes many
    small calls, each with a fixed cost); otherwise one layer after another.

    Returns one output per layer, as column slices of one [..., sum(out)] tensor.
    """

    def __init__(self, *layers: QuantLinear):
        if not layers or len({layer.in_features for layer in layers}) != 1:
            raise Qwen35Error("a LinearGroup needs layers of one input width")
        self.layers = layers
        self.in_features = layers[0].in_features
        self.out_features = [layer.out_features for layer in layers]
        self.fused: list[tuple[QuantLinear, list[int]]] | None = None  # see fuse()

    def fuse(self, into: torch.Tensor | None = None) -> None:
        """Give each run of consecutive layers of one block type one block tensor, of which the layers'
        blocks become row slices (no extra memory), so that a GPU reads each run in one launch.
        `into`: a [sum(out), row_bytes] tensor whose row slices the layers' blocks already are, in order
        (ExpertGroup.fuse's shared expert), used as the whole as it is."""
        if into is not None:
            whole = QuantLinear(into, self.layers[0].type_id, into.shape[0], self.in_features)
            whole.mode = self.layers[0].mode
            self.fused = [(whole, list(self.out_features))]
            return
        self.fused = []
        for run in _runs_of_one_type(self.layers):
            if len(run) == 1:
                self.fused.append((run[0], [run[0].out_features]))
                continue
            blocks = torch.cat([layer.blocks for layer in run])
            start = 0
            for layer in run:
                layer.blocks = blocks[start:start + layer.out_features]
                start += layer.out_features
            whole = QuantLinear(blocks, run[0].type_id, start, self.in_features)
            whole.mode = run[0].mode
            self.fused.append((whole, [layer.out_features for layer in run]))

    def joined(self, x: torch.Tensor) -> torch.Tensor | None:
        """The outputs side by side, [..., sum(out)], when fuse() made the whole group one block tensor
        (one launch, whose output a kernel can read as a whole); None otherwise."""
        if self.fused is None or len(self.fused) != 1:
            return None
        whole, _ = self.fused[0]
        whole.mode = self.layers[0].mode
        return whole(x)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.fused is not None and len(self.fused) == 2 and self.layers[0].mode == "fast":
            pair = _FAST_PAIR_KERNEL.get(self.layers[0].device_type)
            if pair is not None:
                flat = _as_float32(x.reshape(-1, self.in_features))
                out = pair(self.fused[0][0], self.fused[1][0], flat)
                if out is not None:
                    return out.reshape(*x.shape[:-1], -1).split(self.out_features, dim=-1)
        if self.fused is not None:
            outputs = []
            for whole, sizes in self.fused:
                whole.mode = self.layers[0].mode
                outputs.extend(whole(x).split(sizes, dim=-1))
            return tuple(outputs)
        kernel = _FAST_GROUP_KERNEL.get(self.layers[0].device_type)
        if kernel is not None and all(layer.mode == "fast" for layer in self.layers):
            if x.shape[-1] != self.in_features:
                raise ValueError(f"input width {x.shape[-1]} does not match in_features {self.in_features}")
            flat = _as_float32(x.reshape(-1, self.in_features))
            out = kernel([layer._kernel_weights() for layer in self.layers], [layer.type_id for layer in self.layers],
                         flat, self.in_features, self.out_features)
            if out is not None:
                return out.reshape(*x.shape[:-1], -1).split(self.out_features, dim=-1)
        return tuple(layer(x) for layer in self.layers)


def _runs_of_one_type(layers) -> list[list[QuantLinear]]:
    runs: list[list[QuantLinear]] = []
    for layer in layers:
        if runs and runs[-1][0].type_id == layer.type_id and runs[-1][0].blocks.device == layer.blocks.device:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return runs


def reference_matmul(blocks: torch.Tensor, type_id: int, x: torch.Tensor, in_features: int) -> torch.Tensor:
    """x [M, in] float32 @ dequantize(blocks [out, row_bytes])^T, one slab of rows at a time."""
    out_features = blocks.shape[0]
    slab = max(1, SLAB_ELEMENTS // in_features)
    if out_features <= slab:
        return x @ dequantize(blocks, type_id, (out_features, in_features)).t()
    out = torch.empty(x.shape[0], out_features, dtype=torch.float32, device=x.device)
    for start in range(0, out_features, slab):
        stop = min(start + slab, out_features)
        weight = dequantize(blocks[start:stop], type_id, (stop - start, in_features))
        out[:, start:stop] = x @ weight.t()
    return out


class QuantExperts(_Modes, torch.nn.Module):
    """MoE expert weights [n_experts, out, in] kept as GGUF blocks; one matmul per used expert.

    GGUF stores them as [in, out, n_experts] (row width first), which is this
    PyTorch shape reversed.
    """

    def __init__(
        self, raw: torch.Tensor | np.ndarray, type_id: int, n_experts: int, out_features: int, in_features: int
    ):
        super().__init__()
        if min(n_experts, out_features, in_features) <= 0:
            raise FormatError(f"bad expert weight shape [{n_experts}, {out_features}, {in_features}]")
        self.type_id = int(type_id)
        self.n_experts = int(n_experts)
        self.out_features = int(out_features)
        self.in_features = int(in_features)
        blocks = _weight_bytes(raw, self.type_id, (self.n_experts, self.out_features, self.in_features))
        self.register_buffer("blocks", blocks, persistent=False)

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> QuantExperts:
        """Wrap an [E, out, in] float32/float16/bfloat16 weight (HF layout), keeping its dtype."""
        if weight.dim() != 3:
            raise Qwen35Error(f"an expert weight must be 3-D, got shape {list(weight.shape)}")
        data, type_id = _dense_bytes(weight)
        return cls(data, type_id, *weight.shape)

    @property
    def type_name(self) -> str:
        return type_name(self.type_id)

    def extra_repr(self) -> str:
        return (
            f"{self.n_experts} experts, {self.in_features} -> {self.out_features}, "
            f"{self.type_name}, mode={self.mode}"
        )

    def dequantized_expert(self, expert: int) -> torch.Tensor:
        """Expert `expert`'s weight as [out, in] float32."""
        if not 0 <= expert < self.n_experts:
            raise Qwen35Error(f"expert {expert} out of range [0, {self.n_experts})")
        return dequantize(self.blocks[expert], self.type_id, (self.out_features, self.in_features))

    def expert_matmul(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] float32 @ W_expert^T -> [M, out] float32."""
        kernel = fast_kernel_for(self.type_id, self.device_type) if self.mode == "fast" else None
        if kernel is not None:
            return kernel(self._kernel_weights()[expert], self.type_id, x, self.in_features, self.out_features)
        return x @ self.dequantized_expert(expert).t()

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Apply the chosen expert to each (token, slot).

        expert_ids: LongTensor [N] or [N, k] (k experts per token).
        x: [N, in] (one input per token, shared by its k slots, as for gate/up) or
           [*expert_ids.shape, in] (one input per slot, as for down).
        Returns [*expert_ids.shape, out] float32. Slots are grouped by expert, so each
        used expert is dequantized once per call and unused ones never.
        """
        ids, inputs, rows_per_slot = self.slot_inputs(x, expert_ids)
        n_slots = ids.numel()
        if n_slots == 0:
            return torch.empty(*expert_ids.shape, self.out_features, dtype=torch.float32, device=x.device)
        whole_call = _FAST_EXPERT_KERNELS.get((self.device_type, self.type_id)) if self.mode == "fast" else None
        if whole_call is not None:
            fused = whole_call(self._kernel_weights(), self.type_id, inputs, ids, self.in_features, self.out_features)
            if fused is not None:
                return fused.reshape(*expert_ids.shape, self.out_features)
        source = torch.arange(n_slots, device=x.device) // rows_per_slot
        out = torch.empty(n_slots, self.out_features, dtype=torch.float32, device=x.device)
        order = torch.argsort(ids, stable=True)
        experts, counts = torch.unique_consecutive(ids[order], return_counts=True)
        start = 0
        for expert, count in zip(experts.tolist(), counts.tolist()):
            slots = order[start : start + count]
            start += count
            out[slots] = self.expert_matmul(expert, inputs[source[slots]])
        return out.reshape(*expert_ids.shape, self.out_features)

    def slot_inputs(self, x: torch.Tensor, expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(ids [S], inputs [R, in] float32, S / R): slot s reads row s // (S / R) of inputs
        (one row per slot, or one per token shared by its k slots)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input width {x.shape[-1]} does not match in_features {self.in_features}")
        if expert_ids.dim() not in (1, 2):
            raise ValueError(f"expert_ids must be [N] or [N, k], got shape {list(expert_ids.shape)}")
        ids = expert_ids.reshape(-1).to(torch.long)
        if x.shape[:-1] == expert_ids.shape:
            inputs, rows_per_slot = x.reshape(ids.numel(), self.in_features), 1
        elif x.dim() == 2 and expert_ids.dim() == 2 and x.shape[0] == expert_ids.shape[0]:
            inputs, rows_per_slot = x, expert_ids.shape[1]
        else:
            raise ValueError(
                f"input shape {list(x.shape)} does not fit expert_ids shape {list(expert_ids.shape)}"
            )
        if ids.numel() and ids.device.type == "cpu":  # on a GPU they come from the router's top-k
            low, high = torch.aminmax(ids)
            if int(low) < 0 or int(high) >= self.n_experts:
                raise Qwen35Error(f"expert id out of range [0, {self.n_experts})")
        return ids, _as_float32(inputs), rows_per_slot


class ExpertGroup:
    """Several QuantExperts (an MoE layer's gate and up) applied to the same inputs and expert
    choices in one kernel call where a group kernel takes them; otherwise one after another.
    Returns one output per member, as slices of one [..., sum(out)] tensor."""

    def __init__(self, *experts: QuantExperts):
        if not experts or len({(e.in_features, e.n_experts) for e in experts}) != 1:
            raise Qwen35Error("an ExpertGroup needs experts of one input width and count")
        self.experts = experts
        self.out_features = [e.out_features for e in experts]
        self.fused: QuantExperts | None = None  # see fuse()

    def fuse(self, shared: tuple[QuantLinear, ...] | None = None) -> bool:
        """One [E, sum(out), row] block tensor for members of one block type, the members' blocks becoming
        views of it (no extra memory): a GPU then reads every chosen expert's gate and up in one launch.
        The members' own kernels are not used afterwards (their views are strided).

        `shared`: one layer per member (an MoE's shared expert), appended as expert E (their blocks become
        rows of it), so that one launch computes the routed experts and the shared one. False, and
        nothing changed, where the members or the shared layers differ in block type or shape."""
        first = self.experts[0]
        if len({e.type_id for e in self.experts}) != 1 or (shared is not None and not self.can_stack(shared)):
            return False
        n_experts = first.n_experts + (shared is not None)
        row_bytes = first.blocks.shape[-1]
        blocks = torch.empty((n_experts, sum(self.out_features), row_bytes), dtype=torch.uint8,
                             device=first.blocks.device)
        start = 0
        for index, e in enumerate(self.experts):
            stop = start + e.out_features
            blocks[:first.n_experts, start:stop] = e.blocks
            e.blocks = blocks[:first.n_experts, start:stop]
            if shared is not None:
                blocks[first.n_experts, start:stop] = shared[index].blocks
                shared[index].blocks = blocks[first.n_experts, start:stop]
            start = stop
        self.fused = QuantExperts(blocks, first.type_id, n_experts, start, first.in_features)
        self.fused.mode = first.mode
        return True

    def can_stack(self, shared: tuple[QuantLinear, ...]) -> bool:
        """Whether `shared` (one layer per member) can be stacked as one more expert (see fuse)."""
        return len(shared) == len(self.experts) and all(
            (layer.type_id, layer.out_features, layer.in_features) == (e.type_id, e.out_features, e.in_features)
            and layer.blocks.device == e.blocks.device for layer, e in zip(shared, self.experts))

    def joined(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor | None:
        """The members' outputs side by side, [..., sum(out)], after fuse(); None otherwise."""
        if self.fused is None:
            return None
        self.fused.mode = self.experts[0].mode
        return self.fused(x, expert_ids)

    def __call__(self, x: torch.Tensor, expert_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.fused is not None:
            self.fused.mode = self.experts[0].mode
            return self.fused(x, expert_ids).split(self.out_features, dim=-1)
        kernel = _FAST_EXPERT_GROUP_KERNEL.get(self.experts[0].device_type)
        if kernel is not None and all(e.mode == "fast" for e in self.experts):
            first = self.experts[0]
            ids, inputs, _ = first.slot_inputs(x, expert_ids)
            out = kernel([e._kernel_weights() for e in self.experts], [e.type_id for e in self.experts],
                         inputs, ids, first.in_features, self.out_features)
            if out is not None:
                return out.reshape(*expert_ids.shape, -1).split(self.out_features, dim=-1)
        return tuple(e(x, expert_ids) for e in self.experts)
