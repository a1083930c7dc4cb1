"""Image preprocessing for the vision tower, equal to HF's Qwen2-VL image processor (fast backend).

The steps, as transformers 5.23's `Qwen2VLImageProcessorFast` runs them for Qwen 3.5:
1. decode, composite any transparency onto white, convert to RGB;
2. `smart_resize`: both sides to multiples of patch * merge (32), aspect kept, the
   pixel count brought within [min_pixels, max_pixels];
3. bicubic resize with antialiasing on the uint8 image (torch's own uint8 kernel, which
   is what torchvision calls on CPU), skipped when the size is already right;
4. rescale and normalise fused as (x - 255 mean) / (255 std) in float32;
5. patchify in merge-block order: rows of [C, temporal, patch, patch] values, the one
   frame repeated over the temporal patch.

Decoding is bounded: the header is read first and images with more than
`max_input_pixels` pixels are refused (large JPEGs are first decoded at a reduced
scale when that brings them under the limit), so no request can make us allocate
an unbounded buffer.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qwen35.errors import Qwen35Error

# Qwen3-VL / Qwen 3.5's released preprocessor_config.json.
DEFAULT_MIN_PIXELS = 65536  # 256 * 256
DEFAULT_MAX_PIXELS = 16777216  # 4096 * 4096
# Refuse to decode anything larger (8192 * 8192 pixels: 192 MiB as RGB).
DEFAULT_MAX_INPUT_PIXELS = 1 << 26
MAX_ASPECT_RATIO = 200  # the processor's own limit


class ImageError(Qwen35Error):
    """An image that cannot be used: not decodable, too large, or of a bad shape."""


@dataclass(frozen=True)
class ImageSettings:
    """How images are cut for one vision tower (from preprocessor_config.json or mmproj metadata)."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS

    def __post_init__(self):
        sizes = (self.patch_size, self.temporal_patch_size, self.merge_size, self.min_pixels, self.max_pixels)
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in sizes):
            raise ImageError(f"image settings need positive whole sizes, got {sizes}")
        if self.min_pixels > self.max_pixels:
            raise ImageError(f"min_pixels {self.min_pixels} is above max_pixels {self.max_pixels}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or not all(s > 0 for s in self.image_std):
            raise ImageError("image_mean and image_std need three values each (std positive)")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_values(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclass(frozen=True)
class ProcessedImage:
    """One image as the vision tower takes it."""

    pixel_values: torch.Tensor  # [h * w, 3 * temporal * patch * patch] float32, merge-block order
    grid_thw: tuple[int, int, int]  # (1, h, w) in patches
    merge_size: int

    def digest(self) -> int:
        """A 56-bit fingerprint of the pixels: equal images give equal prompt cache keys."""
        data = self.pixel_values.detach().cpu().contiguous().numpy().tobytes()
        return int.from_bytes(hashlib.blake2b(data, digest_size=7).digest(), "big")

    @property
    def num_tokens(self) -> int:
        """How many <|image_pad|> tokens the image takes in the prompt."""
        t, h, w = self.grid_thw
        return t * h * w // (self.merge_size * self.merge_size)


def settings_from_preprocessor_config(raw: dict, where: str = "preprocessor_config.json") -> ImageSettings:
    """ImageSettings from an HF preprocessor_config.json (its size.shortest_edge/longest_edge are pixel counts)."""
    if not isinstance(raw, dict):
        raise ImageError(f"{where}: not a JSON object")
    size = raw.get("size") or {}
    try:
        return ImageSettings(
            patch_size=int(raw.get("patch_size", 16)),
            temporal_patch_size=int(raw.get("temporal_patch_size", 2)),
            merge_size=int(raw.get("merge_size", 2)),
            min_pixels=int(raw.get("min_pixels") or size.get("shortest_edge", DEFAULT_MIN_PIXELS)),
            max_pixels=int(raw.get("max_pixels") or size.get("longest_edge", DEFAULT_MAX_PIXELS)),
            image_mean=tuple(float(v) for v in raw.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(float(v) for v in raw.get("image_std", (0.5, 0.5, 0.5))),
        )
    except (TypeError, ValueError, AttributeError) as error:
        raise ImageError(f"{where}: bad image processor settings ({error})") from None


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The processor's target size: multiples of `factor`, aspect kept, pixels within [min, max]."""
    if min(height, width) < 1:
        raise ImageError(f"the image is empty ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(f"the image is {width}x{height}: its aspect ratio is above {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def load_image(source, max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS):
    """A PIL RGB image from encoded bytes, a file path, a PIL image or an HWC uint8 array."""
    from PIL import Image

    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _from_array(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = _open(io.BytesIO(bytes(source)), "the image data")
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"no such image file: {path}")
        with path.open("rb") as file:
            image = _open(io.BytesIO(file.read()), str(path))
    else:
        raise ImageError(f"an image must be bytes, a path, a PIL image or a uint8 array, not {type(source).__name__}")
    return _to_rgb(_bounded(image, max_input_pixels))


def _open(stream, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(stream)  # reads the header only
    except Image.DecompressionBombError:
        raise ImageError(f"{what} declares an image far too large to decode") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageError(f"{what} is not an image in a format Pillow can read (PNG, JPEG, WebP, GIF, ...)") from None


def _from_array(array: np.ndarray):
    from PIL import Image

    if array.dtype != np.uint8:
        raise ImageError(f"an image array must be uint8 (height, width[, channels]), got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or 0 in array.shape:
        raise ImageError(f"an image array must be (height, width) or (height, width, 3 or 4), got {list(array.shape)}")
    return Image.fromarray(np.ascontiguousarray(array))


def _bounded(image, max_input_pixels: int):
    width, height = image.size
    if width * height > max_input_pixels and getattr(image, "format", None) == "JPEG":
        # JPEG can decode at 1/2, 1/4 or 1/8 scale: no full-size buffer is ever made. Draft
        # picks the strongest reduction that stays at least the requested size, so ask for
        # half the side that fits: the result is then at most that side.
        side_scale = 2 * math.sqrt(width * height / max_input_pixels)
        image.draft("RGB", (math.ceil(width / side_scale), math.ceil(height / side_scale)))
        width, height = image.size
    if width * height > max_input_pixels:
        raise ImageError(
            f"the image is {width}x{height} pixels, more than the {max_input_pixels} this server decodes"
        )
    if min(width, height) < 1:
        raise ImageError(f"the image is empty ({width}x{height})")
    return image


def _to_rgb(image):
    from PIL import Image

    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, image).convert("RGB")
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageError(f"the image could not be decoded ({error})") from None


def preprocess_image(source, settings: ImageSettings = ImageSettings()) -> ProcessedImage:
    """Decode (if needed), resize, normalise and patchify one image."""
    image = load_image(source, settings.max_input_pixels)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)[None]  # [1, 3, H, W]
    height, width = pixels.shape[-2:]
    target = smart_resize(height, width, settings.factor, settings.min_pixels, settings.max_pixels)
    if target != (height, width):
        pixels = F.interpolate(pixels, size=target, mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(settings.image_mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(settings.image_std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    normalized = (pixels.float() - mean) / std
    return ProcessedImage(_patchify(normalized[0], settings), (1, target[0] // settings.patch_size,
                                                               target[1] // settings.patch_size), settings.merge_size)


def _patchify(image: torch.Tensor, s: ImageSettings) -> torch.Tensor:
    """[3, H, W] -> [h * w, 3 * temporal * p * p], patches of one 2x2 merge block adjacent."""
    channels, height, width = image.shape
    p, m = s.patch_size, s.merge_size
    grid_h, grid_w = height // p, width // p
    patches = image.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
    patches = patches.permute(1, 4, 2, 5, 0, 3, 6)  # [bh, bw, mh, mw, C, p, p]
    patches = patches.unsqueeze(5).expand(-1, -1, -1, -1, -1, s.temporal_patch_size, -1, -1)
    return patches.reshape(grid_h * grid_w, s.patch_values).contiguous()
