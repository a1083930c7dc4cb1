"""Images in requests: OpenAI `image_url` parts (data: URLs) and Ollama `images` (base64), turned into
the prompt's image features (`model.multimodal.PreparedPrompt`) off the event loop.

The server does not fetch http(s) URLs: a model server that downloads whatever a request names can
be made to reach hosts its clients cannot; clients send the bytes inline instead.
"""

from __future__ import annotations

import asyncio
import base64
import binascii

from qwen35.server.errors import APIError

MAX_IMAGES = 16  # per request: each is a vision-tower pass and hundreds of prompt tokens


def decode_base64_image(text: str, where: str) -> bytes:
    try:
        data = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: the image is not valid base64.", param=where) from None
    if not data:
        raise APIError(400, f"{where}: the image is empty.", param=where)
    return data


def openai_image_bytes(url: str, where: str) -> bytes:
    """The bytes of an `image_url.url`: a data: URL (`data:image/png;base64,...`) or bare base64."""
    if url.startswith(("http://", "https://")):
        raise APIError(400, f"{where}: this server does not download images; send the image inline as a data: URL "
                            f"(data:image/png;base64,...).", param=where, code="image_url_not_supported")
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise APIError(400, f"{where}: a data: URL must be base64-encoded (data:image/png;base64,...).",
                           param=where)
        url = payload
    return decode_base64_image(url, where)


def openai_images(messages: list[dict]) -> list[bytes]:
    """The images of OpenAI-shaped messages in the order the chat template places their placeholders."""
    images = []
    for index, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part_index, part in enumerate(content):
            if part.get("type") == "image_url":
                where = f"messages.{index}.content.{part_index}.image_url"
                images.append(openai_image_bytes(part["image_url"]["url"], where))
    return images


def check_vision(state, count: int, param: str) -> None:
    if count and getattr(state.model, "vision", None) is None:
        raise APIError(400, "This model has no vision tower: start qwen35 serve with --mmproj FILE (the model's "
                            "vision projector GGUF), or serve an HF checkpoint that has one.",
                       param=param, code="images_unsupported")
    if count > MAX_IMAGES:
        raise APIError(400, f"At most {MAX_IMAGES} images per request, got {count}.", param=param)


def _prepare(model, token_ids: list[int], images: list[bytes]):
    from qwen35.chat.attachments import encode_image, prepare_with_images

    return prepare_with_images(model, token_ids, [encode_image(model, image, name="") for image in images])


async def attach_images(state, job) -> None:
    """Expand the job's image placeholders into its images' tokens and features (the vision tower runs
    in a worker thread), and check the longer prompt against the context."""
    from qwen35.server.prompting import check_context, turn_boundaries

    request = job.request
    prepared = await asyncio.to_thread(_prepare, state.model, request.prompt_ids, job.images)
    limit = state.context_length
    check_context(limit, len(prepared), job.max_tokens)
    request.prompt_ids = prepared.token_ids
    request.prepared = prepared
    # Without a max_tokens, up to the context (or the cap a route set, if lower).
    request.max_new_tokens = job.max_tokens if job.max_tokens is not None else \
        min(limit - len(prepared), request.max_new_tokens)
    request.snapshot_points = turn_boundaries(state.tokenizer, prepared.token_ids)
