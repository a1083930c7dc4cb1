"""The tokenizer against llama.cpp's test vectors and the model's own tokenizer.json."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer

import qwen35
from qwen35.chat.tokenizer import tokenizer_from_gguf_metadata
from qwen35.errors import FormatError, Qwen35Error

CORPUS = [
    "",
    "Hello world",
    "  leading spaces and trailing   ",
    "Tabs\tand\r\nWindows\rline\nends\n\n\n",
    "Zürich, Köln, Ærø — naïve café; Äpfel ½ ⅞",
    "Cửa Việt, ñ, e\u0301 (combining acute), a\u0308\u0304",
    "нещо на Български, Ελληνικά, עברית, العربية",
    "我想在apple工作1314151天～ 日本語のテキスト、한국어 텍스트",
    "🚀 😶\u200d🌫️ ✅ 👨\u200d👩\u200d👧 🇫🇷",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    "<html><body class=\"x\">&amp;</body></html>",
    "numbers 3 33 333 3333 1,234.56 -7e10 0x1F",
    "I'm, you're, he'll, they'd, it's, we've, DON'T, I'M",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello",
    "<tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\n</function>\n</tool_call>",
    "text<|im_end|>glued<|endoftext|>to<|vision_start|><|image_pad|><|vision_end|>tokens",
    "<|im_start <|im_end| |im_end|> <think <thinks> </think",
    "\u00a0non-breaking\u2003em space\u3000ideographic",
    "\x00\x01 control \x7f bytes \ufeff bom",
]


@pytest.fixture(scope="module")
def tiny(fixtures):
    return {
        "gguf": qwen35.load_tokenizer(fixtures / "tiny" / "dense-Q8_0.gguf"),
        "hf_dir": qwen35.load_tokenizer(fixtures / "tiny" / "dense-hf"),
        "reference": HFTokenizer.from_file(str(fixtures / "tiny" / "dense-hf" / "tokenizer.json")),
    }


@pytest.fixture(scope="module")
def reference_plain(fixtures):
    """tokenizer.json with special tokens encoded as text (the library's own switch)."""
    reference = HFTokenizer.from_file(str(fixtures / "tiny" / "dense-hf" / "tokenizer.json"))
    reference.encode_special_tokens = True
    return reference


def test_llama_cpp_vectors(fixtures):
    vocab = fixtures / "tokenizer" / "ggml-vocab-qwen35.gguf"
    tokenizer = qwen35.load_tokenizer(vocab)
    texts = vocab.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    assert texts.pop() == ""
    expected = vocab.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")[: len(texts)]
    assert len(texts) == len(expected) >= 40
    for text, line in zip(texts, expected, strict=True):
        # llama.cpp's test-tokenizer-0 tokenizes with add_special=false, parse_special=false
        assert tokenizer.encode(text, special=False) == [int(x) for x in line.split()], repr(text)


def test_gguf_tokenizer_equals_tokenizer_json(tiny, reference_plain):
    for text in CORPUS:
        expected = tiny["reference"].encode(text, add_special_tokens=False).ids
        assert tiny["gguf"].encode(text) == expected, repr(text)
        assert tiny["hf_dir"].encode(text) == expected, repr(text)
        plain = reference_plain.encode(text, add_special_tokens=False).ids
        assert tiny["gguf"].encode(text, special=False) == plain, repr(text)
        assert tiny["hf_dir"].encode(text, special=False) == plain, repr(text)


def test_gguf_pre_tokenizer_splits_like_tokenizer_json(tiny):
    """The split itself, where a small vocabulary would hide a difference (combining marks)."""
    ours, reference = tiny["gguf"].hf.pre_tokenizer, tiny["reference"].pre_tokenizer
    for text in [*CORPUS, "!\u0301 x\u0308\u0304y \u0301\u0301 .\u0300\n", "कार्य करें"]:
        assert ours.pre_tokenize_str(text) == reference.pre_tokenize_str(text), repr(text)


def test_special_false_keeps_user_defined_tokens(tiny):
    """As in llama.cpp, only control tokens lose their meaning with special=False."""
    gguf = tiny["gguf"]
    ids = gguf.encode("<|im_start|><think></think><tool_call>", special=False)
    assert gguf.im_start_id not in ids
    assert ids[-3:] == [gguf.think_start_id, gguf.think_end_id, gguf.tool_call_start_id]


text_strategy = st.lists(
    st.one_of(
        st.characters(codec="utf-8", exclude_categories=("Cs",)),
        st.sampled_from(["<|im_start|>", "<|im_end|>", "<think>", "</tool_call>", " ", "\n", "'s", "é", "3"]),
    ),
    max_size=60,
).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=text_strategy)
def test_random_text_matches_reference_and_round_trips(tiny, text):
    expected = tiny["reference"].encode(text, add_special_tokens=False).ids
    assert tiny["gguf"].encode(text) == expected
    assert tiny["gguf"].decode(expected) == tiny["reference"].decode(expected, skip_special_tokens=False)
    assert tiny["gguf"].decode(tiny["gguf"].encode(text)) == text


def test_decode_matches_reference_on_random_ids(tiny):
    rng = random.Random(0)
    reference = tiny["reference"]
    size = tiny["gguf"].vocab_size  # the GGUF's [PAD...] rows too: the reference has no such tokens
    for _ in range(50):
        ids = [rng.randrange(size) for _ in range(rng.randrange(1, 40))]
        for skip in (False, True):
            expected = reference.decode(ids, skip_special_tokens=skip)
            assert tiny["gguf"].decode(ids, skip_special_tokens=skip) == expected
            assert tiny["hf_dir"].decode(ids, skip_special_tokens=skip) == expected


def test_stream_decoder_never_splits_a_character(tiny):
    tokenizer = tiny["gguf"]
    text = "Grüße 🦙🚀 日本語 e\u0301 <think>ok</think> ✅"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # the emoji and CJK come out as byte tokens
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.feed(token_id) for token_id in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_stream_decoder_equals_reference_decode(tiny):
    rng = random.Random(1)
    reference = tiny["reference"]
    size = tiny["gguf"].vocab_size
    for _ in range(50):
        ids = [rng.randrange(size) for _ in range(rng.randrange(1, 40))]
        for skip in (False, True):
            decoder = tiny["gguf"].stream_decoder(skip_special_tokens=skip)
            streamed = "".join(decoder.feed(token_id) for token_id in ids) + decoder.flush()
            assert streamed == reference.decode(ids, skip_special_tokens=skip)


def test_ids_and_end_of_turn(tiny, fixtures):
    reference = tiny["reference"]
    for tokenizer in (tiny["gguf"], tiny["hf_dir"]):
        assert tokenizer.think_start_id == reference.token_to_id("<think>")
        assert tokenizer.think_end_id == reference.token_to_id("</think>")
        assert tokenizer.tool_call_start_id == reference.token_to_id("<tool_call>")
        assert tokenizer.token_to_id("<|im_end|>") == reference.token_to_id("<|im_end|>")
        # generation_config.json's eos_token_id, and llama.cpp's end-of-generation <|endoftext|>
        assert 4098 in tokenizer.eos_token_ids and reference.token_to_id("<|endoftext|>") in tokenizer.eos_token_ids
    assert tiny["gguf"].vocab_size == 4160  # the GGUF pads the vocabulary to the embedding rows
    assert tiny["hf_dir"].vocab_size == reference.get_vocab_size(with_added_tokens=True)
    # The GGUF's [PAD...] fillers (type UNUSED) stand for no text, as in llama.cpp and tokenizer.json
    assert tiny["gguf"].id_to_token(4150) == "[PAD4150]" and tiny["gguf"].token_bytes(4150) == b""
    assert tiny["gguf"].decode([4150]) == tiny["hf_dir"].decode([4150]) == reference.decode([4150]) == ""


def test_bad_inputs(tiny, tmp_path):
    with pytest.raises(Qwen35Error, match="does not exist"):
        qwen35.load_tokenizer(tmp_path / "missing.gguf")
    with pytest.raises(Qwen35Error, match="no tokenizer.json"):
        qwen35.load_tokenizer(tmp_path)
    with pytest.raises(FormatError, match="no tokenizer"):
        tokenizer_from_gguf_metadata({"general.architecture": "qwen35"})
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    assert tokenizer_from_gguf_metadata(base).encode("abab") == [2, 2]
    with pytest.raises(FormatError, match="pre-tokenizer 'llama-bpe'"):
        tokenizer_from_gguf_metadata({**base, "tokenizer.ggml.pre": "llama-bpe"})
    with pytest.raises(FormatError, match="'llama' tokenizer"):
        tokenizer_from_gguf_metadata({**base, "tokenizer.ggml.model": "llama"})
    with pytest.raises(FormatError, match="malformed merge"):
        tokenizer_from_gguf_metadata({**base, "tokenizer.ggml.merges": ["ab"]})
    with pytest.raises(FormatError, match="token types"):
        tokenizer_from_gguf_metadata({**base, "tokenizer.ggml.token_type": [1]})
    with pytest.raises(FormatError, match="array of strings"):
        tokenizer_from_gguf_metadata({**base, "tokenizer.ggml.tokens": [1, 2]})
    with pytest.raises(Qwen35Error, match="can only encode text"):
        tiny["gguf"].encode(b"bytes")
    with pytest.raises(Qwen35Error, match="out of range"):
        tiny["gguf"].decode([-1])
    with pytest.raises(Qwen35Error, match="must be integers"):
        tiny["gguf"].stream_decoder().feed([1.5])
