"""The Qwen 3.5 vision tower: image patches -> features of the text model's width.

Maths only, as transformers 5.23's `Qwen3_5VisionModel` computes it:
- patch embedding: the Conv3d (kernel = stride = [2, 16, 16], bias) is a linear map
  over each patch's 3 * 2 * 16 * 16 values;
- a learned position embedding on a square grid, bilinearly resized (align_corners)
  to each image's patch grid, added in the patches' merge-block order;
- pre-LayerNorm blocks (biased qkv and output projection, gelu-tanh MLP) with 2D
  axial RoPE (theta 1e4: the first quarter of each head's frequencies follows the
  patch row, the second the column, rotate-half over the whole head) and
  bidirectional attention within each image;
- merger: LayerNorm, the 2x2 patches of a merge block concatenated, Linear, exact
  GELU, Linear to the text width.

Patches arrive in merge-block order (the processor's patchify), so each run of
merge_size**2 consecutive patches is one output token.

Weights come by canonical name (`vision_weight_specs`); linear weights are
`QuantLinear` modules, everything else fp32 tensors. The format maps live in
formats/weights_mmproj.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.errors import FormatError, Qwen35Error
from qwen35.model.weight_specs import WeightSpec

ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}
MLP_SLAB_ROWS = 4096


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int  # the text model's hidden size
    num_position_embeddings: int  # a square grid of learned positions
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    in_channels: int = 3
    layer_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self):
        sizes = (self.hidden_size, self.num_layers, self.num_heads, self.intermediate_size, self.out_hidden_size,
                 self.num_position_embeddings, self.patch_size, self.temporal_patch_size, self.merge_size,
                 self.in_channels)
        checks = [
            (all(isinstance(v, int) and v > 0 for v in sizes), "sizes must be positive whole numbers"),
            (self.hidden_size % self.num_heads == 0 and (self.hidden_size // self.num_heads) % 4 == 0,
             "the head size must be a multiple of 4 (2D rotary embedding)"),
            (math.isqrt(self.num_position_embeddings) ** 2 == self.num_position_embeddings,
             "the position embedding must be a square grid"),
            (self.hidden_act in ACTIVATIONS, f"activation {self.hidden_act!r} is not supported"),
            (self.layer_norm_eps > 0 and self.rope_theta > 0, "eps and rope theta must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise FormatError(f"unsupported vision tower configuration: {message}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_values(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def grid_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)

    @property
    def merged_width(self) -> int:
        return self.hidden_size * self.merge_size * self.merge_size


def vision_weight_specs(c: VisionConfig) -> dict[str, WeightSpec]:
    d, merged = c.hidden_size, c.merged_width

    def norm(name):
        return {f"{name}.weight": WeightSpec((d,), "tensor"), f"{name}.bias": WeightSpec((d,), "tensor")}

    def linear(name, out, width):
        return {name: WeightSpec((out, width), "linear"), f"{name}.bias": WeightSpec((out,), "tensor")}

    specs = {
        "patch_embed": WeightSpec((d, c.patch_values), "tensor"),
        "patch_embed.bias": WeightSpec((d,), "tensor"),
        "pos_embed": WeightSpec((c.num_position_embeddings, d), "tensor"),
    }
    for i in range(c.num_layers):
        block = f"blocks.{i}"
        specs.update(norm(f"{block}.norm1"))
        specs.update(norm(f"{block}.norm2"))
        specs.update(linear(f"{block}.attn.qkv", 3 * d, d))
        specs.update(linear(f"{block}.attn.proj", d, d))
        specs.update(linear(f"{block}.mlp.fc1", c.intermediate_size, d))
        specs.update(linear(f"{block}.mlp.fc2", d, c.intermediate_size))
    specs.update(norm("merger.norm"))
    specs.update(linear("merger.fc1", merged, merged))
    specs.update(linear("merger.fc2", c.out_hidden_size, merged))
    return specs


def merge_block_order(grid: torch.Tensor, merge: int) -> torch.Tensor:
    """[h, w, ...] in raster order -> [h * w, ...] with each merge x merge block's patches adjacent."""
    h, w = grid.shape[:2]
    rest = grid.shape[2:]
    blocks = grid.reshape(h // merge, merge, w // merge, merge, *rest).transpose(1, 2)
    return blocks.reshape(h * w, *rest)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class VisionBlock:
    def __init__(self, c: VisionConfig, w: dict, prefix: str):
        self.c = c
        self.norm1 = (w[f"{prefix}.norm1.weight"], w[f"{prefix}.norm1.bias"])
        self.norm2 = (w[f"{prefix}.norm2.weight"], w[f"{prefix}.norm2.bias"])
        self.qkv, self.qkv_bias = w[f"{prefix}.attn.qkv"], w[f"{prefix}.attn.qkv.bias"]
        self.proj, self.proj_bias = w[f"{prefix}.attn.proj"], w[f"{prefix}.attn.proj.bias"]
        self.fc1, self.fc1_bias = w[f"{prefix}.mlp.fc1"], w[f"{prefix}.mlp.fc1.bias"]
        self.fc2, self.fc2_bias = w[f"{prefix}.mlp.fc2"], w[f"{prefix}.mlp.fc2.bias"]

    def _norm(self, x, weights):
        return F.layer_norm(x, (self.c.hidden_size,), *weights, eps=self.c.layer_norm_eps)

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        c = self.c
        q, k, v = (self.qkv(x) + self.qkv_bias).view(-1, 3, c.num_heads, c.head_dim).unbind(1)  # [N, heads, d]
        cos, sin = cos[:, None], sin[:, None]
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        outputs = []
        for q_i, k_i, v_i in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
            # Every patch sees every patch of its own image, none of another.
            out = F.scaled_dot_product_attention(q_i.transpose(0, 1), k_i.transpose(0, 1), v_i.transpose(0, 1))
            outputs.append(out.transpose(0, 1).reshape(-1, c.hidden_size))
        return self.proj(torch.cat(outputs)) + self.proj_bias

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        # In slabs of rows: a 4096 x 4096 image has 65536 patches, and the MLP's
        # intermediate for all of them at once would take over a gigabyte.
        out = torch.empty_like(x)
        for start in range(0, x.shape[0], MLP_SLAB_ROWS):
            piece = self._norm(x[start : start + MLP_SLAB_ROWS], self.norm2)
            hidden = F.gelu(self.fc1(piece) + self.fc1_bias, approximate=ACTIVATIONS[self.c.hidden_act])
            out[start : start + MLP_SLAB_ROWS] = self.fc2(hidden) + self.fc2_bias
        return out

    def __call__(self, x, cos, sin, lengths):
        x = x + self.attention(self._norm(x, self.norm1), cos, sin, lengths)
        return x + self.mlp(x)


class VisionTower(nn.Module):
    """Patches of one or more images -> one feature row per merge block, of the text width."""

    def __init__(self, config: VisionConfig, weights: dict):
        super().__init__()
        self.config = config
        c = config
        self.patch_embed, self.patch_bias = weights["patch_embed"], weights["patch_embed.bias"]
        self.pos_embed = weights["pos_embed"]
        self.blocks = [VisionBlock(c, weights, f"blocks.{i}") for i in range(c.num_layers)]
        self.merger_norm = (weights["merger.norm.weight"], weights["merger.norm.bias"])
        self.merger_fc1, self.merger_fc1_bias = weights["merger.fc1"], weights["merger.fc1.bias"]
        self.merger_fc2, self.merger_fc2_bias = weights["merger.fc2"], weights["merger.fc2.bias"]
        half = c.head_dim // 2
        self.inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half))
        # Registered so that set_mode and .to(device) reach the linear weights.
        self.weight_modules = nn.ModuleDict(
            {name.replace(".", "__"): w for name, w in weights.items() if isinstance(w, nn.Module)}
        )
        self._dense = [w for w in weights.values() if isinstance(w, torch.Tensor)]

    def dense_tensors(self) -> list[torch.Tensor]:
        return list(self._dense)

    def check_grid(self, grid_thw) -> tuple[int, int, int]:
        t, h, w = (int(v) for v in grid_thw)
        m = self.config.merge_size
        if t < 1 or h < m or w < m or h % m or w % m:
            raise Qwen35Error(f"an image grid must be whole merge blocks of {m}x{m} patches, got {[t, h, w]}")
        return t, h, w

    def position_embeddings(self, t: int, h: int, w: int) -> torch.Tensor:
        """The learned grid resized to h x w patches: [t * h * w, hidden], merge-block order."""
        side = self.config.grid_side
        table = self.pos_embed.view(side, side, -1).permute(2, 0, 1)[None]
        resized = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)[0].permute(1, 2, 0)
        return merge_block_order(resized, self.config.merge_size).repeat(t, 1)

    def rotary(self, t: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [t * h * w, head_dim] of each patch's (row, column)."""
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        rows, cols = (merge_block_order(a, self.config.merge_size).repeat(t) for a in (rows, cols))
        inv_freq = self.inv_freq.to(self.pos_embed.device)
        freqs = torch.cat([rows[:, None].to(inv_freq) * inv_freq, cols[:, None].to(inv_freq) * inv_freq], dim=-1)
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos(), angles.sin()

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """pixel_values [sum t*h*w, patch_values] -> features [sum t*h*w / merge**2, out_hidden_size]."""
        c = self.config
        grids = [self.check_grid(g) for g in grids]
        total = sum(t * h * w for t, h, w in grids)
        if pixel_values.dim() != 2 or pixel_values.shape != (total, c.patch_values):
            raise Qwen35Error(
                f"pixel values must be [{total}, {c.patch_values}] for grids {grids}, got {list(pixel_values.shape)}"
            )
        x = F.linear(pixel_values.to(self.patch_embed), self.patch_embed, self.patch_bias)
        x = x + torch.cat([self.position_embeddings(*g) for g in grids])
        rope = [self.rotary(*g) for g in grids]
        cos, sin = torch.cat([r[0] for r in rope]), torch.cat([r[1] for r in rope])
        # Frames of a video would attend only within themselves, as transformers does.
        lengths = [h * w for t, h, w in grids for _ in range(t)]
        for block in self.blocks:
            x = block(x, cos, sin, lengths)
        x = F.layer_norm(x, (c.hidden_size,), *self.merger_norm, eps=c.layer_norm_eps).reshape(-1, c.merged_width)
        x = F.gelu(self.merger_fc1(x) + self.merger_fc1_bias)
        return self.merger_fc2(x) + self.merger_fc2_bias
