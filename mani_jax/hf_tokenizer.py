"""Hugging Face tokenizers (``tokenizer.json``) and chat templates, for imported checkpoints such as Qwen2.5.

:class:`HFTokenizer` wraps the ``tokenizers`` library (the Rust byte-level BPE that transformers uses; nothing is
reimplemented here) and reads the files that sit beside the weights:

- ``tokenizer.json``: the tokenizer itself, added/special tokens included (required);
- ``tokenizer_config.json``: ``bos_token`` / ``eos_token`` / ``pad_token`` / ``unk_token``, ``chat_template``
  and ``add_bos_token`` (``special_tokens_map.json`` fills in missing special tokens; ``chat_template.jinja``,
  which newer transformers write, overrides the config's template);
- ``generation_config.json`` (optional): its ``eos_token_id`` (an int or a list) adds stop ids; Qwen2.5-Instruct
  stops on both ``<|im_end|>`` and ``<|endoftext|>``.

It has the duck-typed interface of :class:`mani_jax.tokenizer.Tokenizer` where that makes sense (``encode``,
``decode``, ``bos_id``, ``eos_id``, ``pad_id``, ``vocab_size``), plus ``eos_ids`` (every stop id) and the chat
template rendered the way transformers renders it: a sandboxed Jinja2 environment with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception`` / ``strftime_now`` globals, a ``tojson``
filter that does not escape HTML, and the special tokens as variables.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def _token_str(v: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string, an AddedToken dict, or null."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    raise ValueError(f"tokenizer_config.json: special token {v!r} is neither a string nor an AddedToken dict")


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _select_template(raw: Any, source: Path) -> str | None:
    """``chat_template`` is a string, or a list of ``{"name", "template"}`` (the one named ``default`` is used)."""
    if raw is None or isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        named = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        raise ValueError(f"{source}: chat_template is a list with no 'default' entry (names: {sorted(named)})")
    raise ValueError(f"{source}: chat_template: expected a string or a list, got {type(raw).__name__}")


def _compile_template(source: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask tag): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Like transformers: Jinja's own tojson escapes HTML characters, which chat templates must not.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def _check_messages(messages: Any) -> list[dict]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages: expected a list of {{'role': str, 'content': str}} dicts, "
                         f"got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages: expected at least one message, got an empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"messages[{i}]: missing {key!r} (keys: {sorted(m)})")
            if not isinstance(m[key], str):
                raise ValueError(f"messages[{i}][{key!r}]: expected str, got {type(m[key]).__name__}")
    return [dict(m) for m in messages]


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` tokenizer with its special tokens and chat template.

    Construct with :meth:`HFTokenizer.load`. Token ids are Python ``int``\\ s in ``[0, vocab_size)``.
    """

    def __init__(self, tokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None, chat_template: str | None = None,
                 add_bos_token: bool = False, extra_eos_ids: Sequence[int] = (), path: Path | None = None):
        self._tok = tokenizer
        self._path = path
        self.chat_template = chat_template
        self.add_bos_token = bool(add_bos_token)
        self.special_tokens = {k: v for k, v in dict(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                                                     unk_token=unk_token).items() if v is not None}
        self.bos_id = self._special_id(bos_token, "bos_token")
        self.eos_id = self._special_id(eos_token, "eos_token")
        self.pad_id = self._special_id(pad_token, "pad_token")
        self.unk_id = self._special_id(unk_token, "unk_token")
        ids = ([self.eos_id] if self.eos_id is not None else []) + [int(i) for i in extra_eos_ids]
        for i in ids:
            self._check_id(i, "eos_token_id")
        self.eos_ids: list[int] = list(dict.fromkeys(ids))  # every stop id, tokenizer's eos first
        if self.eos_id is None and self.eos_ids:
            self.eos_id = self.eos_ids[0]
        self._template = None

    def _special_id(self, token: str | None, name: str) -> int | None:
        if token is None:
            return None
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{self._path or 'tokenizer'}: {name} {token!r} is not in tokenizer.json's vocabulary")
        return int(i)

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, path: str | os.PathLike) -> "HFTokenizer":
        """Load the tokenizer files of a Hugging Face model directory (see the module docstring).

        Raises:
          FileNotFoundError: ``path`` is not a directory.
          ValueError: no ``tokenizer.json``, unreadable JSON, or a special token that is not in the vocabulary.
        """
        from tokenizers import Tokenizer as _RustTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: not a directory (expected a Hugging Face model directory)")
        tj = path / "tokenizer.json"
        if not tj.exists():
            raise ValueError(f"{path}: no tokenizer.json (only the fast-tokenizer format of the `tokenizers` "
                             "library is supported; tokenizer.model / vocab.json + merges.txt alone are not)")
        try:
            tok = _RustTokenizer.from_file(str(tj))
        except Exception as e:  # the Rust side raises a plain Exception for a malformed file
            raise ValueError(f"{tj}: could not be read by the tokenizers library ({e})") from e
        cfg = _read_json(path / "tokenizer_config.json")
        stm = _read_json(path / "special_tokens_map.json")
        gen = _read_json(path / "generation_config.json")

        def special(name):
            return _token_str(cfg[name]) if cfg.get(name) is not None else _token_str(stm.get(name))

        template = _select_template(cfg.get("chat_template"), path / "tokenizer_config.json")
        jinja_file = path / "chat_template.jinja"
        if jinja_file.exists():
            template = jinja_file.read_text(encoding="utf-8")
        elif template is None and (path / "chat_template.json").exists():
            template = _select_template(_read_json(path / "chat_template.json").get("chat_template"),
                                        path / "chat_template.json")
        gen_eos = gen.get("eos_token_id")
        gen_eos = [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
        if not all(isinstance(i, int) for i in gen_eos):
            raise ValueError(f"{path / 'generation_config.json'}: eos_token_id {gen.get('eos_token_id')!r}: "
                             "expected an int or a list of ints")
        return cls(tok, bos_token=special("bos_token"), eos_token=special("eos_token"),
                   pad_token=special("pad_token"), unk_token=special("unk_token"), chat_template=template,
                   add_bos_token=bool(cfg.get("add_bos_token", False)), extra_eos_ids=gen_eos, path=path)

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (``len(tokenizer)`` in transformers)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        i = self._tok.token_to_id(token)
        return None if i is None else int(i)

    def id_to_token(self, id: int) -> str:  # noqa: A002 - the field's name
        return self._tok.id_to_token(self._check_id(id))

    def _check_id(self, i, name: str = "id") -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"{name}: expected int, got {type(i).__name__}")
        if not 0 <= int(i) < self.vocab_size:
            raise ValueError(f"{name}={int(i)} out of range [0, {self.vocab_size})")
        return int(i)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str | Sequence[str], add_bos: bool = False,
               add_eos: bool = False) -> list[int] | list[list[int]]:
        """Encode ``text`` (a ``str``, or a list of them) to ids.

        Special tokens written in the text (``<|im_start|>``...) become their single ids. Nothing is added unless
        asked: ``add_bos`` prepends ``bos_id`` (ignored when the tokenizer has none, as Qwen2's has not) and
        ``add_eos`` appends ``eos_id``. The tokenizer.json post-processor is not run.
        """
        if isinstance(text, (list, tuple)):
            for i, t in enumerate(text):
                if not isinstance(t, str):
                    raise TypeError(f"text[{i}]: expected str, got {type(t).__name__}")
            return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in text]
        if not isinstance(text, str):
            raise TypeError(f"text: expected str or list of str, got {type(text).__name__}")
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str | list[str]:
        """Decode ids (``[T]`` -> ``str``, ``[B, T]`` -> ``list[str]``). Special tokens are kept, as in
        transformers, unless ``skip_special_tokens``."""
        arr = np.asarray(ids)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"ids: expected int token ids, got {arr.dtype}")
        if arr.ndim == 2:
            return [self.decode(row, skip_special_tokens) for row in arr]
        if arr.ndim > 1:
            raise TypeError(f"ids: expected shape [T] or [B, T], got {arr.shape}")
        bad = (arr < 0) | (arr >= self.vocab_size)
        if bad.any():
            j = int(np.argmax(bad))
            raise ValueError(f"ids[{j}]={int(arr[j])} out of range [0, {self.vocab_size})")
        return self._tok.decode(arr.astype(np.int64).tolist(), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True, *,
                            tools: list | None = None, **kwargs) -> str:
        """Render ``messages`` (``[{"role": ..., "content": ...}, ...]``) with the model's chat template.

        ``tools`` and any ``kwargs`` (e.g. ``enable_thinking``) are passed to the template as variables, as
        transformers does.

        Raises:
          ValueError: the tokenizer has no chat template, or ``messages`` is malformed.
          jinja2.TemplateError: the template itself raised (``raise_exception``) or is invalid.
        """
        if not self.chat_template:
            raise ValueError(f"{self._path or 'tokenizer'}: no chat_template (tokenizer_config.json has none; a base "
                             "model may need a template supplied via `tok.chat_template = ...`)")
        msgs = _check_messages(messages)
        if self._template is None or self._template[0] != self.chat_template:
            self._template = (self.chat_template, _compile_template(self.chat_template))
        variables = {**self.special_tokens, **kwargs}
        return self._template[1].render(messages=msgs, tools=tools, documents=None,
                                        add_generation_prompt=bool(add_generation_prompt), **variables)

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """:meth:`apply_chat_template`, then :meth:`encode` without adding special tokens (the template writes
        them), as transformers' ``apply_chat_template(tokenize=True)`` does."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs))

    def __repr__(self) -> str:
        return (f"HFTokenizer(vocab_size={self.vocab_size}, eos_ids={self.eos_ids}, "
                f"chat_template={'yes' if self.chat_template else 'no'}, path={str(self._path)!r})")
