"""Helpers the experiments share: cache directory, atomic JSON, corpus + tokenizer preparation, baselines."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np


def default_cache_dir() -> Path:
    """Downloads, tokenizers and token caches: ``$MANI_JAX_CACHE`` or ``~/.cache/mani_jax``."""
    return Path(os.environ.get("MANI_JAX_CACHE", Path.home() / ".cache" / "mani_jax"))


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` via a temporary file and a rename (never half-written)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)


def unigram_loss(train_docs: list[np.ndarray], val_docs: list[np.ndarray], vocab_size: int) -> float:
    """Nats/token of the validation targets (each doc's tokens after the first) under an add-one-smoothed
    unigram model fit on the training targets."""
    counts = np.ones(vocab_size, np.float64)
    for d in train_docs:
        counts += np.bincount(d[1:], minlength=vocab_size)
    logp = np.log(counts / counts.sum())
    total, n = 0.0, 0
    for d in val_docs:
        total -= logp[d[1:]].sum()
        n += len(d) - 1
    return total / n


def prepare_corpus(corpus_name: str, vocab_size: int, out: Path, cache_dir: Path, *, seed: int = 0,
                   reuse_run_tokenizer: bool = False, tag: str = "experiment"):
    """Load a corpus, train (or reuse the cached) SentencePiece BPE tokenizer on its training split, copy it
    to ``out/tokenizer.model`` and tokenize both splits.

    The tokenizer cache is keyed by the corpus content hash and ``vocab_size``, so experiments on the same
    corpus and vocabulary share one tokenizer (and token order). ``reuse_run_tokenizer``: load
    ``out/tokenizer.model`` if it exists (a resumed run).

    Returns:
      ``(corpus, tokenizer, train_docs, val_docs)``; docs are lists of int32 arrays.

    Raises:
      ValueError: the tokenizer's vocabulary differs from ``vocab_size``.
    """
    from mani_jax.data import load_corpus, tokenize_corpus
    from mani_jax.tokenizer import Tokenizer, train_tokenizer

    print(f"[{tag}] corpus {corpus_name!r} (cache {cache_dir})", flush=True)
    corpus = load_corpus(corpus_name, cache_dir)
    tok_path = out / "tokenizer.model"
    if reuse_run_tokenizer and tok_path.exists():
        tokenizer = Tokenizer.load(tok_path)
    else:
        cached = cache_dir / "tokenizers" / f"{corpus.content_hash()[:16]}-v{vocab_size}"
        if not cached.with_suffix(".model").exists():
            print(f"[{tag}] training a {vocab_size}-token SentencePiece BPE tokenizer", flush=True)
            cached.parent.mkdir(parents=True, exist_ok=True)
            train_tokenizer((d.text for d in corpus.train), vocab_size, cached, seed=seed)
        shutil.copyfile(cached.with_suffix(".model"), tok_path.with_suffix(".tmp"))
        tok_path.with_suffix(".tmp").replace(tok_path)
        tokenizer = Tokenizer.load(tok_path)
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model expects {vocab_size}")
    train_docs, val_docs = tokenize_corpus(corpus, tokenizer, cache_dir)
    print(f"[{tag}] {len(train_docs)} training docs ({sum(len(d) for d in train_docs):,} tokens), "
          f"{len(val_docs)} validation docs ({sum(len(d) for d in val_docs):,} tokens)", flush=True)
    return corpus, tokenizer, train_docs, val_docs


def load_run(run_dir: Path):
    """The trained model and tokenizer of a chimera run directory (:func:`mani_jax.serve.loading.load_run`)."""
    from mani_jax.serve.loading import load_run as _load_run

    return _load_run(run_dir)
