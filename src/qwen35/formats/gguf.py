"""GGUF reading: metadata and tensor infos, bounds-checked, memory-mapped, split files.

GGUF files come from strangers, so every count and offset is checked against the
bytes that are really there before anything is allocated. Only the header is
parsed eagerly; tensor data is reached through `GGUFModel.tensor_data`, a view
into the memory map (no copy).
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from qwen35.errors import FormatError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_NAME_BYTES = 65535  # ggml's GGML_MAX_NAME is 64, but stay lenient with names
MAX_NESTING = 4

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_NUMPY_DTYPES = {
    GGUFValueType.UINT8: np.uint8,
    GGUFValueType.INT8: np.int8,
    GGUFValueType.UINT16: np.uint16,
    GGUFValueType.INT16: np.int16,
    GGUFValueType.UINT32: np.uint32,
    GGUFValueType.INT32: np.int32,
    GGUFValueType.FLOAT32: np.float32,
    GGUFValueType.UINT64: np.uint64,
    GGUFValueType.INT64: np.int64,
    GGUFValueType.FLOAT64: np.float64,
}

_SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


def ggml_type_name(type_id: int) -> str:
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"unknown type {type_id}"


def tensor_nbytes(type_id: int, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ggml type `type_id`; shape in GGUF order (row width first)."""
    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        raise FormatError(f"unknown ggml tensor type {type_id}") from None
    n_elements = 1
    for dim in shape:
        n_elements *= dim
    if shape and shape[0] % block_size:
        raise FormatError(
            f"row width {shape[0]} is not a multiple of the {ggml_type_name(type_id)} "
            f"block size {block_size}"
        )
    return n_elements // block_size * type_size


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_id: int
    shape: tuple[int, ...]  # GGUF order: shape[0] is the row width (ggml's ne[0])
    offset: int  # absolute byte offset in its file
    nbytes: int
    file_index: int = 0

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.type_id)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """Shape in row-major (PyTorch) order: the reverse of GGUF's."""
        return tuple(reversed(self.shape))


class _Cursor:
    """Reads little-endian values from a buffer, refusing to read past its end."""

    def __init__(self, buffer, path: str, position: int = 0):
        self.buffer = buffer
        self.size = len(buffer)
        self.position = position
        self.path = path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.position + n > self.size:
            raise FormatError(
                f"{self.path}: truncated or corrupt GGUF: {what} needs {n} bytes at offset "
                f"{self.position}, file has {self.size}"
            )

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from(fmt, self.buffer, self.position)[0]
        self.position += n
        return value

    def string(self, what: str, limit: int | None = None) -> str:
        length = self.unpack("<Q", what + " length")
        if limit is not None and length > limit:
            raise FormatError(f"{self.path}: {what} is {length} bytes long, more than {limit}")
        self.need(length, what)
        raw = bytes(self.buffer[self.position : self.position + length])
        self.position += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, value_type: int, what: str, depth: int = 0):
        if value_type == GGUFValueType.STRING:
            return self.string(what)
        if value_type == GGUFValueType.ARRAY:
            if depth >= MAX_NESTING:
                raise FormatError(f"{self.path}: {what}: arrays nested too deep")
            item_type = self._value_type(self.unpack("<I", what + " item type"), what)
            count = self.unpack("<Q", what + " count")
            if item_type in _NUMPY_DTYPES:
                itemsize = np.dtype(_NUMPY_DTYPES[item_type]).itemsize
                self.need(count * itemsize, what)
                array = np.frombuffer(
                    self.buffer, dtype=_NUMPY_DTYPES[item_type], count=count, offset=self.position
                ).copy()
                self.position += count * itemsize
                return array
            # Strings, bools and nested arrays take at least one byte each: a count
            # larger than the bytes left is forged, whatever the items are.
            self.need(count, what)
            return [self.value(item_type, what, depth + 1) for _ in range(count)]
        fmt = _SCALAR_FORMATS.get(value_type)
        if fmt is None:
            raise FormatError(f"{self.path}: {what}: unknown value type {value_type}")
        return self.unpack(fmt, what)

    def _value_type(self, raw: int, what: str) -> int:
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise FormatError(f"{self.path}: {what}: unknown value type {raw}") from None


class GGUFFile:
    """One .gguf file: header parsed, data memory-mapped."""

    def __init__(self, path: str | os.PathLike, file_index: int = 0):
        self.path = str(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as error:
            raise FormatError(f"cannot open {self.path}: {error.strerror}") from None
        try:
            size = os.fstat(self._file.fileno()).st_size
            if size < 24:
                raise FormatError(f"{self.path}: not a GGUF file (only {size} bytes)")
            self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._parse(file_index)
        except BaseException:
            self.close()
            raise

    def _parse(self, file_index: int) -> None:
        cursor = _Cursor(self._mmap, self.path)
        magic = bytes(self._mmap[:4])
        if magic != GGUF_MAGIC:
            raise FormatError(f"{self.path}: not a GGUF file (magic {magic!r})")
        cursor.position = 4
        self.version = cursor.unpack("<I", "version")
        if self.version not in SUPPORTED_VERSIONS:
            raise FormatError(f"{self.path}: GGUF version {self.version} is not supported (2, 3 are)")
        tensor_count = cursor.unpack("<Q", "tensor count")
        kv_count = cursor.unpack("<Q", "metadata count")
        # Each metadata pair takes >= 12 bytes and each tensor info >= 24: counts
        # that could not fit in the file are forged.
        if kv_count * 12 > cursor.size or tensor_count * 24 > cursor.size:
            raise FormatError(
                f"{self.path}: corrupt GGUF header: {tensor_count} tensors and {kv_count} "
                f"metadata entries cannot fit in {cursor.size} bytes"
            )
        self.metadata: dict[str, object] = {}
        for index in range(kv_count):
            key = cursor.string(f"metadata key #{index}", limit=MAX_NAME_BYTES)
            value_type = cursor._value_type(cursor.unpack("<I", f"type of {key}"), key)
            self.metadata[key] = cursor.value(value_type, f"metadata {key}")

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise FormatError(f"{self.path}: bad general.alignment {alignment!r}")

        raw_infos = []
        for index in range(tensor_count):
            name = cursor.string(f"tensor name #{index}", limit=MAX_NAME_BYTES)
            n_dims = cursor.unpack("<I", f"dimensions of {name}")
            if n_dims == 0 or n_dims > MAX_DIMS:
                raise FormatError(f"{self.path}: tensor {name} has {n_dims} dimensions")
            shape = tuple(cursor.unpack("<Q", f"shape of {name}") for _ in range(n_dims))
            if any(dim == 0 or dim > 2**40 for dim in shape):
                raise FormatError(f"{self.path}: tensor {name} has a bad shape {shape}")
            type_id = cursor.unpack("<I", f"type of {name}")
            offset = cursor.unpack("<Q", f"offset of {name}")
            raw_infos.append((name, type_id, shape, offset))

        data_start = -(-cursor.position // alignment) * alignment
        data_size = cursor.size - data_start
        self.tensors: dict[str, TensorInfo] = {}
        for name, type_id, shape, offset in raw_infos:
            try:
                nbytes = tensor_nbytes(type_id, shape)
            except FormatError as error:
                raise FormatError(f"{self.path}: tensor {name}: {error}") from None
            if offset % alignment or offset + nbytes > data_size:
                raise FormatError(
                    f"{self.path}: tensor {name} ({nbytes} bytes at data offset {offset}) "
                    f"lies outside the file's {max(data_size, 0)} data bytes"
                )
            if name in self.tensors:
                raise FormatError(f"{self.path}: tensor {name} appears twice")
            self.tensors[name] = TensorInfo(name, type_id, shape, data_start + offset, nbytes, file_index)
        self.data_start = data_start

    def buffer(self):
        return self._mmap

    def release_pages(self, start: int, stop: int) -> bool:
        """Drop this process's resident pages of file bytes [start, stop) (whole pages only).

        Weights copied into another layout are not read from the map again; their pages
        would otherwise stay counted in the process's memory. The map is shared and
        read-only, so a later read simply faults the bytes back in from the file.
        """
        if sys.platform != "linux" or not 0 <= start < stop <= len(self._mmap):
            return False
        page = mmap.PAGESIZE
        first, last = -(-start // page) * page, stop // page * page
        if first >= last:
            return False
        base = np.frombuffer(self._mmap, dtype=np.uint8).ctypes.data
        return _libc().madvise(ctypes.c_void_p(base + first), ctypes.c_size_t(last - first), _MADV_DONTNEED) == 0

    def close(self) -> None:
        mapping = getattr(self, "_mmap", None)
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass  # numpy views still alive: the map closes when they go
        if getattr(self, "_file", None) is not None:
            self._file.close()


_MADV_DONTNEED = 4  # linux/mman-common.h


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


def split_paths(path: str | os.PathLike) -> list[Path]:
    """All shards of a split model given any one of them (or just [path] if not split)."""
    path = Path(path)
    match = _SPLIT_NAME.match(path.name)
    if not match:
        return [path]
    count = int(match["count"])
    if count < 1:
        raise FormatError(f"{path}: bad split count in its name")
    return [path.with_name(f"{match['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


class GGUFModel:
    """A model stored in one GGUF file or split over several: merged metadata and tensors."""

    def __init__(self, path: str | os.PathLike):
        paths = split_paths(path)
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            if len(paths) == 1:
                raise FormatError(f"no such file: {paths[0]}")
            raise FormatError(f"split model is missing {len(missing)} shard(s): {', '.join(missing)}")
        self.files: list[GGUFFile] = []
        try:
            for index, shard in enumerate(paths):
                self.files.append(GGUFFile(shard, file_index=index))
        except BaseException:
            self.close()
            raise
        self.path = str(paths[0])
        self.metadata = dict(self.files[0].metadata)
        declared = self.metadata.get("split.count")
        if declared is not None and int(declared) != len(paths):
            raise FormatError(f"{self.path}: split.count says {declared} shards, found {len(paths)}")
        self.tensors: dict[str, TensorInfo] = {}
        for gguf_file in self.files:
            for name, info in gguf_file.tensors.items():
                if name in self.tensors:
                    raise FormatError(f"tensor {name} appears in two shards")
                self.tensors[name] = info

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise FormatError(f"{self.path}: no general.architecture in metadata")
        return arch

    def arch_value(self, key: str, default=None):
        """`{arch}.{key}` from metadata, e.g. arch_value('block_count')."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def tensor_data(self, name: str) -> np.ndarray:
        """The raw bytes of a tensor as a read-only uint8 view of the memory map."""
        info = self.tensors[name]
        return np.frombuffer(self.files[info.file_index].buffer(), dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def release_tensor_pages(self, data) -> bool:
        """`release_pages` for the bytes under `data` (a numpy array or tensor), when they lie in
        one of this model's maps; anything else is left alone. True when pages were dropped."""
        address = data.data_ptr() if hasattr(data, "data_ptr") else data.ctypes.data
        length = data.nbytes
        for gguf_file in self.files:
            base = np.frombuffer(gguf_file.buffer(), dtype=np.uint8).ctypes.data
            if base <= address and address + length <= base + len(gguf_file.buffer()):
                return gguf_file.release_pages(address - base, address - base + length)
        return False

    def file_size(self) -> int:
        return sum(os.path.getsize(f.path) for f in self.files)

    def close(self) -> None:
        for gguf_file in self.files:
            gguf_file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
