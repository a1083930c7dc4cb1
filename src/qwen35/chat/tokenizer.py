"""The Qwen 3.5 tokenizer, from a GGUF's `tokenizer.ggml.*` metadata or an HF directory.

Both sources end up as a HuggingFace `tokenizers.Tokenizer` (byte-level BPE), so
encoding and decoding are the library's. A GGUF carries the vocabulary, the merges,
the token types and the name of llama.cpp's pre-tokenizer; we rebuild the same
pipeline llama.cpp runs: split on added tokens, split words with the pre-tokenizer
regex, map bytes to GPT-2's printable alphabet, merge by rank.

Token types follow llama.cpp: CONTROL tokens (`<|im_start|>`, `<|im_end|>`, ...) are
"special": matched in text only when `special=True`, skipped by
`decode(..., skip_special_tokens=True)`. USER_DEFINED tokens (`<think>`,
`<tool_call>`, ...) are always matched and always decoded, exactly as llama.cpp's
`tokenize(parse_special=False)` and transformers treat them. UNUSED tokens (the converter's
`[PAD...]` fillers up to the embedding's size) stand for no text, as llama.cpp's
`token_to_piece` gives them none.
"""

from __future__ import annotations

import codecs
import json
import operator
from functools import lru_cache
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from qwen35.errors import FormatError, Qwen35Error

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), keyed by `tokenizer.ggml.pre`.
# `qwen35` differs from `qwen2` only by keeping combining marks (\p{M}) with their letters;
# it is the same split as the `Split` pre-tokenizer in Qwen 3.5's tokenizer.json.
PRE_TOKENIZER_REGEXES = {
    "qwen35": (
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
        r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    "qwen2": (
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
        r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}

# GGUF token types (gguf.TokenType).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end a chat turn in every Qwen release (llama.cpp counts them end-of-generation too).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")

@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable character -> the byte it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = chr(256 + shifted)
            shifted += 1
    return {char: byte for byte, char in chars.items()}


class Tokenizer:
    """Encode, decode and chat-template rendering for one model.

    Build it with `load_tokenizer(path)`. `hf` is the underlying `tokenizers.Tokenizer`.
    """

    def __init__(
        self,
        hf: HFTokenizer,
        *,
        chat_template: str | dict[str, str] | None,
        eos_token_ids: list[int],
        template_tokens: dict[str, str] | None = None,
        vocab_size: int | None = None,
        source: str = "",
        unused_ids=(),
    ):
        if not isinstance(hf.decoder, decoders.ByteLevel):
            raise FormatError(f"{source or 'the tokenizer'} is not a byte-level BPE tokenizer as Qwen 3.5's is")
        self.hf = hf
        self.source = source
        self.vocab_size = vocab_size if vocab_size is not None else hf.get_vocab_size(with_added_tokens=True)
        self.eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        self.template_tokens = dict(template_tokens or {})
        self._added = hf.get_added_tokens_decoder()
        self._plain_hf: HFTokenizer | None = None
        self._token_bytes: dict[int, bytes] = {int(token_id): b"" for token_id in unused_ids}
        self._unused_ids = frozenset(int(token_id) for token_id in unused_ids)
        self._template = None
        self._template_source = chat_template
        # The markup the chat layer looks for (None where the vocabulary lacks it).
        self.im_start_id = self.token_to_id("<|im_start|>")
        self.im_end_id = self.token_to_id("<|im_end|>")
        self.end_of_text_id = self.token_to_id("<|endoftext|>")
        self.think_start_id = self.token_to_id("<think>")
        self.think_end_id = self.token_to_id("</think>")
        self.tool_call_start_id = self.token_to_id("<tool_call>")
        self.tool_call_end_id = self.token_to_id("</tool_call>")
        self.vision_start_id = self.token_to_id("<|vision_start|>")
        self.vision_end_id = self.token_to_id("<|vision_end|>")
        self.image_pad_id = self.token_to_id("<|image_pad|>")
        self.video_pad_id = self.token_to_id("<|video_pad|>")

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"

    # -- encoding and decoding --------------------------------------------------------

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text`. With `special=False`, control tokens written in the text
        (`<|im_start|>`, ...) are encoded as plain text, as llama.cpp does without
        `parse_special`; untrusted user text should be encoded that way."""
        if not isinstance(text, str):
            raise Qwen35Error(f"can only encode text, not {type(text).__name__}")
        hf = self.hf if special else self._plain()
        return hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD. Ids past the
        vocabulary (an embedding padded beyond it) and UNUSED tokens decode to nothing."""
        ids = _token_ids(ids)
        if self._unused_ids:
            ids = [token_id for token_id in ids if token_id not in self._unused_ids]
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a control token (skipped by skip_special_tokens)."""
        added = self._added.get(token_id)
        return bool(added is not None and added.special)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for (a token may hold part of a UTF-8 character)."""
        cached = self._token_bytes.get(token_id)
        if cached is not None:
            return cached
        added = self._added.get(token_id)
        piece = added.content if added is not None else self.hf.id_to_token(token_id)
        if piece is None:
            data = b""
        else:
            # The same rule as the ByteLevel decoder of `tokenizers`, added tokens included:
            # a piece written wholly in the byte alphabet stands for those bytes, else for its UTF-8.
            to_byte = _byte_level_decoder()
            if all(char in to_byte for char in piece):
                data = bytes(to_byte[char] for char in piece)
            else:
                data = piece.encode("utf-8")
        self._token_bytes[token_id] = data
        return data

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # -- chat -------------------------------------------------------------------------

    @property
    def chat_template(self):
        """The chat template in use (`qwen35.chat.template.ChatTemplate`), compiled on first use."""
        if self._template is None:
            from qwen35.chat.template import ChatTemplate, default_template_source

            source = self._template_source or default_template_source()
            self._template = ChatTemplate(source, special_tokens=self.template_tokens)
        return self._template

    def apply_chat_template(self, messages, tools=None, add_generation_prompt=True, **template_kwargs) -> str:
        """Render a conversation to the prompt text, as transformers' `apply_chat_template`
        with `tokenize=False` does. `template_kwargs` reach the template (`enable_thinking`, ...)."""
        return self.chat_template.render(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, **template_kwargs
        )

    # -- internals --------------------------------------------------------------------

    def _plain(self) -> HFTokenizer:
        if self._plain_hf is None:
            plain = HFTokenizer.from_str(self.hf.to_str())
            plain.encode_special_tokens = True
            self._plain_hf = plain
        return self._plain_hf



class StreamDecoder:
    """Turns token ids into text as they are generated, never splitting a UTF-8 character.

    A character split over several tokens is held back until it is complete; bytes that
    can never become valid UTF-8 come out as U+FFFD. Concatenating everything `feed`
    and `flush` return gives exactly `tokenizer.decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_ids) -> str:
        """Text completed by these ids (maybe empty)."""
        if isinstance(token_ids, (int, np.integer)):
            token_ids = [token_ids]
        pieces = []
        for token_id in _token_ids(token_ids):
            if self.skip_special_tokens and self.tokenizer.is_special(token_id):
                continue
            pieces.append(self._utf8.decode(self.tokenizer.token_bytes(token_id)))
        return "".join(pieces)

    def flush(self) -> str:
        """Whatever is held back at the end of generation (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def _token_ids(ids) -> list[int]:
    """Plain ints from any sequence of integer ids (numpy, torch), range-checked."""
    checked = []
    for token_id in ids:
        try:
            value = operator.index(token_id)
        except TypeError:
            raise Qwen35Error(f"token ids must be integers, not {type(token_id).__name__}") from None
        if not 0 <= value < 2**32:
            raise Qwen35Error(f"token id {value} is out of range")
        checked.append(value)
    return checked


# -- loading ---------------------------------------------------------------------------


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer of a .gguf file or of an HF directory (tokenizer.json)."""
    path = Path(path)
    if path.is_dir():
        return tokenizer_from_hf_dir(path)
    if path.is_file() and path.suffix == ".gguf":
        return tokenizer_from_gguf(path)
    if not path.exists():
        raise Qwen35Error(f"{path} does not exist")
    raise Qwen35Error(f"{path} is neither a .gguf file nor a directory with tokenizer.json")


def tokenizer_from_gguf(path) -> Tokenizer:
    from qwen35.formats.gguf import GGUFModel

    metadata = GGUFModel(path).metadata
    return tokenizer_from_gguf_metadata(metadata, source=str(path))


def tokenizer_from_gguf_metadata(metadata: dict, source: str = "GGUF") -> Tokenizer:
    model_kind = metadata.get("tokenizer.ggml.model")
    if model_kind is None:
        raise FormatError(f"{source} has no tokenizer (no tokenizer.ggml.model key)")
    if model_kind != "gpt2":
        raise FormatError(f"{source} has a {model_kind!r} tokenizer; Qwen 3.5 uses byte-level BPE ('gpt2')")
    pre = metadata.get("tokenizer.ggml.pre", "qwen35")
    if pre not in PRE_TOKENIZER_REGEXES:
        raise FormatError(
            f"{source} asks for pre-tokenizer {pre!r}; supported: {', '.join(sorted(PRE_TOKENIZER_REGEXES))}"
        )
    tokens = _string_list(metadata, "tokenizer.ggml.tokens", source)
    if not tokens:
        raise FormatError(f"{source} has an empty vocabulary")
    merges = _string_list(metadata, "tokenizer.ggml.merges", source)
    token_types = metadata.get("tokenizer.ggml.token_type")
    if token_types is None:
        token_types = np.full(len(tokens), TOKEN_NORMAL)
    token_types = np.asarray(token_types)
    if token_types.shape != (len(tokens),):
        raise FormatError(f"{source} has {token_types.size} token types for {len(tokens)} tokens")

    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)  # a repeated string keeps its first id, as llama.cpp's lookup does
    merge_pairs = []
    for merge in merges:
        pair = merge.split(" ")
        if len(pair) != 2:
            raise FormatError(f"{source} has a malformed merge {merge[:40]!r} (expected two tokens)")
        merge_pairs.append((pair[0], pair[1]))
    try:
        bpe = models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False)
    except Exception as error:  # tokenizers raises its own exception type for inconsistent merges
        raise FormatError(f"{source}: the merges do not fit the vocabulary ({error})") from None
    hf = HFTokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEXES[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    special_types = (TOKEN_CONTROL, TOKEN_UNKNOWN)
    added = [
        AddedToken(tokens[token_id], special=bool(token_types[token_id] in special_types), normalized=False)
        for token_id in np.nonzero(np.isin(token_types, (*special_types, TOKEN_USER_DEFINED)))[0]
    ]
    hf.add_tokens(added)

    def token_text(key: str) -> str | None:
        token_id = metadata.get(key)
        if isinstance(token_id, (int, np.integer)) and 0 <= token_id < len(tokens):
            return tokens[int(token_id)]
        return None

    eos_ids = [
        int(metadata[key])
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        if isinstance(metadata.get(key), (int, np.integer)) and 0 <= metadata[key] < len(tokens)
    ]
    eos_ids += [vocab[name] for name in END_OF_TURN_TOKENS if name in vocab]
    template_tokens = {
        name: text
        for name, text in (
            ("bos_token", token_text("tokenizer.ggml.bos_token_id")),
            ("eos_token", token_text("tokenizer.ggml.eos_token_id")),
            ("pad_token", token_text("tokenizer.ggml.padding_token_id")),
            ("unk_token", token_text("tokenizer.ggml.unknown_token_id")),
        )
        if text is not None
    }
    chat_template = metadata.get("tokenizer.chat_template")
    named = {
        key.removeprefix("tokenizer.chat_template."): value
        for key, value in metadata.items()
        if key.startswith("tokenizer.chat_template.") and isinstance(value, str)
    }
    if named:
        chat_template = {**named, **({"default": chat_template} if isinstance(chat_template, str) else {})}
    elif not isinstance(chat_template, str):
        chat_template = None
    for token_id in range(len(tokens)):
        if token_types[token_id] in special_types and hf.token_to_id(tokens[token_id]) != token_id:
            raise FormatError(f"{source}: control token {tokens[token_id]!r} is listed twice")
    return Tokenizer(
        hf,
        chat_template=chat_template,
        eos_token_ids=eos_ids,
        template_tokens=template_tokens,
        vocab_size=len(tokens),
        source=source,
        unused_ids=np.nonzero(token_types == TOKEN_UNUSED)[0].tolist(),
    )


def tokenizer_from_hf_dir(directory) -> Tokenizer:
    directory = Path(directory)
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise Qwen35Error(f"{directory} has no tokenizer.json")
    try:
        hf = HFTokenizer.from_file(str(tokenizer_file))
    except Exception as error:  # tokenizers reports malformed files with a plain Exception
        raise FormatError(f"{tokenizer_file} could not be read: {error}") from None
    config = _read_json(directory / "tokenizer_config.json")
    generation = _read_json(directory / "generation_config.json")

    template_tokens = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            template_tokens[name] = value

    eos_ids = []
    generation_eos = generation.get("eos_token_id")
    for token_id in generation_eos if isinstance(generation_eos, list) else [generation_eos]:
        if isinstance(token_id, int):
            eos_ids.append(token_id)
    for text in (template_tokens.get("eos_token"), *END_OF_TURN_TOKENS):
        token_id = hf.token_to_id(text) if text else None
        if token_id is not None:
            eos_ids.append(token_id)

    return Tokenizer(
        hf,
        chat_template=_hf_chat_template(directory, config),
        eos_token_ids=eos_ids,
        template_tokens=template_tokens,
        source=str(directory),
    )


def _hf_chat_template(directory: Path, config: dict):
    """The template transformers would pick: chat_template.jinja first, then tokenizer_config.json's."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {
            item["name"]: item["template"]
            for item in template
            if isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("template"), str)
        }
        return named or None
    if isinstance(template, str):
        return template
    processor_template = _read_json(directory / "chat_template.json").get("chat_template")
    return processor_template if isinstance(processor_template, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FormatError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path} should hold a JSON object")
    return data


def _string_list(metadata: dict, key: str, source: str) -> list[str]:
    value = metadata.get(key)
    if value is None:
        if key.endswith("merges"):
            return []
        raise FormatError(f"{source} has no {key}")
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise FormatError(f"{source}: {key} should be an array of strings")
    return list(value)
