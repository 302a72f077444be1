"""Token pipelines on grain: documents -> token arrays (cached) -> packed rows with segment ids -> batches.

Layout of a batch (``B`` = ``batch_size``, ``L`` = ``seq_len``), a ``dict`` of numpy arrays:

=================  =========  ========  ===============================================================
key                dtype      shape     meaning
=================  =========  ========  ===============================================================
``tokens``         int32      [B, L]    model input, ``row[:-1]`` of a packed row of ``L + 1`` tokens
``targets``        int32      [B, L]    next token, ``row[1:]``
``segment_ids``    int32      [B, L]    1, 2, ... per packed piece within the row; 0 on padding
``positions``      int32      [B, L]    position within the piece, 0 at each segment start
``loss_mask``      float32    [B, L]    1.0 iff ``targets[t]`` follows ``tokens[t]`` in the same piece
=================  =========  ========  ===============================================================

Pieces. Each document's token stream (``BOS text EOS``) is cut into pieces of at most ``L + 1`` tokens
that **overlap by one token**: ``doc[0 : L+1], doc[L : 2L+1], doc[2L : 3L+1], ...`` (the last piece
may be shorter; every piece has >= 2 tokens). So every next-token pair ``(doc[i], doc[i+1])`` of every
document is a target exactly once per epoch: nothing is lost at piece boundaries, and the count of
``loss_mask == 1`` over an epoch is ``sum(len(doc) - 1)``. Attention must not cross segments
(``segment_ids``) and positions restart per piece (``positions``), so a packed row computes exactly
what the pieces would compute alone.

Packing. Pieces are packed into rows of exactly ``L + 1`` tokens with grain's first-fit packer
(``grain.experimental.FirstFitPackIterDataset``); most pieces are full rows, document tails share rows.
Padding uses ``pad_id`` with segment id 0 and loss mask 0.

Training (:func:`make_train_iterator`): piece order is shuffled with ``seed`` and reshuffled every epoch
(``MapDataset.shuffle(seed).repeat()``), packed rows are shuffled within each pack, batches drop the
remainder, and the stream repeats forever (or ``num_epochs``). The iterator is a grain
``DatasetIterator``: ``get_state()`` / ``set_state()`` restore it exactly (checkpoint with the model).

Evaluation (:func:`make_eval_batches`): one deterministic pass in document order, no shuffle; the last
batch is padded with empty rows (loss mask 0), so ``sum(loss * loss_mask) / sum(loss_mask)`` over all
batches is the exact token-weighted mean over every validation target.

Tokenized corpora are cached by :func:`tokenize_corpus` under
``cache_dir/tokens/<sha256(tokenizer sha256, corpus content hash)>/`` as ``.npy`` files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Sequence

import grain
import numpy as np

from mani_jax.data.corpora import Corpus
from mani_jax.tokenizer import PAD_ID, Tokenizer

__all__ = [
    "BATCH_KEYS",
    "tokenize_corpus",
    "split_pieces",
    "make_train_dataset",
    "make_train_iterator",
    "make_eval_batches",
    "count_targets",
]

BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")
_CACHE_VERSION = "v1"
_NO_THREADS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # data are in memory


# ------------------------------------------------------------------------------------ tokenization
def _encode_docs(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    if not texts:
        return []
    ids = tokenizer.encode(texts, add_bos=True, add_eos=True)
    return [np.asarray(x, dtype=np.int32) for x in ids]


def _save_split(dirpath: Path, split: str, docs: list[np.ndarray]) -> None:
    flat = np.concatenate(docs).astype(np.int32) if docs else np.zeros((0,), np.int32)
    offsets = np.zeros((len(docs) + 1,), np.int64)
    if docs:
        np.cumsum([len(d) for d in docs], out=offsets[1:])
    np.save(dirpath / f"{split}_tokens.npy", flat)
    np.save(dirpath / f"{split}_offsets.npy", offsets)


def _load_split(dirpath: Path, split: str) -> list[np.ndarray]:
    flat = np.load(dirpath / f"{split}_tokens.npy")
    offsets = np.load(dirpath / f"{split}_offsets.npy")
    return [flat[offsets[i]: offsets[i + 1]] for i in range(len(offsets) - 1)]


def tokenize_corpus(
    corpus: Corpus, tokenizer: Tokenizer, cache_dir: str | os.PathLike | None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Tokenize every document as ``[bos_id] + encode(text) + [eos_id]``, with an on-disk cache.

    The cache lives in ``cache_dir/tokens/<key>/`` where ``key`` hashes ``tokenizer.sha256`` and
    ``corpus.content_hash()``: ``{train,validation}_tokens.npy`` (int32, all documents concatenated),
    ``{train,validation}_offsets.npy`` (int64, ``[n_docs + 1]`` document boundaries) and
    ``meta.json``. It is written to a temporary directory and renamed into place, so a re-run (or a
    concurrent one) either finds the complete cache or re-tokenizes. ``cache_dir=None`` disables it.

    Args:
      corpus: the documents.
      tokenizer: a tokenizer with BOS and EOS ids.
      cache_dir: cache root, or ``None``.

    Returns:
      ``(train_docs, val_docs)``: lists of 1-D int32 arrays, one per document of ``corpus.train`` /
      ``corpus.validation`` in order, each of length ``>= 2``.

    Raises:
      ValueError: the tokenizer has no BOS or EOS token; ``corpus.train`` is empty.
    """
    if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
        raise ValueError("tokenizer: needs BOS and EOS tokens (bos_id/eos_id are disabled)")
    if not corpus.train:
        raise ValueError("corpus: no training documents")
    key = hashlib.sha256(
        f"{_CACHE_VERSION}:{tokenizer.sha256}:{corpus.content_hash()}".encode()
    ).hexdigest()[:32]
    final = Path(cache_dir) / "tokens" / key if cache_dir is not None else None
    if final is not None and (final / "meta.json").is_file():
        try:
            return _load_split(final, "train"), _load_split(final, "validation")
        except (OSError, ValueError):
            pass  # damaged cache: re-tokenize and replace it below

    train = _encode_docs(tokenizer, [d.text for d in corpus.train])
    val = _encode_docs(tokenizer, [d.text for d in corpus.validation])
    if final is None:
        return train, val

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=final.parent))
    try:
        _save_split(tmp, "train", train)
        _save_split(tmp, "validation", val)
        meta = {
            "version": _CACHE_VERSION,
            "tokenizer_sha256": tokenizer.sha256,
            "corpus_name": corpus.name,
            "corpus_hash": corpus.content_hash(),
            "train_docs": len(train),
            "validation_docs": len(val),
            "train_tokens": int(sum(len(d) for d in train)),
            "validation_tokens": int(sum(len(d) for d in val)),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():  # stale or damaged: move it aside first
            stale = final.parent / f".{key}.stale-{uuid.uuid4().hex[:8]}"
            os.rename(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # lost a race to a concurrent writer: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return train, val


# ---------------------------------------------------------------------------------------- pieces
def _check_docs(token_docs: Sequence[np.ndarray], name: str = "token_docs") -> list[np.ndarray]:
    if isinstance(token_docs, np.ndarray) and token_docs.ndim != 1 and token_docs.dtype != object:
        raise TypeError(f"{name}: expected a list of 1-D int arrays, got one array of shape {token_docs.shape}")
    out = []
    for i, d in enumerate(token_docs):
        a = np.asarray(d)
        if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
            raise TypeError(f"{name}[{i}]: expected a 1-D int array, got {a.dtype} of shape {a.shape}")
        out.append(a.astype(np.int32, copy=False))
    return out


def _check_pos_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def split_pieces(token_docs: Sequence[np.ndarray], seq_len: int) -> np.ndarray:
    """Piece table of ``token_docs`` for rows of ``seq_len + 1`` tokens (pieces overlap by one token).

    Args:
      token_docs: list of 1-D int arrays (documents shorter than 2 tokens have no target: skipped).
      seq_len: ``L``; pieces have ``2 .. L + 1`` tokens.

    Returns:
      int64 array ``[n_pieces, 3]`` of ``(doc_index, start, end)``: piece = ``token_docs[doc][start:end]``,
      in document order.

    Raises:
      ValueError: ``seq_len < 1``.
    """
    seq_len = _check_pos_int(seq_len, "seq_len")
    docs = _check_docs(token_docs)
    rows = []
    for i, d in enumerate(docs):
        n = len(d)
        if n < 2:
            continue
        starts = np.arange(0, n - 1, seq_len, dtype=np.int64)
        ends = np.minimum(starts + seq_len + 1, n)
        rows.append(np.stack([np.full_like(starts, i), starts, ends], axis=1))
    if not rows:
        return np.zeros((0, 3), np.int64)
    return np.concatenate(rows, axis=0)


def count_targets(token_docs: Sequence[np.ndarray]) -> int:
    """Number of next-token targets in ``token_docs``: ``sum(max(len(doc) - 1, 0))`` (one epoch's
    ``loss_mask`` sum)."""
    return int(sum(max(len(d) - 1, 0) for d in token_docs))


class _PieceLookup:
    """Picklable ``(doc, start, end) -> {"tokens": piece}`` map over in-memory documents."""

    def __init__(self, docs: list[np.ndarray]):
        self._docs = docs

    def __call__(self, entry: np.ndarray) -> dict[str, np.ndarray]:
        d, s, e = (int(x) for x in entry)
        return {"tokens": self._docs[d][s:e]}


def _finalize_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packed row of ``L + 1`` tokens -> the 5 model arrays of length ``L``."""
    row = packed["tokens"]
    seg = packed["tokens_segment_ids"]
    pos = packed["tokens_positions"]
    same = (seg[:-1] == seg[1:]) & (seg[:-1] > 0)
    return {
        "tokens": row[:-1].astype(np.int32),
        "targets": row[1:].astype(np.int32),
        "segment_ids": seg[:-1].astype(np.int32),
        "positions": pos[:-1].astype(np.int32),
        "loss_mask": same.astype(np.float32),
    }


def _packed_rows(
    pieces_ds: grain.IterDataset, seq_len: int, num_packing_bins: int, seed: int, shuffle_bins: bool, pad_id: int
) -> grain.IterDataset:
    packed = grain.experimental.FirstFitPackIterDataset(
        pieces_ds,
        length_struct={"tokens": seq_len + 1},
        num_packing_bins=num_packing_bins,
        seed=seed,
        shuffle_bins=shuffle_bins,
        padding_struct={"tokens": pad_id},
    )
    return packed.map(_finalize_row)


# ------------------------------------------------------------------------------------- training
def make_train_dataset(
    token_docs: Sequence[np.ndarray],
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    num_packing_bins: int | None = None,
    pad_id: int = PAD_ID,
) -> grain.IterDataset:
    """The training pipeline as a grain ``IterDataset`` of batches (see the module docstring).

    Args:
      token_docs: training documents, 1-D int arrays (e.g. from :func:`tokenize_corpus`).
      seq_len: ``L``, model sequence length; rows hold ``L + 1`` tokens.
      batch_size: ``B``; the last incomplete batch of a finite run is dropped.
      seed: shuffle seed in ``[0, 2**32)``; epoch ``e`` uses a permutation seeded by ``seed + e``.
      num_epochs: ``None`` repeats forever; ``n`` stops after ``n`` passes over the pieces.
      num_packing_bins: rows packed at a time by first fit (default ``max(batch_size, 32)``); more bins
        mean less padding for short documents.
      pad_id: token id written into padding (masked out anyway).

    Returns:
      ``IterDataset`` yielding ``dict[str, np.ndarray]`` with :data:`BATCH_KEYS`, each ``[B, L]``.

    Raises:
      ValueError: ``seq_len``/``batch_size``/``num_epochs`` not positive, ``seed`` out of range, or no
        document has 2 tokens (empty corpus).
    """
    seq_len = _check_pos_int(seq_len, "seq_len")
    batch_size = _check_pos_int(batch_size, "batch_size")
    if num_epochs is not None:
        num_epochs = _check_pos_int(num_epochs, "num_epochs")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    seed = int(seed)
    bins = max(batch_size, 32) if num_packing_bins is None else _check_pos_int(num_packing_bins, "num_packing_bins")
    docs = _check_docs(token_docs)
    table = split_pieces(docs, seq_len)
    if len(table) == 0:
        raise ValueError("token_docs: empty corpus (no document has at least 2 tokens)")
    ds = grain.MapDataset.source(table).shuffle(seed).repeat(num_epochs).map(_PieceLookup(docs))
    rows = _packed_rows(ds.to_iter_dataset(_NO_THREADS), seq_len, bins, seed, True, pad_id)
    return rows.batch(batch_size, drop_remainder=True)


def make_train_iterator(
    token_docs: Sequence[np.ndarray],
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    num_packing_bins: int | None = None,
    pad_id: int = PAD_ID,
) -> grain.DatasetIterator:
    """Checkpointable iterator over training batches: ``iter(make_train_dataset(...))``.

    Each ``next()`` returns ``dict[str, np.ndarray]``: ``tokens``/``targets``/``segment_ids``/
    ``positions`` int32 ``[batch_size, seq_len]`` and ``loss_mask`` float32 ``[batch_size, seq_len]``.
    ``it.get_state()`` returns a JSON-able dict; ``it.set_state(state)`` on an iterator built with the
    same arguments resumes with exactly the batches that followed the saved state.

    Arguments and errors: see :func:`make_train_dataset`.
    """
    return iter(
        make_train_dataset(
            token_docs,
            seq_len=seq_len,
            batch_size=batch_size,
            seed=seed,
            num_epochs=num_epochs,
            num_packing_bins=num_packing_bins,
            pad_id=pad_id,
        )
    )


# ------------------------------------------------------------------------------------ evaluation
def make_eval_batches(
    token_docs: Sequence[np.ndarray],
    *,
    seq_len: int,
    batch_size: int,
    num_packing_bins: int | None = None,
    pad_id: int = PAD_ID,
) -> list[dict[str, np.ndarray]]:
    """One deterministic pass over ``token_docs`` (document order, no shuffle) as padded batches.

    Every next-token target of every document is covered by exactly one ``loss_mask == 1`` entry
    (``sum(loss_mask) == count_targets(token_docs)``), so summing ``loss * loss_mask`` and
    ``loss_mask`` over all batches gives the exact token-weighted mean. The last batch is filled up to
    ``batch_size`` with padding rows (``pad_id`` tokens, segment id 0, loss mask 0); all batches have
    the same shapes, so a jitted eval step compiles once.

    Args:
      token_docs: validation documents, 1-D int arrays.
      seq_len: ``L``.
      batch_size: ``B``.
      num_packing_bins: first-fit bins (default ``max(batch_size, 32)``).
      pad_id: token id written into padding.

    Returns:
      list of batches, each a dict with :data:`BATCH_KEYS` of shape ``[B, L]`` (int32, ``loss_mask``
      float32). Empty when no document has 2 tokens.

    Raises:
      ValueError: ``seq_len``/``batch_size`` not positive.
    """
    seq_len = _check_pos_int(seq_len, "seq_len")
    batch_size = _check_pos_int(batch_size, "batch_size")
    bins = max(batch_size, 32) if num_packing_bins is None else _check_pos_int(num_packing_bins, "num_packing_bins")
    docs = _check_docs(token_docs)
    table = split_pieces(docs, seq_len)
    if len(table) == 0:
        return []
    ds = grain.MapDataset.source(table).map(_PieceLookup(docs)).to_iter_dataset(_NO_THREADS)
    rows = list(_packed_rows(ds, seq_len, bins, 0, False, pad_id))
    pad_row = {
        "tokens": np.full((seq_len,), pad_id, np.int32),
        "targets": np.full((seq_len,), pad_id, np.int32),
        "segment_ids": np.zeros((seq_len,), np.int32),
        "positions": np.zeros((seq_len,), np.int32),
        "loss_mask": np.zeros((seq_len,), np.float32),
    }
    rows += [pad_row] * (-len(rows) % batch_size)
    return [
        {k: np.stack([r[k] for r in rows[i: i + batch_size]]) for k in BATCH_KEYS}
        for i in range(0, len(rows), batch_size)
    ]
