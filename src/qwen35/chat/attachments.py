"""Images in chat messages: encoded once, carried in their message, expanded into the prompt.

An image joins a user message as a content part `{"type": "image", "image": ChatImage}`,
before the text, the order the chat template writes `<|vision_start|><|image_pad|><|vision_end|>`
in; so every later turn re-renders it in place, and dropping the turn drops the image. A
`ChatImage` keeps the vision tower's features, which run once per image, not once per turn.
`prepare_with_images` expands a rendered prompt's placeholders into those features (with
M-RoPE positions and the pixel-keyed cache key); the server's requests go through it too.

`image_paths_in(text)` finds image files named in a message, as `ollama run` does: a word
that is a path (starting `/`, `./`, `../` or `~`, quoted or with `\\ ` for spaces) to an
existing file ending in one of IMAGE_SUFFIXES. Bare names ("cat.png") stay text: a sentence
that mentions a file name is not an attachment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qwen35.errors import Qwen35Error

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
_PATH_STARTS = ("/", "./", "../", "~")
# A quoted stretch, or a word in which "\ " is an escaped space (what a terminal's drag and drop types).
_WORD = re.compile(r"'[^'\n]+'|\"[^\"\n]+\"|(?:\\ |\S)+")
_OPENING, _CLOSING = "([{<", ".,;:!?)]}>"


class NoVisionError(Qwen35Error):
    """Images for a model that cannot read them."""


@dataclass(frozen=True, eq=False)
class ChatImage:
    """One image as the text model takes it: the vision tower's output for it, computed once."""

    name: str  # how the person named it (a path as typed)
    features: torch.Tensor  # [tokens, hidden]: one row per <|image_pad|> of the expanded prompt
    grid_thw: tuple[int, int, int]  # in patches, before merging
    digest: int  # the pixels' fingerprint: equal images give equal cache keys

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])


def check_vision(model, how_to_fix: str = "load the model with its vision projector (mmproj)") -> None:
    if getattr(model, "vision", None) is None:
        raise NoVisionError(f"this model has no vision tower, so it cannot read images: {how_to_fix}")
    if model.image_token_id is None:
        raise NoVisionError("the model's vocabulary has no <|image_pad|> token, so it cannot read images")


def encode_image(model, source, name: str | None = None) -> ChatImage:
    """Decode, preprocess and run the vision tower on one image (bytes, a path, a PIL image or an array)."""
    from qwen35.chat.images import preprocess_image

    check_vision(model)
    processed = preprocess_image(source, model.image_settings)
    features, grids = model.encode_images([processed])
    return ChatImage(name if name is not None else str(source)[:80], features[0], tuple(grids[0]),
                     processed.digest())


def prepare_with_images(model, token_ids: list[int], images: list[ChatImage]):
    """The `multimodal.PreparedPrompt` of rendered `token_ids` whose placeholders stand for `images` in order."""
    from qwen35.model.multimodal import prepare_prompt

    return prepare_prompt(token_ids, [image.features for image in images], [image.grid_thw for image in images],
                          model.image_token_id, model.vision.config.merge_size,
                          image_digests=[image.digest for image in images])


def user_message(text: str, images: list[ChatImage]) -> dict:
    """A user message: plain text, or the images then the text as content parts."""
    if not images:
        return {"role": "user", "content": text}
    parts = [{"type": "image", "image": image} for image in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def message_images(messages: list[dict]) -> list[ChatImage]:
    """The images of `messages` in the order the chat template places their placeholders."""
    return [part["image"] for message in messages if isinstance(message.get("content"), list)
            for part in message["content"] if isinstance(part.get("image"), ChatImage)]


def image_paths_in(text: str) -> tuple[str, list[tuple[str, Path]]]:
    """`text` without the image paths it names, and those paths: (as typed, resolved), each once."""
    spans, found = [], {}
    for match in _WORD.finditer(text):
        word = match.group()
        start, end = match.span()
        if word[0] in "'\"" and word[-1] == word[0] and len(word) > 1:
            typed = word[1:-1]
        else:
            start += len(word) - len(word.lstrip(_OPENING))
            end -= len(word) - len(word.rstrip(_CLOSING))
            typed = text[start:end].replace("\\ ", " ")
        path = _image_file(typed)
        if path is not None:
            spans.append((start, end))
            found.setdefault(path, typed)
    return _cut(text, spans), [(typed, path) for path, typed in found.items()]


def _image_file(typed: str) -> Path | None:
    if not typed.startswith(_PATH_STARTS) or not typed.lower().endswith(IMAGE_SUFFIXES):
        return None
    path = Path(typed).expanduser()
    try:
        return path.resolve() if path.is_file() else None
    except OSError:  # a name too long, a loop of links: not a file we can read
        return None


def _cut(text: str, spans: list[tuple[int, int]]) -> str:
    """`text` without `spans`, the spaces around each cut closed up to one (none before punctuation)."""
    out, position = "", 0
    for start, end in spans:
        out = (out + text[position:start]).rstrip(" \t")
        while end < len(text) and text[end] in " \t":
            end += 1
        following = text[end:end + 1]
        if out and following and not out.endswith("\n") and following not in _CLOSING + "\n":
            out += " "
        position = end
    return (out + text[position:]).strip()
