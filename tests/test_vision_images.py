"""Image preprocessing vs HF's Qwen image processor, and bad images refused with a clear error."""

import io
import json
import struct
import zlib

import numpy as np
import pytest

from qwen35.chat.images import (
    ImageError,
    ImageSettings,
    load_image,
    preprocess_image,
    settings_from_preprocessor_config,
    smart_resize,
)
from qwen35.errors import Qwen35Error

Image = pytest.importorskip("PIL.Image")


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but carries no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_fixture_png_equals_the_hf_processor_output(fixtures, name):
    reference = json.loads((fixtures / "ref" / f"{name}.vision.json").read_text())
    settings = settings_from_preprocessor_config(
        json.loads((fixtures / "tiny" / "dense-hf" / "preprocessor_config.json").read_text())
    )
    processed = preprocess_image(fixtures / "ref" / f"{name}.vision.image.png", settings)
    expected = np.load(fixtures / "ref" / f"{name}.vision.pixel_values.npy")
    assert [list(processed.grid_thw)] == reference["image_grid_thw"]
    assert processed.num_tokens == reference["n_image_tokens"]
    assert processed.pixel_values.shape == expected.shape
    assert np.abs(processed.pixel_values.numpy() - expected).max() <= 1e-6


def test_smart_resize_equals_transformers():
    transformers_resize = pytest.importorskip(
        "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"
    ).smart_resize
    sizes = [(96, 128), (1, 50), (33, 31), (1080, 1920), (4000, 3000), (9000, 100), (32, 32), (5000, 5000)]
    for height, width in sizes:
        for min_pixels, max_pixels in [(65536, 16777216), (1024, 200_000), (4096, 4096)]:
            assert smart_resize(height, width, 32, min_pixels, max_pixels) == transformers_resize(
                height, width, 32, min_pixels, max_pixels
            ), (height, width, min_pixels, max_pixels)


def test_downscale_and_alpha_match_the_hf_pil_processor():
    # The fixtures were made by the torchvision backend (uint8 resize, which we follow
    # exactly); the PIL backend differs from it by one 8-bit step, so that is the bound.
    module = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    settings = ImageSettings(min_pixels=4096, max_pixels=40_000)
    processor = module.Qwen2VLImageProcessorPil(
        patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"shortest_edge": settings.min_pixels, "longest_edge": settings.max_pixels},
    )
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:300, 0:500]
    smooth = np.stack([(xs * 0.5) % 256, (ys * 0.8) % 256, (xs + ys) % 256], axis=-1)
    rgba = np.concatenate([smooth, rng.integers(0, 256, (300, 500, 1))], axis=-1).astype(np.uint8)
    for array in (rgba[..., :3].copy(), rgba):
        image = Image.fromarray(array)
        expected = processor(image, return_tensors="np")
        ours = preprocess_image(_png_bytes(array), settings)
        assert [list(ours.grid_thw)] == expected["image_grid_thw"].tolist()
        assert ours.grid_thw[1] * ours.grid_thw[2] * 256 <= settings.max_pixels
        assert np.abs(ours.pixel_values.numpy() - expected["pixel_values"]).max() <= 2 / 255 + 1e-6


def test_accepted_sources_give_the_same_pixels(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    data = _png_bytes(array)
    path = tmp_path / "picture.png"
    path.write_bytes(data)
    settings = ImageSettings(min_pixels=1024, max_pixels=8192)
    results = [preprocess_image(source, settings) for source in (data, path, str(path), Image.fromarray(array), array)]
    for result in results[1:]:
        assert result.grid_thw == results[0].grid_thw
        assert np.array_equal(result.pixel_values.numpy(), results[0].pixel_values.numpy())


def test_bad_images_give_a_clear_error():
    bad_sources = [
        b"this is not an image",
        b"",
        _png_bytes(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))[:2000],  # truncated
        np.zeros((10, 10, 3), np.float32),
        np.zeros((10, 10, 2), np.uint8),
        12345,
        "/no/such/picture.png",
    ]
    for source in bad_sources:
        with pytest.raises(ImageError):
            preprocess_image(source)
    assert issubclass(ImageError, Qwen35Error)


def test_huge_images_are_refused_before_decoding():
    # Declared 50000 x 40000 (2 billion pixels, 6 GB as RGB): refused from the header.
    with pytest.raises(ImageError, match="too large|more than"):
        load_image(_png_header_only(50_000, 40_000))
    # Under Pillow's own bomb limit, but over ours.
    with pytest.raises(ImageError, match="more than"):
        load_image(_png_header_only(9_000, 8_000))
    with pytest.raises(ImageError, match="more than"):
        load_image(_png_bytes(np.zeros((64, 64, 3), np.uint8)), max_input_pixels=1000)


def test_extreme_aspect_ratio_is_refused():
    with pytest.raises(ImageError, match="aspect ratio"):
        preprocess_image(np.zeros((2, 500, 3), np.uint8))


def test_large_jpeg_is_decoded_at_a_reduced_scale():
    array = np.random.default_rng(4).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    image = load_image(buffer.getvalue(), max_input_pixels=40_000)
    assert image.size[0] * image.size[1] <= 40_000 and image.size[0] / image.size[1] == 400 / 300
    with pytest.raises(ImageError, match="more than"):
        load_image(_png_bytes(array), max_input_pixels=40_000)  # PNG has no reduced decode
