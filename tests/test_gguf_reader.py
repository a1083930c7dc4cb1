"""The GGUF reader against files written by gguf-py (llama.cpp's own Python writer) and
against broken or forged files, which must give one clear FormatError."""

import mmap
import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from qwen35.errors import FormatError
from qwen35.formats.gguf import GGUFModel, split_paths


def write_small_gguf(path, split_max_tensors=0):
    writer = GGUFWriter(str(path), "qwen35", split_max_tensors=split_max_tensors)
    writer.add_block_count(2)
    writer.add_string("general.name", "small test")
    writer.add_array("test.ints", [1, 2, 3])
    writer.add_array("test.strings", ["a", "bc", ""])
    writer.add_float32("test.float", 0.5)
    writer.add_bool("test.flag", True)
    rng = np.random.default_rng(0)
    writer.add_tensor("a.weight", rng.standard_normal((4, 32)).astype(np.float32))
    writer.add_tensor("b.weight", rng.standard_normal((3, 64)).astype(np.float16))
    q8 = rng.integers(0, 255, size=(2, 34 * 2), dtype=np.uint8)
    q8[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)  # finite scale
    q8[:, 34:36] = np.frombuffer(np.float16(0.02).tobytes(), dtype=np.uint8)
    writer.add_tensor("c.weight", q8, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def small_gguf(tmp_path):
    path = tmp_path / "small.gguf"
    write_small_gguf(path)
    return path


def test_reads_what_gguf_py_wrote(small_gguf):
    reference = GGUFReader(str(small_gguf))
    with GGUFModel(small_gguf) as model:
        assert model.architecture == "qwen35"
        assert model.arch_value("block_count") == 2
        assert model.metadata["general.name"] == "small test"
        assert list(model.metadata["test.ints"]) == [1, 2, 3]
        assert model.metadata["test.strings"] == ["a", "bc", ""]
        assert model.metadata["test.float"] == 0.5
        assert model.metadata["test.flag"] is True
        assert set(model.tensors) == {t.name for t in reference.tensors}
        for tensor in reference.tensors:
            info = model.tensors[tensor.name]
            assert info.type_id == tensor.tensor_type
            assert list(info.shape) == [int(d) for d in tensor.shape]
            assert info.nbytes == tensor.n_bytes
            assert info.offset == tensor.data_offset
            assert bytes(model.tensor_data(tensor.name)) == tensor.data.tobytes()


def test_fixture_files_match_gguf_py(fixtures):
    for path in sorted((fixtures / "tiny").glob("*.gguf")):
        reference = GGUFReader(str(path))
        with GGUFModel(path) as model:
            assert len(model.tensors) == len(reference.tensors)
            for tensor in reference.tensors:
                info = model.tensors[tensor.name]
                assert (info.type_id, info.nbytes, info.offset) == (
                    tensor.tensor_type,
                    tensor.n_bytes,
                    tensor.data_offset,
                )


def test_split_files_are_merged(tmp_path):
    write_small_gguf(tmp_path / "model.gguf", split_max_tensors=1)
    shards = sorted(tmp_path.glob("model-*-of-*.gguf"))
    assert len(shards) == 3
    assert split_paths(shards[1]) == shards
    with GGUFModel(shards[0]) as model:
        assert set(model.tensors) == {"a.weight", "b.weight", "c.weight"}
        assert len({info.file_index for info in model.tensors.values()}) == 3
        assert model.tensor_data("c.weight").nbytes == 68 * 2
    shards[2].unlink()
    with pytest.raises(FormatError, match="missing 1 shard"):
        GGUFModel(shards[0])


def corrupt(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("empty", "not a GGUF file"),
        ("magic", "not a GGUF file"),
        ("version", "version 7"),
        ("truncated_header", "truncated or corrupt"),
        ("truncated_data", "outside the file"),
        ("forged_tensor_count", "cannot fit"),
        ("forged_kv_count", "cannot fit"),
        ("forged_string_length", "bytes long"),
        ("forged_offset", "outside the file"),
        ("unknown_type", "unknown ggml tensor type"),
    ],
)
def test_broken_files_give_one_clear_error(small_gguf, breakage, message):
    raw = small_gguf.read_bytes()
    if breakage == "empty":
        small_gguf.write_bytes(b"")
    elif breakage == "magic":
        corrupt(small_gguf, 0, b"GGML")
    elif breakage == "version":
        corrupt(small_gguf, 4, struct.pack("<I", 7))
    elif breakage == "truncated_header":
        small_gguf.write_bytes(raw[:100])
    elif breakage == "truncated_data":
        small_gguf.write_bytes(raw[:-64])
    elif breakage == "forged_tensor_count":
        corrupt(small_gguf, 8, struct.pack("<Q", 2**60))
    elif breakage == "forged_kv_count":
        corrupt(small_gguf, 16, struct.pack("<Q", 2**62))
    elif breakage == "forged_string_length":
        corrupt(small_gguf, 24, struct.pack("<Q", 2**63))  # the first key's length
    elif breakage in ("forged_offset", "unknown_type"):
        # Tensor infos are the last thing in the header: find c.weight's by its name.
        name_at = raw.index(b"c.weight", raw.index(b"b.weight"))
        info_at = name_at + len(b"c.weight")  # n_dims(4) dims(2*8) type(4) offset(8)
        assert struct.unpack_from("<I", raw, info_at)[0] == 2
        if breakage == "forged_offset":
            corrupt(small_gguf, info_at + 4 + 16 + 4, struct.pack("<Q", 2**50))
        else:
            corrupt(small_gguf, info_at + 4 + 16, struct.pack("<I", 999))
    with pytest.raises(FormatError, match=message):
        GGUFModel(small_gguf)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        GGUFModel(tmp_path / "absent.gguf")
    with pytest.raises(FormatError):
        GGUFModel(tmp_path)


def test_released_tensor_pages_read_back_the_same_bytes(fixtures):
    # Packed weights no longer need the file's pages: dropping them must not change what a
    # later read of the tensor sees (the shared read-only map faults them back from the file).
    with GGUFModel(fixtures / "tiny" / "dense-Q4_K_M.gguf") as model:
        name = max(model.tensors, key=lambda n: model.tensors[n].nbytes)
        data = model.tensor_data(name)
        before = bytes(data)
        assert model.release_tensor_pages(data) == (data.nbytes >= 2 * mmap.PAGESIZE)
        assert bytes(data) == before
        assert not model.release_tensor_pages(np.zeros(8192, dtype=np.uint8))  # not in the map: untouched
