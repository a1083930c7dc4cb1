"""Write a GGUF with random weights and the real shapes of a Qwen 3.5 size, for benchmarks.

    python benchmarks/make_model.py --size 0.8b --type Q4_K_M -o /work/bench-models/0.8b-Q4_K_M.gguf
    python benchmarks/make_model.py --size 35b-a3b --layers 8 --type Q8_0 -o ...

Speed does not depend on the weight values, only on the shapes and block types, so
a file with random blocks benchmarks like the released one. The shapes and names
come from the planner's catalog (qwen35.plan.catalog), the block type of each
tensor from its copy of llama.cpp's quantizer rules (qwen35.plan.mixes), and the
metadata keys are the ones llama.cpp's converter writes, so llama.cpp loads the
file too. Block bytes are random, except the fp16 scale fields, which get small
finite values calibrated with gguf-py's own dequantizers so that every weight
type ends up with the same spread (std ~0.02, mean ~0). The vocabulary is the
real Qwen one (from llama.cpp's test vocab), padded with unused tokens up to the
embedding's rows, as llama.cpp requires.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFWriter
from gguf.quants import dequantize as reference_dequantize

from qwen35.errors import Qwen35Error
from qwen35.formats.gguf import GGUFModel
from qwen35.plan.catalog import ModelSpec, TensorSpec, find_model, mtp_tensors, text_tensors
from qwen35.plan.mixes import FILE_TYPE_NAMES, MIXES, assign_types, find_mix

WEIGHT_STD = 0.02
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FIXTURES = Path(os.environ.get("QWEN35_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))
DEFAULT_VOCAB_FILE = DEFAULT_FIXTURES / "tokenizer" / "ggml-vocab-qwen35.gguf"

# Byte offsets of a block's fp16 scale `d` and (for the "minimum" types) its `dmin`/`m`,
# as laid out in ggml's block structs (gguf-py's quants.py splits blocks the same way).
SCALE_FIELDS: dict[T, tuple[int, int | None]] = {
    T.Q4_0: (0, None), T.Q4_1: (0, 2), T.Q5_0: (0, None), T.Q5_1: (0, 2), T.Q8_0: (0, None),
    T.Q2_K: (80, 82), T.Q3_K: (108, None), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208, None),
    T.IQ4_NL: (0, None), T.IQ4_XS: (0, None),
}

# Qwen's added tokens from <|endoftext|> on, in Qwen3's order (ids follow the regular vocabulary), with
# llama.cpp's token types: 3 control, 4 user-defined. Padding rows are 5 (unused).
SPECIAL_TOKENS = (
    ("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3), ("<|object_ref_start|>", 3),
    ("<|object_ref_end|>", 3), ("<|box_start|>", 3), ("<|box_end|>", 3), ("<|quad_start|>", 3),
    ("<|quad_end|>", 3), ("<|vision_start|>", 3), ("<|vision_end|>", 3), ("<|vision_pad|>", 3),
    ("<|image_pad|>", 3), ("<|video_pad|>", 3), ("<tool_call>", 4), ("</tool_call>", 4),
    ("<|fim_prefix|>", 4), ("<|fim_middle|>", 4), ("<|fim_suffix|>", 4), ("<|fim_pad|>", 4),
    ("<|repo_name|>", 4), ("<|file_sep|>", 4), ("<tool_response>", 4), ("</tool_response>", 4),
    ("<think>", 4), ("</think>", 4),
)
NORMAL, UNUSED = 1, 5


# ------------------------------------------------------------------ shapes


def benchmark_spec(size: str, layers: int | None = None, experts: int | None = None,
                   vocab: int | None = None, mtp: bool = True) -> ModelSpec:
    """A catalog size, optionally cut in depth, expert count or vocabulary (per-layer shapes unchanged)."""
    spec = find_model(size)
    changes: dict = {"vision": None}
    if layers is not None:
        if layers < 1:
            raise Qwen35Error(f"--layers must be at least 1, got {layers}")
        changes["n_layers"] = layers
    if experts is not None:
        if not spec.is_moe:
            raise Qwen35Error(f"--experts applies to MoE sizes only, and {spec.name} is dense")
        if experts < 2:
            raise Qwen35Error(f"--experts must be at least 2, got {experts}")
        changes.update(n_experts=experts, n_experts_used=min(spec.n_experts_used, experts))
    if vocab is not None:
        if vocab < 512 + len(SPECIAL_TOKENS):
            raise Qwen35Error(f"--vocab must be at least {512 + len(SPECIAL_TOKENS)}, got {vocab}")
        changes["vocab"] = vocab
    if not mtp:
        changes["mtp_layers"] = 0
    return dataclasses.replace(spec, **changes)


def model_tensors(spec: ModelSpec) -> list[TensorSpec]:
    return text_tensors(spec) + (mtp_tensors(spec) if spec.mtp_layers else [])


def tensor_types(spec: ModelSpec, mix_name: str) -> dict[str, T]:
    """The block type of every tensor, as llama-quantize would choose it for this mix."""
    return assign_types(model_tensors(spec), find_mix(mix_name), n_layer_all=spec.n_layers + spec.mtp_layers,
                        n_gqa=spec.n_gqa, n_expert=spec.n_experts)


# ------------------------------------------------------------------ values


def _set_scales(blocks: np.ndarray, ggml_type: T, d: np.ndarray, dmin: np.ndarray | None) -> None:
    d_offset, dmin_offset = SCALE_FIELDS[ggml_type]
    blocks[:, d_offset:d_offset + 2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    if dmin_offset is not None and dmin is not None:
        blocks[:, dmin_offset:dmin_offset + 2] = dmin.astype(np.float16).view(np.uint8).reshape(-1, 2)


_calibration: dict[T, tuple[float, float]] = {}


def scale_calibration(ggml_type: T) -> tuple[float, float]:
    """(d, dmin/d) that give random blocks of this type weights with std WEIGHT_STD and mean ~0.

    Measured, not derived: random blocks are dequantized by gguf-py with the scale
    fields set to 1 (and the minimum to 0, then the other way round).
    """
    if ggml_type not in _calibration:
        block_elems, block_bytes = GGML_QUANT_SIZES[ggml_type]
        rng = np.random.default_rng(1234)
        blocks = np.frombuffer(rng.bytes(4096 * block_bytes), dtype=np.uint8).reshape(4096, block_bytes).copy()
        ones, zeros = np.ones(4096, np.float32), np.zeros(4096, np.float32)
        _set_scales(blocks, ggml_type, ones, zeros)
        from_d = reference_dequantize(blocks, ggml_type)
        ratio = 0.0
        if SCALE_FIELDS[ggml_type][1] is not None:
            _set_scales(blocks, ggml_type, zeros, ones)
            from_min = reference_dequantize(blocks, ggml_type)
            ratio = -float(from_d.mean()) / float(from_min.mean())
            _set_scales(blocks, ggml_type, ones, np.full(4096, ratio, np.float32))
            from_d = reference_dequantize(blocks, ggml_type)
        _calibration[ggml_type] = (WEIGHT_STD / float(from_d.std()), ratio)
    return _calibration[ggml_type]


def random_blocks(ggml_type: T, n_elements: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n_blocks, block_bytes]: random quants, per-block scales in [0.5, 1.5] x the calibrated one."""
    if ggml_type not in SCALE_FIELDS:
        raise Qwen35Error(f"block type {ggml_type.name} is not supported by make_model")
    block_elems, block_bytes = GGML_QUANT_SIZES[ggml_type]
    n_blocks = n_elements // block_elems
    blocks = np.frombuffer(rng.bytes(n_blocks * block_bytes), dtype=np.uint8).reshape(n_blocks, block_bytes).copy()
    d_unit, min_ratio = scale_calibration(ggml_type)
    d = (rng.random(n_blocks, dtype=np.float32) + 0.5) * d_unit
    _set_scales(blocks, ggml_type, d, d * min_ratio)
    return blocks


def float_values(tensor: TensorSpec, rng: np.random.Generator) -> np.ndarray:
    """Values for the tensors that stay in floats, each in a range the network is built for."""
    n, name = tensor.n_elements, tensor.name
    if name.endswith("norm.weight"):
        return rng.uniform(0.9, 1.1, n).astype(np.float32)  # the converter stores RMSNorm gains near 1
    if name.endswith("ssm_a"):
        return -rng.uniform(1.0, 16.0, n).astype(np.float32)  # A = -exp(A_log), A_log ~ log U(1, 16)
    if name.endswith("ssm_dt.bias"):
        return rng.uniform(-1.0, 1.0, n).astype(np.float32)
    if "ssm_conv1d" in name:
        return (rng.standard_normal(n, dtype=np.float32) * 0.2).astype(np.float32)
    return rng.standard_normal(n, dtype=np.float32) * WEIGHT_STD


def tensor_payload(tensor: TensorSpec, ggml_type: T, rng: np.random.Generator) -> np.ndarray:
    """The bytes of one tensor, in the numpy shape gguf's writer expects (torch order)."""
    torch_shape = tuple(reversed(tensor.shape))
    if ggml_type == T.F32:
        return float_values(tensor, rng).reshape(torch_shape)
    if ggml_type == T.F16:
        return float_values(tensor, rng).astype(np.float16).reshape(torch_shape)
    if ggml_type == T.BF16:
        bits = float_values(tensor, rng).view(np.uint32) >> 16
        return bits.astype(np.uint16).view(np.uint8).reshape(*torch_shape[:-1], -1)
    blocks = random_blocks(ggml_type, tensor.n_elements, rng)
    return blocks.reshape(*torch_shape[:-1], -1)


# ------------------------------------------------------------------ vocabulary


@functools.lru_cache(maxsize=2)
def _read_vocabulary(path: str) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    source = GGUFModel(path)
    try:
        metadata = source.metadata
        return (tuple(metadata["tokenizer.ggml.tokens"]), tuple(int(t) for t in metadata["tokenizer.ggml.token_type"]),
                tuple(metadata["tokenizer.ggml.merges"]))
    finally:
        source.close()


def vocabulary(vocab_file: Path, n_rows: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): the real Qwen BPE vocabulary, cut or padded to `n_rows`."""
    if not vocab_file.is_file():
        raise Qwen35Error(f"vocabulary file not found: {vocab_file} (pass --vocab-file)")
    tokens, types, merges = (list(part) for part in _read_vocabulary(str(vocab_file.resolve())))
    n_regular = sum(1 for t in types if t == NORMAL)
    keep = min(n_regular, n_rows - len(SPECIAL_TOKENS))
    regular = tokens[:keep]
    if keep < n_regular:
        kept = set(regular)
        merges = [m for m in merges if all(part in kept for part in m.split(" ")) and m.replace(" ", "") in kept]
    tokens = regular + [text for text, _ in SPECIAL_TOKENS]
    types = [NORMAL] * keep + [kind for _, kind in SPECIAL_TOKENS]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n_rows)]
    types += [UNUSED] * (n_rows - len(types))
    return tokens, types, merges


def _mrope_sections(rotary_pairs: int) -> list[int]:
    # Qwen's split of the rotating pairs over (time, height, width): even, remainder first.
    base, extra = divmod(rotary_pairs, 3)
    return [base + (1 if i < extra else 0) for i in range(3)] + [0]


# ------------------------------------------------------------------ writing


def _write_metadata(writer: GGUFWriter, spec: ModelSpec, mix_name: str, arch: str, vocab_file: Path) -> None:
    block_count = spec.n_layers + spec.mtp_layers
    rotary_dim = spec.head_dim // 4
    writer.add_string("general.type", "model")
    writer.add_string("general.name", f"Qwen3.5-{spec.name.upper()} random ({spec.n_layers} layers)")
    writer.add_string("general.size_label", spec.name.upper())
    key = arch + "."
    writer.add_uint32(key + "block_count", block_count)
    writer.add_uint32(key + "context_length", spec.native_context)
    writer.add_uint32(key + "embedding_length", spec.hidden)
    if not spec.is_moe:
        writer.add_uint32(key + "feed_forward_length", spec.ffn)
    writer.add_uint32(key + "attention.head_count", spec.n_head)
    writer.add_uint32(key + "attention.head_count_kv", spec.n_head_kv)
    writer.add_array(key + "rope.dimension_sections", _mrope_sections(rotary_dim // 2))
    writer.add_float32(key + "rope.freq_base", 10000000.0)
    writer.add_float32(key + "attention.layer_norm_rms_epsilon", 1e-6)
    if spec.is_moe:
        writer.add_uint32(key + "expert_count", spec.n_experts)
        writer.add_uint32(key + "expert_used_count", spec.n_experts_used)
    writer.add_uint32(key + "attention.key_length", spec.head_dim)
    writer.add_uint32(key + "attention.value_length", spec.head_dim)
    if spec.is_moe:
        writer.add_uint32(key + "expert_feed_forward_length", spec.expert_ffn)
        writer.add_uint32(key + "expert_shared_feed_forward_length", spec.shared_ffn)
    writer.add_uint32(key + "nextn_predict_layers", spec.mtp_layers)
    writer.add_uint32(key + "ssm.conv_kernel", spec.conv_kernel)
    writer.add_uint32(key + "ssm.state_size", spec.linear_k_dim)
    writer.add_uint32(key + "ssm.group_count", spec.linear_k_heads)
    writer.add_uint32(key + "ssm.time_step_rank", spec.linear_v_heads)
    writer.add_uint32(key + "ssm.inner_size", spec.linear_v_heads * spec.linear_v_dim)
    writer.add_array(key + "attention.recurrent_layers", [not spec.is_full_attention(i) for i in range(block_count)])
    writer.add_uint32(key + "full_attention_interval", spec.full_attention_interval)
    writer.add_uint32(key + "rope.dimension_count", rotary_dim)

    tokens, types, merges = vocabulary(vocab_file, spec.vocab)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", "qwen35")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", types)
    writer.add_array("tokenizer.ggml.merges", merges)
    writer.add_uint32("tokenizer.ggml.eos_token_id", tokens.index("<|im_end|>"))
    writer.add_uint32("tokenizer.ggml.padding_token_id", tokens.index("<|endoftext|>"))
    writer.add_bool("tokenizer.ggml.add_bos_token", False)
    template = vocab_file.parent / "Qwen3.5-4B.jinja"
    if template.is_file():
        writer.add_string("tokenizer.chat_template", template.read_text())
    writer.add_uint32("general.quantization_version", 2)
    file_types = {name: number for number, name in FILE_TYPE_NAMES.items()}
    writer.add_uint32("general.file_type", file_types[find_mix(mix_name).name])


def write_model(path, spec: ModelSpec, mix_name: str, *, vocab_file: Path = DEFAULT_VOCAB_FILE,
                seed: int = 0, progress=None, fill: bool = True) -> int:
    """Write the GGUF; returns its size in bytes. `progress(done_bytes, total_bytes)` is called per tensor.

    With `fill=False` the tensor data is left unwritten (a sparse file that reads as zeros), for
    callers that put random blocks in after loading, much faster (benchmarks/gpu_bench.py)."""
    path = Path(path)
    tensors = model_tensors(spec)
    types = tensor_types(spec, mix_name)
    unsupported = sorted({t.name for t in types.values() if t not in (T.F32, T.F16, T.BF16, *SCALE_FIELDS)})
    if unsupported:
        raise Qwen35Error(f"mix {mix_name} uses block types make_model cannot fill: {', '.join(unsupported)}")
    arch = "qwen35moe" if spec.is_moe else "qwen35"
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(path, arch)
    _write_metadata(writer, spec, mix_name, arch, Path(vocab_file))
    nbytes = {}
    for tensor in tensors:
        ggml_type = types[tensor.name]
        block_elems, block_bytes = GGML_QUANT_SIZES[ggml_type]
        if tensor.shape[0] % block_elems:
            raise Qwen35Error(f"{tensor.name}: row width {tensor.shape[0]} is not a multiple of {ggml_type.name} blocks")
        nbytes[tensor.name] = tensor.n_elements // block_elems * block_bytes
        torch_shape = list(reversed(tensor.shape))
        if ggml_type in (T.F32, T.F16):
            writer.add_tensor_info(tensor.name, torch_shape, np.dtype(np.float32 if ggml_type == T.F32 else np.float16),
                                   nbytes[tensor.name])
        else:
            byte_shape = torch_shape[:-1] + [tensor.shape[0] // block_elems * block_bytes]
            writer.add_tensor_info(tensor.name, byte_shape, np.dtype(np.uint8), nbytes[tensor.name], raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    if not fill:
        out = writer.fout[0]
        start = GGUFWriter.ggml_pad(out.tell(), writer.data_alignment)
        out.truncate(start + sum(GGUFWriter.ggml_pad(n, writer.data_alignment) for n in nbytes.values()))
        writer.close()
        return path.stat().st_size
    rng = np.random.default_rng(seed)
    total, done = sum(nbytes.values()), 0
    for tensor in tensors:
        writer.write_tensor_data(tensor_payload(tensor, types[tensor.name], rng))
        done += nbytes[tensor.name]
        if progress is not None:
            progress(done, total)
    writer.close()
    return path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--size", required=True, help="family size: 0.8b, 2b, 4b, 9b, 27b, 35b-a3b, ...")
    parser.add_argument("--type", default="Q4_K_M", help=f"quant mix ({', '.join(MIXES)}); default Q4_K_M")
    parser.add_argument("--layers", type=int, help="cut the model to this many layers (default: all)")
    parser.add_argument("--experts", type=int, help="MoE only: this many routed experts (default: all)")
    parser.add_argument("--vocab", type=int, help="embedding rows (default 248320, the real size)")
    parser.add_argument("--no-mtp", action="store_true", help="leave out the MTP layer the converter writes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-file", type=Path, default=DEFAULT_VOCAB_FILE,
                        help="a GGUF holding the Qwen vocabulary (default: the fixtures' ggml-vocab-qwen35.gguf)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        spec = benchmark_spec(args.size, args.layers, args.experts, args.vocab, mtp=not args.no_mtp)
        started = time.perf_counter()

        def progress(done, total):
            print(f"\rwriting {args.output.name}: {done / 2**20:,.0f} / {total / 2**20:,.0f} MiB",
                  end="", file=sys.stderr, flush=True)

        size = write_model(args.output, spec, args.type, vocab_file=args.vocab_file, seed=args.seed, progress=progress)
    except Qwen35Error as error:
        print(f"make_model: error: {error}", file=sys.stderr)
        return 1
    print(f"\n{args.output}: {size / 2**30:.2f} GiB, {spec.n_layers} layers, {args.type}, "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
