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
                                        (and, with ``target_masks``, the target token is marked trained)
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

Supervised fine-tuning. Every builder takes optional ``target_masks``: one bool array per document, aligned with
its tokens, True where the token is one the model must learn to produce (for chats, the assistant tokens from
:func:`mani_jax.chat.encode_chat`; :func:`tokenize_chats` makes both lists). The masks travel through the same
pieces, shuffles and packing as the tokens, and ``loss_mask[t]`` is additionally multiplied by the mask of the
target token ``targets[t]`` (the mask shifted by one, like the targets). Without ``target_masks`` every batch is
exactly what it was before. A chat longer than ``L + 1`` tokens would be cut into pieces like any document
(a later piece then lacks its prompt); :func:`tokenize_chats` refuses, truncates or drops such chats instead.
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
    "tokenize_chats",
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


def _check_masks(target_masks: Sequence[np.ndarray] | None, docs: list[np.ndarray]) -> list[np.ndarray] | None:
    """``target_masks`` as bool arrays, one per document and of its length; ``None`` passes through."""
    if target_masks is None:
        return None
    if isinstance(target_masks, np.ndarray) and target_masks.dtype != object:
        raise TypeError(f"target_masks: expected a list of 1-D arrays (one per document), got one array of shape "
                        f"{target_masks.shape}")
    masks = list(target_masks)
    if len(masks) != len(docs):
        raise ValueError(f"target_masks: expected one mask per document ({len(docs)}), got {len(masks)}")
    out = []
    for i, (m, d) in enumerate(zip(masks, docs)):
        a = np.asarray(m)
        if a.shape != d.shape:
            raise ValueError(f"target_masks[{i}]: expected shape {d.shape} (the document's), got {a.shape}")
        if a.size and not (a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer)):
            raise TypeError(f"target_masks[{i}]: expected a bool (or 0/1 int) array, got {a.dtype}")
        if a.size and a.dtype != np.bool_ and not np.isin(a, (0, 1)).all():
            raise ValueError(f"target_masks[{i}]: an int mask must hold only 0 and 1")
        out.append(a.astype(np.bool_))
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


def count_targets(token_docs: Sequence[np.ndarray], target_masks: Sequence[np.ndarray] | None = None) -> int:
    """Number of next-token targets in ``token_docs`` (one epoch's ``loss_mask`` sum): ``sum(max(len(doc) - 1,
    0))``, or with ``target_masks`` ``sum(mask[1:].sum())`` (the first token of a document is never a target).

    Raises:
      ValueError / TypeError: ``target_masks`` does not have one bool array per document, of its length.
    """
    if target_masks is None:
        return int(sum(max(len(d) - 1, 0) for d in token_docs))
    masks = _check_masks(target_masks, _check_docs(token_docs))
    return int(sum(int(m[1:].sum()) for m in masks))


class _PieceLookup:
    """Picklable ``(doc, start, end) -> {"tokens": piece[, "target_mask": mask piece]}`` map over in-memory
    documents."""

    def __init__(self, docs: list[np.ndarray], masks: list[np.ndarray] | None = None):
        self._docs = docs
        self._masks = masks

    def __call__(self, entry: np.ndarray) -> dict[str, np.ndarray]:
        d, s, e = (int(x) for x in entry)
        if self._masks is None:
            return {"tokens": self._docs[d][s:e]}
        return {"tokens": self._docs[d][s:e], "target_mask": self._masks[d][s:e]}


def _finalize_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packed row of ``L + 1`` tokens -> the 5 model arrays of length ``L``."""
    row = packed["tokens"]
    seg = packed["tokens_segment_ids"]
    pos = packed["tokens_positions"]
    same = (seg[:-1] == seg[1:]) & (seg[:-1] > 0)
    if "target_mask" in packed:  # supervised fine-tuning: only marked target tokens count
        same = same & packed["target_mask"][1:].astype(np.bool_)
    return {
        "tokens": row[:-1].astype(np.int32),
        "targets": row[1:].astype(np.int32),
        "segment_ids": seg[:-1].astype(np.int32),
        "positions": pos[:-1].astype(np.int32),
        "loss_mask": same.astype(np.float32),
    }


def _packed_rows(
    pieces_ds: grain.IterDataset, seq_len: int, num_packing_bins: int, seed: int, shuffle_bins: bool, pad_id: int,
    with_mask: bool = False,
) -> grain.IterDataset:
    length, padding = {"tokens": seq_len + 1}, {"tokens": pad_id}
    if with_mask:
        length["target_mask"], padding["target_mask"] = seq_len + 1, False
    packed = grain.experimental.FirstFitPackIterDataset(
        pieces_ds,
        length_struct=length,
        num_packing_bins=num_packing_bins,
        seed=seed,
        shuffle_bins=shuffle_bins,
        padding_struct=padding,
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
    target_masks: Sequence[np.ndarray] | None = None,
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
      target_masks: optional, one bool array per document (same length): only targets whose token is marked
        count in ``loss_mask`` (supervised fine-tuning; see the module docstring). Piece order, packing and the
        iterator state are the same as without it.

    Returns:
      ``IterDataset`` yielding ``dict[str, np.ndarray]`` with :data:`BATCH_KEYS`, each ``[B, L]``.

    Raises:
      ValueError: ``seq_len``/``batch_size``/``num_epochs`` not positive, ``seed`` out of range, no
        document has 2 tokens (empty corpus), or ``target_masks`` not one mask per document of its length.
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
    masks = _check_masks(target_masks, docs)
    table = split_pieces(docs, seq_len)
    if len(table) == 0:
        raise ValueError("token_docs: empty corpus (no document has at least 2 tokens)")
    ds = grain.MapDataset.source(table).shuffle(seed).repeat(num_epochs).map(_PieceLookup(docs, masks))
    rows = _packed_rows(ds.to_iter_dataset(_NO_THREADS), seq_len, bins, seed, True, pad_id, masks is not None)
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
    target_masks: Sequence[np.ndarray] | None = None,
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
            target_masks=target_masks,
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
    target_masks: Sequence[np.ndarray] | None = None,
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
      target_masks: optional, one bool array per document: only marked target tokens count (then
        ``sum(loss_mask) == count_targets(token_docs, target_masks)``).

    Returns:
      list of batches, each a dict with :data:`BATCH_KEYS` of shape ``[B, L]`` (int32, ``loss_mask``
      float32). Empty when no document has 2 tokens.

    Raises:
      ValueError: ``seq_len``/``batch_size`` not positive; ``target_masks`` not one mask per document.
    """
    seq_len = _check_pos_int(seq_len, "seq_len")
    batch_size = _check_pos_int(batch_size, "batch_size")
    bins = max(batch_size, 32) if num_packing_bins is None else _check_pos_int(num_packing_bins, "num_packing_bins")
    docs = _check_docs(token_docs)
    masks = _check_masks(target_masks, docs)
    table = split_pieces(docs, seq_len)
    if len(table) == 0:
        return []
    ds = grain.MapDataset.source(table).map(_PieceLookup(docs, masks)).to_iter_dataset(_NO_THREADS)
    rows = list(_packed_rows(ds, seq_len, bins, 0, False, pad_id, masks is not None))
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


# ------------------------------------------------------------------------------------------------ chats
def tokenize_chats(
    tokenizer: Tokenizer,
    conversations: Sequence[Sequence[dict]],
    *,
    max_tokens: int | None = None,
    overflow: str = "error",
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Token ids and assistant masks of chat conversations, ready for ``make_train_dataset(docs,
    target_masks=masks, ...)``.

    Each conversation is encoded by :func:`mani_jax.chat.encode_chat` (BOS, role headers, contents,
    ``<|end|>``; the mask marks assistant contents and their closing ``<|end|>``). No EOS is appended: a reply
    ends with ``<|end|>``, and packing keeps conversations apart with segment ids.

    Args:
      tokenizer: a :class:`~mani_jax.tokenizer.Tokenizer` with the chat tokens.
      conversations: list of message lists (``[{"role", "content"}, ...]``).
      max_tokens: longest allowed conversation in tokens (``seq_len + 1`` fits one packed row); ``None``: no
        limit.
      overflow: what to do with a longer conversation: ``"error"`` (raise), ``"truncate"`` (keep the first
        ``max_tokens`` tokens; the cut reply loses its end) or ``"drop"`` (leave it out; the outputs are then
        shorter than ``conversations``).

    Returns:
      ``(docs, masks)``: lists of int32 ``[T_i]`` and bool ``[T_i]`` arrays.

    Raises:
      ValueError: a malformed conversation (naming its index), ``max_tokens < 2``, an unknown ``overflow``, or a
        conversation longer than ``max_tokens`` with ``overflow="error"``.
    """
    from mani_jax.chat import encode_chat

    if overflow not in ("error", "truncate", "drop"):
        raise ValueError(f"overflow: expected 'error', 'truncate' or 'drop', got {overflow!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer))
                                   or max_tokens < 2):
        raise ValueError(f"max_tokens: expected None or an int >= 2, got {max_tokens!r}")
    docs, masks = [], []
    for i, conv in enumerate(conversations):
        try:
            ids, mask = encode_chat(tokenizer, conv)
        except ValueError as e:
            raise ValueError(f"conversations[{i}]: {e}") from e
        if max_tokens is not None and len(ids) > max_tokens:
            if overflow == "error":
                raise ValueError(f"conversations[{i}]: {len(ids)} tokens > max_tokens={max_tokens} "
                                 "(use overflow='truncate' or 'drop', or a longer seq_len)")
            if overflow == "drop":
                continue
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        docs.append(ids)
        masks.append(mask)
    return docs, masks
