"""The chat format of the project's SentencePiece tokenizer: Jinja template, rendering, ids + assistant mask.

One conversation is rendered as (``<s>`` is the tokenizer's BOS piece, the role and end tokens are the reserved
``CHAT_TOKENS`` of :mod:`mani_jax.tokenizer`, ids 4..7)::

    <s><|system|>You are terse.<|end|>\\n<|user|>What is 2+3?<|end|>\\n<|assistant|>5<|end|>\\n

and a generation prompt (``add_generation_prompt=True``) appends ``<|assistant|>``: the model writes the reply and
ends it with ``<|end|>``, which llama.cpp's vocabulary loader marks end-of-generation by its spelling (so
``create_chat_completion`` stops there). Every boundary between a role header, a message's content and
``<|end|>`` is a special token, so tokenizing the whole rendered string (llama.cpp: ``tokenize(special=True)``)
and tokenizing each part on its own give the same ids; :func:`encode_chat` relies on that to build the assistant
mask without character offsets.

:data:`CHAT_TEMPLATE` is the string to store as GGUF ``tokenizer.chat_template``
(``export_gguf(..., chat_template=CHAT_TEMPLATE)``). :func:`render_chat` renders it exactly as
llama-cpp-python 0.3.36's ``Jinja2ChatFormatter`` does (``llama_cpp/llama_chat_format.py``): a sandboxed Jinja2
environment with ``trim_blocks``, ``lstrip_blocks`` and the ``loopcontrols`` extension, and the variables
``messages``, ``bos_token``, ``eos_token`` (the texts of the GGUF's BOS/EOS tokens), ``add_generation_prompt``,
``raise_exception`` and ``strftime_now``. llama-cpp-python then tokenizes the prompt with ``add_bos=False,
special=True`` (the formatter reports ``added_special=True``), which is why the template writes ``bos_token``
itself; :func:`tokenize_with_special` is that tokenization for a :class:`~mani_jax.tokenizer.Tokenizer`.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, Sequence

import numpy as np

from mani_jax.tokenizer import CHAT_TOKENS, TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN, Tokenizer

__all__ = [
    "ROLES",
    "SYSTEM_TOKEN",
    "USER_TOKEN",
    "ASSISTANT_TOKEN",
    "END_TOKEN",
    "CHAT_TEMPLATE",
    "render_chat",
    "encode_chat",
    "encode_prompt",
    "tokenize_with_special",
    "detokenize_with_special",
    "check_messages",
]

SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN = CHAT_TOKENS
#: The roles the template accepts; each has the header token ``<|role|>``.
ROLES: tuple[str, ...] = ("system", "user", "assistant")

#: Jinja chat template (transformers / llama-cpp-python conventions). Written on one line on purpose: with
#: ``trim_blocks``/``lstrip_blocks`` any newline between tags would be significant.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('chat roles are system, user and assistant; got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_TEMPLATE_CACHE: dict[str, Any] = {}


def _compiled(template: str):
    """The template compiled in the environment llama-cpp-python's ``Jinja2ChatFormatter`` builds."""
    if template not in _TEMPLATE_CACHE:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class _IgnoreGenerationTags(jinja2.ext.Extension):
            """``{% generation %}...{% endgeneration %}`` renders its body (as llama-cpp-python and transformers)."""

            tags = {"generation"}

            def parse(self, parser):
                parser.stream.skip(1)
                return parser.parse_statements(("name:endgeneration",), drop_needle=True)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_IgnoreGenerationTags, jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        _TEMPLATE_CACHE[template] = env.from_string(template)
    return _TEMPLATE_CACHE[template]


def _raise_exception(message: str):
    raise ValueError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def check_messages(messages: Any, *, reserved: Sequence[str] = ()) -> list[dict[str, str]]:
    """Validate a conversation and return it as a list of plain ``{"role", "content"}`` dicts.

    Args:
      messages: a non-empty sequence of dicts with ``role`` in :data:`ROLES` and ``content`` a ``str``.
      reserved: strings a content must not contain (the tokenizer's special pieces: a content spelling
        ``<|end|>`` would be read as the end-of-turn token by llama.cpp's ``special=True`` tokenization).

    Raises:
      ValueError: ``messages`` is not a non-empty list of such dicts (the message naming the bad index and key),
        or a content contains a reserved string.
    """
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages: expected a list of {{'role': str, 'content': str}} dicts, "
                         f"got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages: expected at least one message, got an empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"messages[{i}]: missing {key!r} (keys: {sorted(m)})")
            if not isinstance(m[key], str):
                raise ValueError(f"messages[{i}][{key!r}]: expected str, got {type(m[key]).__name__}")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}]['role']: expected one of {ROLES}, got {m['role']!r}")
        for piece in reserved:
            if piece and piece in m["content"]:
                raise ValueError(f"messages[{i}]['content'] contains the reserved token text {piece!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = True, *, bos_token: str = "<s>",
                eos_token: str = "</s>", template: str = CHAT_TEMPLATE) -> str:
    """Render ``messages`` with a Jinja chat template exactly as llama-cpp-python's ``create_chat_completion`` does.

    Args:
      messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]`` (non-empty).
      add_generation_prompt: append the assistant header (``<|assistant|>``) so the model writes the reply.
        llama-cpp-python always passes ``True``; training data uses ``False``.
      bos_token, eos_token: the texts llama-cpp-python passes (the GGUF's BOS/EOS token texts; for this
        project's tokenizer ``"<s>"`` and ``"</s>"``).
      template: the Jinja source (default :data:`CHAT_TEMPLATE`).

    Returns:
      The prompt string (it starts with ``bos_token``; tokenize it with :func:`tokenize_with_special`).

    Raises:
      ValueError: malformed ``messages`` (see :func:`check_messages`), or the template called
        ``raise_exception``.
      jinja2.TemplateError: ``template`` is not valid Jinja.

    Source: ``Jinja2ChatFormatter.__init__`` / ``__call__`` in llama-cpp-python 0.3.36
    (``llama_cpp/llama_chat_format.py``); equality is tested in ``tests/test_chat.py``.
    """
    msgs = check_messages(messages)
    return _compiled(template).render(
        messages=msgs, eos_token=eos_token, bos_token=bos_token, raise_exception=_raise_exception,
        add_generation_prompt=bool(add_generation_prompt), functions=None, function_call=None, tools=None,
        tool_choice=None, strftime_now=_strftime_now)


# ------------------------------------------------------------------------------------------- tokenization
def _special_pieces(tokenizer: Tokenizer) -> dict[str, int]:
    """``{piece: id}`` of the pieces llama.cpp parses when ``special=True`` (control, user-defined, unknown)."""
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer: expected a mani_jax.tokenizer.Tokenizer, got {type(tokenizer).__name__}")
    return dict(tokenizer.special_ids)


def _split_special(text: str, specials: dict[str, int]) -> list[str]:
    """``text`` cut before and after every occurrence of a special piece (longest piece first)."""
    pattern = "(" + "|".join(re.escape(p) for p in sorted(specials, key=len, reverse=True)) + ")"
    return [part for part in re.split(pattern, text) if part]


def tokenize_with_special(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with special-token texts parsed as their ids (llama.cpp ``tokenize(special=True)``).

    ``text`` is cut at every occurrence of a special piece of ``tokenizer`` (``<unk> <s> </s> <pad>`` and the
    chat tokens; the longest match wins); the pieces become their ids, the text between them is encoded with
    ``tokenizer.encode`` (no BOS/EOS added). Plain ``tokenizer.encode`` already matches the user-defined chat
    tokens, but never the control tokens ``<s>``/``</s>``/``<pad>``.

    Raises:
      TypeError: ``tokenizer`` is not a :class:`~mani_jax.tokenizer.Tokenizer` or ``text`` is not a ``str``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected str, got {type(text).__name__}")
    specials = _special_pieces(tokenizer)
    ids: list[int] = []
    for part in _split_special(text, specials):
        if part in specials:
            ids.append(specials[part])
        else:
            ids.extend(tokenizer.encode(part))
    return ids


def detokenize_with_special(tokenizer: Tokenizer, ids: Sequence[int] | np.ndarray) -> str:
    """Text of ``ids`` with control and unknown tokens written as their pieces (llama.cpp
    ``detokenize(special=True)``); the inverse of :func:`tokenize_with_special` on its outputs.

    Raises:
      TypeError / ValueError: as :meth:`Tokenizer.decode` (non-int ids, ids out of range).
    """
    _special_pieces(tokenizer)
    arr = np.asarray(ids)
    if arr.size == 0:
        return ""
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"ids: expected a 1-D sequence of int token ids, got {arr.dtype} of shape {arr.shape}")
    out: list[str] = []
    run: list[int] = []
    for i in arr.tolist():
        t = tokenizer.token_type(i)
        if t in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN):
            if run:
                out.append(tokenizer.decode(run))
                run = []
            out.append(tokenizer.id_to_piece(i))
        else:
            run.append(i)
    if run:
        out.append(tokenizer.decode(run))
    return "".join(out)


def _parts(tokenizer: Tokenizer, msgs: list[dict[str, str]], add_generation_prompt: bool) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, trained)`` parts, mirroring :data:`CHAT_TEMPLATE`."""
    bos = tokenizer.id_to_piece(tokenizer.bos_id)
    parts = [(bos, False)]
    for m in msgs:
        is_asst = m["role"] == "assistant"
        parts += [(f"<|{m['role']}|>", False), (m["content"], is_asst), (END_TOKEN, is_asst), ("\n", False)]
    if add_generation_prompt:
        parts.append((ASSISTANT_TOKEN, False))
    return parts


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a conversation and the mask of the tokens the model must learn to produce.

    The ids are those of ``tokenize_with_special(tokenizer, render_chat(messages, add_generation_prompt))``
    (what llama.cpp feeds the model for the same conversation), starting with BOS. ``assistant_mask[t]`` is
    True exactly for the tokens of every assistant message's content and the ``<|end|>`` token that closes that
    message; role headers, system/user contents, the ``\\n`` after each ``<|end|>``, BOS and a trailing
    generation prompt are False.

    For next-token training on a row ``ids`` the target of input position ``t`` is ``ids[t + 1]``, so the loss
    mask of the shifted pair is ``assistant_mask[1:]`` (:mod:`mani_jax.data.pipeline` does this shift when
    given ``target_masks``).

    Args:
      tokenizer: a :class:`~mani_jax.tokenizer.Tokenizer` with the reserved chat tokens (every tokenizer trained
        by :func:`~mani_jax.tokenizer.train_tokenizer` has them, ids 4..7).
      messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``; contents must not contain
        the text of a special token.
      add_generation_prompt: append ``<|assistant|>`` (for prompting; training uses ``False``).

    Returns:
      ``(ids, assistant_mask)``: int32 ``[T]`` and bool ``[T]``.

    Raises:
      ValueError: malformed ``messages``, a content containing special-token text, or a tokenizer without
        the chat tokens / BOS.
      TypeError: ``tokenizer`` is not a :class:`~mani_jax.tokenizer.Tokenizer`.
    """
    specials = _special_pieces(tokenizer)
    missing = [p for p in CHAT_TOKENS if p not in specials]
    if missing or tokenizer.bos_id < 0:
        raise ValueError(f"tokenizer: lacks the chat tokens {missing} or BOS (train it with "
                         "mani_jax.tokenizer.train_tokenizer)")
    msgs = check_messages(messages, reserved=tuple(specials))
    ids: list[int] = []
    mask: list[bool] = []
    for text, trained in _parts(tokenizer, msgs, add_generation_prompt):
        part = [specials[text]] if text in specials else tokenizer.encode(text)
        ids.extend(part)
        mask.extend([trained] * len(part))
    return np.asarray(ids, np.int32), np.asarray(mask, np.bool_)


def encode_prompt(tokenizer: Tokenizer, messages: Sequence[dict]) -> np.ndarray:
    """Ids of ``messages`` followed by the generation prompt ``<|assistant|>``: what to feed the model to get a
    reply (stop at ``<|end|>``). int32 ``[T]``. Errors as :func:`encode_chat`."""
    return encode_chat(tokenizer, messages, add_generation_prompt=True)[0]
