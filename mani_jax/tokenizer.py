"""SentencePiece BPE tokenizer: training, loading, special tokens.

One tokenizer format for the whole project: a SentencePiece ``ModelProto`` file (``*.model``) holding a
**byte-fallback BPE** model trained with the *identity* normalizer, so that for every Python string ``s``

    ``tok.decode(tok.encode(s)) == s``

exactly (any character the vocabulary does not know is spelled with the ``<0xNN>`` byte pieces, and no
whitespace is collapsed or added). The id layout is fixed and shared with the chat template and the GGUF
exporter:

======  =================  ======================================
id      piece              kind
======  =================  ======================================
0       ``<unk>``          UNKNOWN (never produced: byte fallback)
1       ``<s>``            CONTROL (BOS)
2       ``</s>``           CONTROL (EOS)
3       ``<pad>``          CONTROL (PAD)
4..7    chat-role tokens   USER_DEFINED (``CHAT_TOKENS``)
8..263  ``<0x00>..<0xFF>`` BYTE
264..   merges             NORMAL
======  =================  ======================================

User-defined pieces (the chat-role tokens) are matched in raw text: ``encode("<|user|>")`` gives ``[5]``.
Control pieces (BOS/EOS/PAD) are never matched in text and decode to ``""``.

Source: Kudo & Richardson 2018, "SentencePiece" (https://github.com/google/sentencepiece); the
byte-fallback BPE setup follows the Llama/Gemma tokenizers.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

__all__ = [
    "SPECIAL_TOKENS",
    "CHAT_TOKENS",
    "UNK_ID",
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "NUM_BYTE_TOKENS",
    "MIN_VOCAB_SIZE",
    "TOKEN_TYPE_NORMAL",
    "TOKEN_TYPE_UNKNOWN",
    "TOKEN_TYPE_CONTROL",
    "TOKEN_TYPE_USER_DEFINED",
    "TOKEN_TYPE_UNUSED",
    "TOKEN_TYPE_BYTE",
    "Tokenizer",
    "train_tokenizer",
    "sentence_iterator",
]

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
#: Reserved chat-role tokens (user-defined symbols), ids 4..7 in this order.
CHAT_TOKENS: tuple[str, ...] = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
#: Every special piece; ``SPECIAL_TOKENS[i]`` is the piece with id ``i``.
SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>") + CHAT_TOKENS
NUM_BYTE_TOKENS = 256
#: Smallest vocabulary that holds the special tokens, the 256 byte tokens and at least one merge.
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + NUM_BYTE_TOKENS + 1

# GGUF ``tokenizer.ggml.token_type`` values (llama.cpp ``llama_token_type``); they coincide with
# SentencePiece's ``ModelProto.SentencePiece.Type`` numbering.
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

# SentencePiece silently drops training sentences longer than this many bytes; longer lines are chunked.
_MAX_SENTENCE_BYTES = 8192


def _chunk_line(line: str, max_bytes: int = _MAX_SENTENCE_BYTES) -> Iterator[str]:
    """Split ``line`` into pieces of at most ``max_bytes`` UTF-8 bytes, preferring to cut before a space."""
    if len(line.encode("utf-8")) <= max_bytes:
        yield line
        return
    max_chars = max_bytes // 4  # a code point is at most 4 UTF-8 bytes
    start = 0
    while start < len(line):
        end = min(start + max_chars, len(line))
        if end < len(line):
            cut = line.rfind(" ", start + 1, end)
            if cut > start:
                end = cut
        yield line[start:end]
        start = end


def sentence_iterator(texts: Iterable[str]) -> Iterator[str]:
    """Yield the non-empty lines of ``texts`` (split on ``"\\n"`` only) as SentencePiece training sentences.

    Lines longer than 8192 UTF-8 bytes are cut into chunks (preferably before a space) because the
    SentencePiece trainer would otherwise skip them. Nothing else is changed: no stripping, no
    normalisation.

    Args:
      texts: iterable of ``str`` documents.

    Raises:
      TypeError: an element of ``texts`` is not a ``str``.
    """
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}]: expected str, got {type(text).__name__}")
        for line in text.split("\n"):
            if line:
                yield from _chunk_line(line)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it onto ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    model_prefix: str | os.PathLike,
    *,
    max_sentences: int = 2_000_000,
    seed: int = 0,
    character_coverage: float = 0.9995,
    num_threads: int = 1,
) -> "Tokenizer":
    """Train a byte-fallback SentencePiece BPE tokenizer and write ``{model_prefix}.model`` / ``.vocab``.

    Training options: ``model_type=bpe``, ``byte_fallback=True``, ``normalization_rule_name=identity``,
    ``remove_extra_whitespaces=False``, ``add_dummy_prefix=False`` (lines are trained exactly as they
    appear after a newline in a document), ``split_digits=True``, ``allow_whitespace_only_pieces=True``,
    ids ``<unk>=0 <s>=1 </s>=2 <pad>=3`` and ``CHAT_TOKENS`` as user-defined symbols with ids 4..7.
    Sentences are the non-empty lines of ``texts`` (see :func:`sentence_iterator`), handed to the
    trainer from memory (no temporary text file); when there are more than ``max_sentences`` of them a
    uniform sample of ``max_sentences`` lines is drawn (reservoir sampling seeded with ``seed``).

    Determinism: for the same ``texts``, ``vocab_size``, ``max_sentences`` and ``seed`` the written
    ``.model`` file is byte-identical, whatever ``num_threads`` (``seed`` only matters when the corpus has
    more than ``max_sentences`` lines and is subsampled).

    Both files are written to temporary names in the destination directory and renamed into place,
    so a reader never sees a half-written model.

    Args:
      texts: iterable of ``str`` documents (consumed once).
      vocab_size: total vocabulary size including the 8 special and 256 byte tokens;
        ``>= MIN_VOCAB_SIZE`` (265).
      model_prefix: output path without extension; its parent directory is created if missing.
      max_sentences: at most this many lines are used (uniformly subsampled with ``seed`` beyond it).
      seed: seed of the line subsampling (and of SentencePiece's random generator).
      character_coverage: fraction of characters covered by single-character pieces; the rest are
        spelled with byte pieces.
      num_threads: trainer threads (the BPE trainer's output does not depend on it).

    Returns:
      The trained :class:`Tokenizer`, loaded from ``{model_prefix}.model``.

    Raises:
      ValueError: ``vocab_size`` < ``MIN_VOCAB_SIZE`` or too large for the corpus; ``texts`` has no
        non-empty line; ``max_sentences`` < 1; ``character_coverage`` not in (0, 1].
      TypeError: an element of ``texts`` is not a ``str``.
    """
    if isinstance(texts, str):
        raise TypeError("texts: expected an iterable of str documents, got a single str (wrap it in a list)")
    if not isinstance(vocab_size, (int, np.integer)) or isinstance(vocab_size, bool):
        raise TypeError(f"vocab_size: expected int, got {type(vocab_size).__name__}")
    vocab_size = int(vocab_size)
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the {len(SPECIAL_TOKENS)} special tokens and "
            f"{NUM_BYTE_TOKENS} byte tokens need vocab_size >= {MIN_VOCAB_SIZE}"
        )
    if int(max_sentences) < 1:
        raise ValueError(f"max_sentences must be >= 1, got {max_sentences}")
    if not 0.0 < float(character_coverage) <= 1.0:
        raise ValueError(f"character_coverage must be in (0, 1], got {character_coverage}")

    # Uniform sample of at most ``max_sentences`` lines (reservoir sampling, Vitter's algorithm R),
    # seeded here: SentencePiece's own ``input_sentence_size`` sampling ignores the seed.
    k = int(max_sentences)
    rng = np.random.default_rng(int(seed))
    sample: list[str] = []
    for i, line in enumerate(sentence_iterator(texts)):
        if i < k:
            sample.append(line)
        else:
            j = int(rng.integers(0, i + 1))
            if j < k:
                sample[j] = line
    if not sample:
        raise ValueError("texts: empty corpus (no non-empty line to train the tokenizer on)")

    final_prefix = str(Path(model_prefix))
    out_dir = Path(final_prefix).parent
    out_dir.mkdir(parents=True, exist_ok=True)

    # The model is written to memory (``model_writer``) rather than under a temporary prefix: the
    # trainer records ``model_prefix`` in the model proto, which would make the bytes depend on it.
    buf = io.BytesIO()
    spm.set_random_generator_seed(int(seed))
    try:
        with open(os.devnull, "w") as devnull:
            # sentencepiece redirects the C++ log by dup'ing sys.stderr's file descriptor; Jupyter's stderr
            # has none (io.UnsupportedOperation), so there the log is left alone (minloglevel keeps it quiet).
            try:
                sys.stderr.fileno()
                log = {"logstream": devnull}
            except (AttributeError, OSError):
                log = {}
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sample),
                model_writer=buf,
                **log,
                model_type="bpe",
                vocab_size=vocab_size,
                character_coverage=float(character_coverage),
                byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                split_digits=True,
                split_by_whitespace=True,
                allow_whitespace_only_pieces=True,
                max_sentence_length=_MAX_SENTENCE_BYTES,
                input_sentence_size=0,
                shuffle_input_sentence=False,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                pad_id=PAD_ID,
                unk_piece=SPECIAL_TOKENS[UNK_ID],
                bos_piece=SPECIAL_TOKENS[BOS_ID],
                eos_piece=SPECIAL_TOKENS[EOS_ID],
                pad_piece=SPECIAL_TOKENS[PAD_ID],
                user_defined_symbols=list(CHAT_TOKENS),
                hard_vocab_limit=True,
                num_threads=int(num_threads),
                minloglevel=2,
            )
    except RuntimeError as e:
        msg = str(e)
        if "vocab" in msg.lower():
            raise ValueError(f"vocab_size={vocab_size} does not fit this corpus: {msg}") from e
        raise ValueError(f"SentencePiece training failed: {msg}") from e
    # The trainer records ``num_threads`` in the proto; drop it so the file depends only on the data
    # and the vocabulary options (the learned pieces do not depend on the thread count).
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    proto.trainer_spec.ClearField("num_threads")
    model_bytes = proto.SerializeToString(deterministic=True)
    tok = Tokenizer.from_bytes(model_bytes)
    vocab_text = "".join(f"{piece}\t{score:g}\n" for piece, score, _ in tok.pieces())
    # .vocab first: the .model file is the one readers load, so it appears last and whole.
    _write_atomic(Path(final_prefix + ".vocab"), vocab_text.encode("utf-8"))
    _write_atomic(Path(final_prefix + ".model"), model_bytes)
    return Tokenizer.load(final_prefix + ".model")


class Tokenizer:
    """A loaded SentencePiece model (see the module docstring for the id layout).

    Construct with :meth:`Tokenizer.load` (or :func:`train_tokenizer`). Token ids are Python ``int``\\ s
    in ``[0, vocab_size)``.
    """

    def __init__(self, sp: spm.SentencePieceProcessor, model_path: Path | None, model_bytes: bytes):
        self._sp = sp
        self._model_path = model_path
        self._sha256 = hashlib.sha256(model_bytes).hexdigest()
        from sentencepiece import sentencepiece_model_pb2  # needs protobuf (a grain dependency)

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(model_bytes)
        self._types = [int(p.type) for p in proto.pieces]
        if len(self._types) != sp.get_piece_size():
            raise ValueError(f"{model_path}: corrupt SentencePiece model (piece count mismatch)")

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a SentencePiece ``.model`` file.

        Raises:
          FileNotFoundError: ``path`` does not exist.
          ValueError: ``path`` is not a readable SentencePiece model (corrupt, empty, a directory...).
        """
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"path: tokenizer model {str(p)!r} does not exist")
        if not p.is_file():
            raise ValueError(f"path: {str(p)!r} is not a file")
        return cls.from_bytes(p.read_bytes(), p)

    @classmethod
    def from_bytes(cls, data: bytes, model_path: str | os.PathLike | None = None) -> "Tokenizer":
        """Load a tokenizer from serialized SentencePiece ``ModelProto`` bytes.

        Raises:
          ValueError: ``data`` is not a valid SentencePiece model.
        """
        where = str(model_path) if model_path is not None else "<bytes>"
        sp = spm.SentencePieceProcessor()
        try:
            if not data:
                raise RuntimeError("empty file")
            sp.LoadFromSerializedProto(bytes(data))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"path: {where!r} is not a valid SentencePiece model ({e})") from e
        if sp.get_piece_size() <= 0:
            raise ValueError(f"path: {where!r} is not a valid SentencePiece model (no pieces)")
        return cls(sp, Path(model_path).resolve() if model_path is not None else None, bytes(data))

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Number of pieces (ids are ``0 .. vocab_size - 1``)."""
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def special_ids(self) -> dict[str, int]:
        """``{piece: id}`` for every piece of ``SPECIAL_TOKENS`` present in this model."""
        out = {}
        for piece in SPECIAL_TOKENS:
            i = self._sp.piece_to_id(piece)
            if i != self.unk_id or piece == self._sp.id_to_piece(self.unk_id):
                out[piece] = int(i)
        return out

    @property
    def model_path(self) -> Path | None:
        """Absolute path of the ``.model`` file this tokenizer was loaded from (``None`` if from bytes)."""
        return self._model_path

    @property
    def sha256(self) -> str:
        """Hex sha256 of the ``.model`` file bytes (a cache key for tokenized data)."""
        return self._sha256

    # ------------------------------------------------------------------ pieces
    def _check_id(self, i, name: str = "id") -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"{name}: expected int token id, got {type(i).__name__}")
        if not 0 <= int(i) < self.vocab_size:
            raise ValueError(f"{name}={int(i)} out of range [0, {self.vocab_size})")
        return int(i)

    def id_to_piece(self, id: int) -> str:  # noqa: A002 - the field's name
        """The piece string of token ``id`` (byte pieces look like ``"<0x0A>"``; spaces are ``"▁"``)."""
        return self._sp.id_to_piece(self._check_id(id))

    def piece_to_id(self, piece: str) -> int:
        """Id of ``piece``; ``unk_id`` when it is not in the vocabulary."""
        return int(self._sp.piece_to_id(piece))

    def token_type(self, id: int) -> int:  # noqa: A002
        """GGUF token type of ``id``: 1 NORMAL, 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED, 5 UNUSED, 6 BYTE."""
        return self._types[self._check_id(id)]

    def pieces(self) -> list[tuple[str, float, int]]:
        """``[(piece, score, token_type)]`` for every id in order, as GGUF stores a SentencePiece vocab.

        ``token_type`` uses llama.cpp's numbering: 1 NORMAL, 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED,
        5 UNUSED, 6 BYTE (checked against ``IsUnknown/IsControl/IsUnused/IsByte``).
        """
        sp = self._sp
        out = []
        for i in range(self.vocab_size):
            t = self._types[i]
            # Cross-check the proto's type against the processor's own predicates.
            if sp.is_unknown(i):
                assert t == TOKEN_TYPE_UNKNOWN, (i, t)
            elif sp.is_control(i):
                assert t == TOKEN_TYPE_CONTROL, (i, t)
            elif sp.is_unused(i):
                assert t == TOKEN_TYPE_UNUSED, (i, t)
            elif sp.is_byte(i):
                assert t == TOKEN_TYPE_BYTE, (i, t)
            else:
                assert t in (TOKEN_TYPE_NORMAL, TOKEN_TYPE_USER_DEFINED), (i, t)
            out.append((sp.id_to_piece(i), float(sp.get_score(i)), t))
        return out

    # ------------------------------------------------------------------ encode / decode
    def encode(
        self, text: str | Sequence[str], add_bos: bool = False, add_eos: bool = False
    ) -> list[int] | list[list[int]]:
        """Encode ``text`` to token ids.

        Args:
          text: a ``str`` -> ``list[int]``; or a list/tuple of ``str`` -> ``list[list[int]]`` (batched,
            identical to encoding each item).
          add_bos: prepend ``bos_id`` to each sequence.
          add_eos: append ``eos_id`` to each sequence.

        Raises:
          TypeError: ``text`` is neither a ``str`` nor a sequence of ``str``.
        """
        if isinstance(text, str):
            return self._sp.encode(text, out_type=int, add_bos=bool(add_bos), add_eos=bool(add_eos))
        if isinstance(text, (list, tuple)):
            for i, t in enumerate(text):
                if not isinstance(t, str):
                    raise TypeError(f"text[{i}]: expected str, got {type(t).__name__}")
            if not text:
                return []
            return self._sp.encode(list(text), out_type=int, add_bos=bool(add_bos), add_eos=bool(add_eos))
        raise TypeError(f"text: expected str or list of str, got {type(text).__name__}")

    def _check_ids(self, ids, name: str) -> list[int]:
        arr = np.asarray(ids)
        if arr.size == 0:
            return []
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{name}: expected a 1-D sequence of int token ids, got {arr.dtype} of shape {arr.shape}")
        bad = (arr < 0) | (arr >= self.vocab_size)
        if bad.any():
            j = int(np.argmax(bad))
            raise ValueError(f"{name}[{j}]={int(arr[j])} out of range [0, {self.vocab_size})")
        return arr.tolist()

    def decode(self, ids: Sequence[int] | Sequence[Sequence[int]] | np.ndarray) -> str | list[str]:
        """Decode token ids to text.

        Args:
          ids: ``list[int]`` / int array of shape ``[T]`` -> ``str``; ``list[list[int]]`` / int array of
            shape ``[B, T]`` -> ``list[str]``. Control tokens (BOS/EOS/PAD) decode to ``""``.

        Raises:
          TypeError: ``ids`` is not a (nested) sequence of ints.
          ValueError: an id is outside ``[0, vocab_size)``.
        """
        if isinstance(ids, np.ndarray):
            if ids.ndim == 2:
                return [self._sp.decode(self._check_ids(row, f"ids[{b}]")) for b, row in enumerate(ids)]
            return self._sp.decode(self._check_ids(ids, "ids"))
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise TypeError(f"ids: expected list[int] or list[list[int]], got {type(ids).__name__}")
        if len(ids) > 0 and isinstance(ids[0], (list, tuple, np.ndarray)):
            return [self._sp.decode(self._check_ids(row, f"ids[{b}]")) for b, row in enumerate(ids)]
        return self._sp.decode(self._check_ids(ids, "ids"))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, model_path={str(self._model_path)!r})"
