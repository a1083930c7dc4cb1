"""Weights as a list of typed tensors, whether predicted from the catalog or read from a file.

Both sources end up here so that memory, offload and speed are computed one way:
`Weights` knows each tensor's part (text / MTP / vision), its block and whether it
is a routed-expert tensor, and its exact bytes.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from gguf import GGMLQuantizationType as T

from qwen35.plan.catalog import MTP, TEXT, VISION, ModelSpec, TensorSpec, mtp_tensors, text_tensors, vision_tensors
from qwen35.plan.mixes import F16, F32, Mix, assign_types, type_nbytes


@dataclass(frozen=True)
class WeightTensor:
    name: str
    shape: tuple[int, ...]
    type_name: str
    nbytes: int
    part: str
    layer: int | None

    @property
    def is_expert(self) -> bool:
        return "_exps." in self.name or ".experts." in self.name

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class Weights:
    def __init__(self, tensors: list[WeightTensor]):
        self.tensors = tensors

    def bytes(self, part: str) -> int:
        return sum(t.nbytes for t in self.tensors if t.part == part)

    def by_type(self, parts=(TEXT, MTP)) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for t in self.tensors:
            if t.part in parts:
                totals[t.type_name] += t.nbytes
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]))

    def layer_bytes(self, part: str = TEXT) -> dict[int, int]:
        totals: dict[int, int] = defaultdict(int)
        for t in self.tensors:
            if t.part == part and t.layer is not None:
                totals[t.layer] += t.nbytes
        return dict(totals)

    def expert_layer_bytes(self, part: str = TEXT) -> dict[int, int]:
        totals: dict[int, int] = defaultdict(int)
        for t in self.tensors:
            if t.part == part and t.layer is not None and t.is_expert:
                totals[t.layer] += t.nbytes
        return dict(totals)

    def params(self, expert_share: float = 1.0) -> dict[str, float]:
        """Parameters: `total` counts the text model and vision tower (as published), not the MTP
        layer; `active` the text model with routed experts at `expert_share` (top-k / E)."""
        counts = {TEXT: 0, MTP: 0, VISION: 0}
        active = 0.0
        for t in self.tensors:
            counts[t.part] += t.n_elements
            if t.part == TEXT:
                active += t.n_elements * (expert_share if t.is_expert else 1.0)
        return {"text": counts[TEXT], "mtp": counts[MTP], "vision": counts[VISION],
                "total": counts[TEXT] + counts[VISION], "active": active}

    def outside_layers(self, part: str = TEXT) -> dict[str, int]:
        return {t.name: t.nbytes for t in self.tensors if t.part == part and t.layer is None}


def predict_weights(spec: ModelSpec, mix: Mix, *, vision_type: T = F16, mtp_in_file: bool = True) -> Weights:
    """The tensors of a GGUF made from the HF checkpoint with llama.cpp's converter and quantizer.

    The MTP layer is in the file (as current converters write it) and counts in the
    quantizer's layer rules; the vision tower is a separate mmproj of `vision_type`.
    """
    file_tensors = text_tensors(spec) + (mtp_tensors(spec) if mtp_in_file else [])
    n_layer_all = spec.n_layers + (spec.mtp_layers if mtp_in_file else 0)
    types = assign_types(file_tensors, mix, n_layer_all=n_layer_all, n_gqa=spec.n_gqa, n_expert=spec.n_experts)
    out = [_typed(t, types[t.name]) for t in file_tensors]
    if not mtp_in_file:
        # Size the MTP layer as the same mix would have made it, for the breakdown.
        with_mtp = text_tensors(spec) + mtp_tensors(spec)
        types = assign_types(with_mtp, mix, n_layer_all=spec.n_layers + spec.mtp_layers,
                             n_gqa=spec.n_gqa, n_expert=spec.n_experts)
        out += [_typed(t, types[t.name]) for t in mtp_tensors(spec)]
    for t in vision_tensors(spec):
        out.append(_typed(t, vision_type if len(t.shape) >= 2 else F32))
    return Weights(out)


def _typed(tensor: TensorSpec, ggml_type: T) -> WeightTensor:
    return WeightTensor(tensor.name, tensor.shape, ggml_type.name, type_nbytes(ggml_type, tensor.shape),
                        tensor.part, tensor.layer)


__all__ = ["WeightTensor", "Weights", "predict_weights", "TEXT", "MTP", "VISION"]
