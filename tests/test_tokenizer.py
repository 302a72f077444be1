"""Tests for mani_jax.tokenizer: exact round trips (byte fallback), fixed special ids, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mani_jax import tokenizer as tk
from mani_jax.tokenizer import (
    BOS_ID,
    CHAT_TOKENS,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    Tokenizer,
    sentence_iterator,
    train_tokenizer,
)

# A few KB of plain English (ASCII only), so that everything else must go through byte fallback.
_PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox runs away.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness. We had everything before us, we had nothing before us.",
    "In the morning the farmer walks to the market with three baskets of apples and two of pears. "
    "He sells them for 12 shillings and 6 pence, then walks home again before the evening rain.",
    "A language model predicts the next token from the tokens before it. Training minimises the "
    "cross entropy between the predicted distribution and the observed next token.",
    "She said: \"Come in, sit down, and tell me what happened!\" He answered that the train was late, "
    "the station was cold, and nobody knew when the next one would arrive.",
]
ENGLISH = "\n".join(
    f"{p} ({i})" if i % 3 else p for i in range(12) for p in _PARAGRAPHS
)  # ~6 KB

VOCAB = 420

ROUND_TRIP = [
    "नमस्ते दुनिया, आप कैसे हैं? १२३",
    "👩‍💻🇮🇳",
    "mixed: English, हिन्दी, русский, 中文, العربية, Ελληνικά 😀 and ❤️‍🔥",
    "   leading spaces",
    "trailing spaces   ",
    "multiple     inner      spaces",
    " ",
    "\t\ttabs\tand\t\t",
    "line one\nline two\n\n\nafter blank lines\n",
    "\r\nwindows\r\nnewlines\r\n",
    "",
    "12345 67890 3.14159",
    "<|user|>Hello<|end|><|assistant|>Hi!<|end|>",
    "<s> and </s> and <pad> and <unk> are literal text here",
    "nul\x00byte and \ufffd replacement and \u200b zero width",
    "\U0010ffff last code point",
    "The quick brown fox jumps over the lazy dog.",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    d = tmp_path_factory.mktemp("tok")
    return train_tokenizer([ENGLISH], VOCAB, d / "en")


def test_special_ids_fixed(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (UNK_ID, BOS_ID, EOS_ID, PAD_ID) == (0, 1, 2, 3)
    assert SPECIAL_TOKENS[:4] == ("<unk>", "<s>", "</s>", "<pad>")
    assert SPECIAL_TOKENS[4:] == CHAT_TOKENS == ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
    assert tok.special_ids == {p: i for i, p in enumerate(SPECIAL_TOKENS)}
    for i, p in enumerate(SPECIAL_TOKENS):
        assert tok.id_to_piece(i) == p
        assert tok.piece_to_id(p) == i
    assert tok.vocab_size == len(tok) == VOCAB


def test_pieces_types_for_gguf(tok):
    pieces = tok.pieces()
    assert len(pieces) == tok.vocab_size
    types = [t for _, _, t in pieces]
    assert types[0] == tk.TOKEN_TYPE_UNKNOWN
    assert types[1:4] == [tk.TOKEN_TYPE_CONTROL] * 3
    assert types[4:8] == [tk.TOKEN_TYPE_USER_DEFINED] * 4
    assert types[8:264] == [tk.TOKEN_TYPE_BYTE] * 256
    assert [p for p, _, _ in pieces[8:264]] == [f"<0x{b:02X}>" for b in range(256)]
    assert set(types[264:]) == {tk.TOKEN_TYPE_NORMAL}
    assert all(isinstance(s, float) for _, s, _ in pieces)
    assert [tok.token_type(i) for i in range(tok.vocab_size)] == types
    # numbering is llama.cpp's llama_token_type
    assert (tk.TOKEN_TYPE_NORMAL, tk.TOKEN_TYPE_UNKNOWN, tk.TOKEN_TYPE_CONTROL, tk.TOKEN_TYPE_USER_DEFINED,
            tk.TOKEN_TYPE_UNUSED, tk.TOKEN_TYPE_BYTE) == (1, 2, 3, 4, 5, 6)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_exact(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert UNK_ID not in ids  # byte fallback: nothing is unknown
    assert tok.decode(ids) == text


def test_byte_fallback_used_for_unseen_scripts(tok):
    ids = tok.encode("नमस्ते 👩‍💻")
    assert any(8 <= i < 264 for i in ids)
    assert tok.encode("") == []
    # merges are learned for English
    assert len(tok.encode(" the")) == 1


def test_chat_tokens_are_single_ids_and_controls_decode_empty(tok):
    for i, piece in enumerate(CHAT_TOKENS, start=4):
        assert tok.encode(piece) == [i]
    assert tok.decode([BOS_ID, EOS_ID, PAD_ID]) == ""
    ids = tok.encode("hello", add_bos=True, add_eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID and ids[1:-1] == tok.encode("hello")
    assert tok.decode(ids) == "hello"


def test_batched_encode_decode_equal_per_item(tok):
    batch = ROUND_TRIP
    ids = tok.encode(batch)
    assert ids == [tok.encode(t) for t in batch]
    assert tok.encode(tuple(batch), add_bos=True) == [tok.encode(t, add_bos=True) for t in batch]
    assert tok.decode(ids) == batch
    assert tok.encode([]) == []
    # numpy inputs
    one = np.asarray(tok.encode("the fox"), dtype=np.int32)
    assert tok.decode(one) == "the fox"
    two = np.asarray([tok.encode("ab"), tok.encode("cd")])
    assert tok.decode(two) == ["ab", "cd"]


def test_model_files_and_sha(tok, tmp_path):
    assert tok.model_path.name == "en.model" and tok.model_path.is_file()
    vocab = tok.model_path.with_suffix(".vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == tok.vocab_size and vocab[1].split("\t")[0] == "<s>"
    assert sorted(os.listdir(tok.model_path.parent)) == ["en.model", "en.vocab"]  # no temp files
    import hashlib

    assert tok.sha256 == hashlib.sha256(tok.model_path.read_bytes()).hexdigest()
    again = Tokenizer.load(tok.model_path)
    assert again.sha256 == tok.sha256 and again.encode(ROUND_TRIP) == tok.encode(ROUND_TRIP)
    assert Tokenizer.from_bytes(tok.model_path.read_bytes()).sha256 == tok.sha256


def test_training_is_deterministic(tok, tmp_path):
    a = train_tokenizer([ENGLISH], VOCAB, tmp_path / "a")
    b = train_tokenizer([ENGLISH], VOCAB, tmp_path / "sub" / "b", num_threads=2)
    assert a.sha256 == b.sha256 == tok.sha256
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "sub" / "b.model").read_bytes()
    # subsampling (max_sentences below the line count) depends on the seed, deterministically
    n_lines = sum(1 for _ in sentence_iterator([ENGLISH]))
    c1 = train_tokenizer([ENGLISH], VOCAB, tmp_path / "c1", max_sentences=n_lines // 3, seed=1)
    c2 = train_tokenizer([ENGLISH], VOCAB, tmp_path / "c2", max_sentences=n_lines // 3, seed=1)
    assert c1.sha256 == c2.sha256


def test_sentence_iterator_lines_and_long_lines():
    assert list(sentence_iterator(["a\n\nb c\n", "", "\nd"])) == ["a", "b c", "d"]
    long_line = " ".join(["word"] * 5000)  # 24999 bytes > the trainer's 8192-byte limit
    chunks = list(sentence_iterator([long_line]))
    assert len(chunks) > 1 and "".join(chunks) == long_line
    assert all(len(c.encode()) <= 8192 for c in chunks)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        list(sentence_iterator(["ok", b"bytes"]))


def test_train_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([ENGLISH], 100, tmp_path / "x")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([ENGLISH], tk.MIN_VOCAB_SIZE, tmp_path / "x")  # no room for the characters
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([ENGLISH], 100_000, tmp_path / "x")  # more pieces than the corpus has
    for empty in ([], [""], ["\n\n", ""]):
        with pytest.raises(ValueError, match="texts"):
            train_tokenizer(empty, VOCAB, tmp_path / "x")
    with pytest.raises(TypeError, match="texts"):
        train_tokenizer(ENGLISH, VOCAB, tmp_path / "x")
    with pytest.raises(TypeError, match="vocab_size"):
        train_tokenizer([ENGLISH], 420.0, tmp_path / "x")
    with pytest.raises(ValueError, match="max_sentences"):
        train_tokenizer([ENGLISH], VOCAB, tmp_path / "x", max_sentences=0)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        Tokenizer.load(bad)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        Tokenizer.load(empty)
    with pytest.raises(ValueError, match="not a file"):
        Tokenizer.load(tmp_path)


def test_encode_decode_errors(tok):
    with pytest.raises(TypeError, match="text"):
        tok.encode(123)
    with pytest.raises(TypeError, match=r"text\[1\]"):
        tok.encode(["ok", 5])
    with pytest.raises(TypeError, match="text"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match=r"ids\[1\]"):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(ValueError, match=r"ids\[0\]"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="ids"):
        tok.decode("abc")
    with pytest.raises(TypeError, match="ids"):
        tok.decode([1.5, 2.0])
    with pytest.raises(ValueError, match="id"):
        tok.id_to_piece(tok.vocab_size)
