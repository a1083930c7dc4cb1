"""compute-sanitizer's memcheck and racecheck, for the Triton kernels as CI runs them (in Triton's
interpreter, where they cannot fail the way they fail on a GPU).

Out of bounds: on a GPU, a kernel that loads or stores outside the tensors it was given either hits an
illegal address, which kills the process's CUDA context (so every later test of a GPU check fails
with it), or reads some other tensor's bytes. The interpreter reads and writes host memory at
whatever address a kernel computes, so such a bug passes there. Here every address a kernel
touches (lanes its mask turns off excepted) must lie, with all the bytes of its element, inside
the elements of one of the tensors that launch was given.

Races: the interpreter runs a launch's programs one after another, in grid order, so a program
always sees everything the programs before it wrote; on a GPU they run at once. Here a byte that
one program touches and another later writes, or that one writes and another later reads, must be
ordered as the GPU would order it: the first program did a release (an atomic with release
semantics, as in triton_arrivals.last_to_arrive) after its access, and the second an acquire
before its own. Reads of bytes another program wrote must also go through L2 (`cache_modifier=".cg"`)
or be volatile, the rule triton_arrivals.py keeps: a plain load may be compiled to the read-only
path or find a line its SM's L1 cached before. Atomics never conflict with atomics, but a plain load
or store of bytes another program's atomic updated (or the reverse) needs the same ordering; an
atomic with release semantics releases itself. Inside a program,
the threads race too: bytes one thread stores and another then loads or stores (or one loads and
another then stores) need a `tl.debug_barrier()` between.

A violation raises `MemoryCheckFailed` naming the kernel, the program, the access and the tensor
argument it concerns. tests/conftest.py installs the checks for the whole run wherever the
kernels are interpreted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_installed = False

RELEASED, UNORDERED = 1, 2  # what a finished program did to a byte (0: nothing), as later programs see it


class MemoryCheckFailed(RuntimeError):
    pass


def _tensors(value):
    if hasattr(value, "untyped_storage"):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif hasattr(value, "base") and hasattr(value, "block_shape"):  # a TensorDescriptor
        yield from _tensors(value.base)


@dataclass
class _Access:
    lanes: np.ndarray  # each lane's address, 0 where masked off
    itemsize: int
    spans: list[tuple[int, np.ndarray]]  # (span, byte offsets inside it) of the lanes that are on
    time: int
    is_write: bool
    is_atomic: bool = False

    def byte_addresses(self) -> np.ndarray:
        on = self.lanes[self.lanes != 0]
        return (on[:, None] + np.arange(self.itemsize, dtype=np.uint64)[None, :]).reshape(-1)


@dataclass
class _Launch:
    """One kernel launch: the byte spans it may touch and what its programs did to them."""

    kernel: str
    names: list[str]
    starts: np.ndarray
    ends: np.ndarray
    threads: int  # a program's: 32 a warp
    reads: dict[int, np.ndarray] = field(default_factory=dict)  # span -> 0/RELEASED/UNORDERED a byte
    writes: dict[int, np.ndarray] = field(default_factory=dict)
    atomics: dict[int, np.ndarray] = field(default_factory=dict)  # bytes atomics updated
    program: tuple = ()
    time: int = 0
    acquired_at: int | None = None
    released_at: int | None = None
    barrier_at: int = 0
    accesses: list[_Access] = field(default_factory=list)

    def finish_program(self) -> None:
        """What the program that just ended did, as later programs must be ordered against it."""
        for access in self.accesses:
            done = RELEASED if self.released_at is not None and access.time < self.released_at else UNORDERED
            shadows = self.atomics if access.is_atomic else self.writes if access.is_write else self.reads
            for span, bytes_at in access.spans:
                shadow = self._shadow(shadows, span)
                shadow[bytes_at] = np.maximum(shadow[bytes_at], done)
        self.accesses, self.acquired_at, self.released_at = [], None, None

    def _shadow(self, shadows: dict, span: int) -> np.ndarray:
        if span not in shadows:
            shadows[span] = np.zeros(int(self.ends[span] - self.starts[span]), dtype=np.uint8)
        return shadows[span]

    def spans_of(self, operation: str, addresses: np.ndarray, itemsize: int) -> np.ndarray:
        """Each address's span; raises where an element is not wholly inside one."""
        if addresses.size == 0:
            return addresses.astype(np.int64)
        lowest = np.searchsorted(self.starts, addresses.min(), side="right") - 1
        if lowest >= 0 and addresses.max() + np.uint64(itemsize) <= self.ends[lowest]:
            return np.full(addresses.shape, lowest)  # the usual case: one tensor holds them all
        holder = np.searchsorted(self.starts, addresses, side="right").astype(np.int64) - 1
        inside = holder >= 0
        inside[inside] &= addresses[inside] + np.uint64(itemsize) <= self.ends[holder[inside]]
        if not inside.all():
            bad = int(addresses[~inside][0])
            raise self.failure(f"{operation} of {itemsize} bytes at {bad:#x}, {int((~inside).sum())} of "
                               f"{addresses.size} addresses outside every tensor argument: {self._nearest(bad, itemsize)}")
        return holder

    def _nearest(self, address: int, itemsize: int) -> str:
        if not len(self.starts):
            return "the launch was given no tensors"
        gaps = [int(s) - address if address < int(s) else max(0, address + itemsize - int(e))
                for s, e in zip(self.starts, self.ends)]
        at = int(np.argmin(gaps))
        side = "before" if address < int(self.starts[at]) else "past the end of"
        return f"{gaps[at]} bytes {side} argument {self.names[at]!r} ({int(self.ends[at] - self.starts[at])} bytes)"

    def failure(self, message: str) -> MemoryCheckFailed:
        return MemoryCheckFailed(f"{self.kernel} program {self.program}: {message}")

    def access(self, operation: str, pointers, mask, itemsize: int, is_write: bool, bypasses_l1: bool = True,
               is_atomic: bool = False):
        lanes = _lanes(pointers, mask)
        addresses = lanes[lanes != 0]
        if addresses.size == 0:
            return
        self.time += 1
        holder = self.spans_of(operation, addresses, itemsize)
        within = np.arange(itemsize, dtype=np.uint64)
        access = _Access(lanes, itemsize, [], self.time, is_write, is_atomic)
        for span in np.unique(holder):
            at = addresses[holder == span] - self.starts[span]
            bytes_at = (at[:, None] + within[None, :]).reshape(-1).astype(np.int64)
            self._check_order(operation, int(span), bytes_at, access, bypasses_l1)
            access.spans.append((int(span), bytes_at))
        if not is_atomic:  # atomics order themselves
            self._check_threads(operation, access)
        self.accesses.append(access)

    def _check_threads(self, operation: str, access: _Access) -> None:
        """Inside a program: bytes one thread stored and another then loads or stores, or one loaded and another
        then stores, need a barrier between (tl.debug_barrier), as nothing else orders a program's threads'
        global memory accesses. The same lane of two accesses of the same shape is taken to be the same thread
        (Triton lays out a load and a store through the same pointers alike) where the shape has at least a lane
        a thread: with fewer, several threads hold each lane, and one of them stores it while all of them load."""
        for earlier in reversed(self.accesses):
            if earlier.time <= self.barrier_at:
                break
            if earlier.is_atomic or not (access.is_write or earlier.is_write):
                continue
            lanes = access.lanes
            if (lanes.size >= self.threads and earlier.lanes.shape == lanes.shape
                    and earlier.itemsize == access.itemsize):
                lanes = np.where(lanes == earlier.lanes, np.uint64(0), lanes)
            others = lanes[lanes != 0]
            theirs = earlier.lanes[earlier.lanes != 0]
            if (others.size == 0 or others.max() + np.uint64(access.itemsize) <= theirs.min()
                    or others.min() >= theirs.max() + np.uint64(earlier.itemsize)):
                continue
            mine = (others[:, None] + np.arange(access.itemsize, dtype=np.uint64)[None, :]).reshape(-1)
            if np.isin(mine, earlier.byte_addresses()).any():
                first, then = "stored" if earlier.is_write else "loaded", "stores" if access.is_write else "loads"
                raise self.failure(f"{operation}: one thread {first} bytes that another then {then}, with no "
                                   f"tl.debug_barrier() between (a race between the program's threads)")

    def barrier(self) -> None:
        self.time += 1
        self.barrier_at = self.time

    def _check_order(self, operation: str, span: int, bytes_at: np.ndarray, access: _Access, bypasses_l1: bool):
        """Against what earlier programs did to these bytes: atomics do not race with atomics, but with plain
        accesses they do."""
        earlier = [("written", self.writes.get(span))]
        if not access.is_atomic:
            earlier.append(("updated by an atomic", self.atomics.get(span)))
        if access.is_write:
            earlier.append(("read", self.reads.get(span)))
        acquired = self.acquired_at is not None
        for what, shadow in earlier:
            if shadow is None:
                continue
            done = shadow[bytes_at]
            unordered = (done == UNORDERED) | ((done == RELEASED) & (not acquired))
            if unordered.any():
                raise self.failure(
                    f"{operation} of argument {self.names[span]!r} at byte {int(bytes_at[unordered][0])}, "
                    f"{what} by an earlier program with no release after it and acquire before this "
                    f"(on a GPU the programs run at once: a race)")
            if what != "read" and not bypasses_l1 and (done == RELEASED).any():
                raise self.failure(
                    f"{operation} of argument {self.names[span]!r} reads another program's result through L1: "
                    f"load it with cache_modifier='.cg'")

    def synchronize(self, semantic: str, mask) -> None:
        if mask is not None and not np.asarray(mask).any():
            return
        self.time += 1
        if semantic in ("ACQUIRE", "ACQUIRE_RELEASE") and self.acquired_at is None:
            self.acquired_at = self.time
        if semantic in ("RELEASE", "ACQUIRE_RELEASE"):
            self.released_at = self.time


_current: dict[str, _Launch | None] = {"launch": None}
_launch_options = {"warps": 4}


def _start_launch(kernel: str, names: list[str], values: list, warps: int) -> None:
    """The byte spans a launch may touch: the elements each tensor argument covers (merged where views overlap)."""
    raw = []
    for name, value in zip(names, values):
        for tensor in _tensors(value):
            if tensor.numel():
                last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
                raw.append((tensor.data_ptr(), tensor.data_ptr() + (last + 1) * tensor.element_size(), name))
    merged: list[list] = []
    for start, end, name in sorted(raw):
        if merged and start < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end, name])
    _current["launch"] = _Launch(kernel, [name for _, _, name in merged],
                                 np.array([s for s, _, _ in merged], dtype=np.uint64),
                                 np.array([e for _, e, _ in merged], dtype=np.uint64), 32 * warps)


def install() -> None:
    """Checks every interpreted launch from now on (idempotent)."""
    global _installed
    if _installed:
        return
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    load, store = builder.create_masked_load, builder.create_masked_store
    rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas
    barrier = builder.create_barrier
    init_args, call = interpreter.GridExecutor._init_args_hst, interpreter.GridExecutor.__call__
    set_grid_idx = interpreter.interpreter_builder.set_grid_idx

    def checked_load(self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile):
        itemsize = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
        bypasses_l1 = bool(is_volatile) or str(cache_modifier).rsplit(".", 1)[-1] in ("CG", "CV")
        _current["launch"].access("load", ptrs.data, mask.data, itemsize, False, bypasses_l1)
        return load(self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile)

    def checked_store(self, ptrs, value, mask, cache_modifier, eviction_policy):
        _current["launch"].access("store", ptrs.data, mask.data, value.data.dtype.itemsize, True)
        return store(self, ptrs, value, mask, cache_modifier, eviction_policy)

    def checked_rmw(self, rmw_op, ptr, val, mask, sem, scope):
        launch = _current["launch"]
        launch.access("atomic", ptr.data, mask.data, val.data.dtype.itemsize, True, is_atomic=True)
        launch.synchronize(str(sem).rsplit(".", 1)[-1], mask.data)  # after: an atomic releasing releases itself
        return rmw(self, rmw_op, ptr, val, mask, sem, scope)

    def checked_cas(self, ptr, cmp, val, sem, scope):
        launch = _current["launch"]
        launch.access("atomic_cas", ptr.data, None, val.data.dtype.itemsize, True, is_atomic=True)
        launch.synchronize(str(sem).rsplit(".", 1)[-1], None)
        return cas(self, ptr, cmp, val, sem, scope)

    def checked_call(self, *args, **kwargs):
        _launch_options["warps"] = kwargs.get("num_warps") or 4  # Triton's default
        return call(self, *args, **kwargs)

    def checked_init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        names = list(self.arg_names[:len(args_hst)]) + list(kwargs_hst)
        _start_launch(getattr(self.fn, "__name__", "kernel"), names, list(args_hst) + list(kwargs_hst.values()),
                      _launch_options["warps"])
        return args_hst, kwargs_hst

    def next_program(x, y, z):
        launch = _current["launch"]
        if launch is not None:
            launch.finish_program()
            launch.program = (x, y, z)
        return set_grid_idx(x, y, z)

    def checked_barrier(self):
        _current["launch"].barrier()
        return barrier(self)

    builder.create_masked_load, builder.create_masked_store = checked_load, checked_store
    builder.create_barrier = checked_barrier
    builder.create_atomic_rmw, builder.create_atomic_cas = checked_rmw, checked_cas
    interpreter.GridExecutor._init_args_hst = checked_init_args
    interpreter.GridExecutor.__call__ = checked_call
    interpreter.interpreter_builder.set_grid_idx = next_program
    _installed = True


def _lanes(pointers, mask) -> np.ndarray:
    """Each lane's address, flattened; 0 where the mask turns the lane off."""
    lanes = np.asarray(pointers, dtype=np.uint64).reshape(-1).copy()
    if mask is not None:
        lanes[~np.broadcast_to(np.asarray(mask, dtype=bool), np.shape(pointers)).reshape(-1)] = 0
    return lanes
