"""Text in and out of the server: one interface over both tokenizers, chat prompts, streamed detokenization
with stop strings.

:class:`TextCodec` wraps a :class:`mani_jax.tokenizer.Tokenizer` (SentencePiece, our runs and GGUF files) or a
:class:`mani_jax.hf_tokenizer.HFTokenizer` (Hugging Face directories). :class:`TextStream` turns generated
token ids into text deltas the way a streaming client must see them: never half a UTF-8 character, and
never any part of a stop string (text that could still become a stop string is held back until it cannot).
"""

from __future__ import annotations

import re
from typing import Sequence

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TextCodec:
    """Encode prompts, render chats and decode tokens for one model's tokenizer.

    Args:
      tokenizer: a :class:`~mani_jax.tokenizer.Tokenizer` or :class:`~mani_jax.hf_tokenizer.HFTokenizer`.

    Attributes:
      eos_ids: token ids that end a generation (the tokenizer's end-of-sequence ids, plus ``<|end|>`` for
        our SentencePiece tokenizers, which ends an assistant turn).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.is_hf = hasattr(tokenizer, "apply_chat_template")
        if self.is_hf:
            self.eos_ids = tuple(tokenizer.eos_ids)
        else:
            ids = {tokenizer.eos_id}
            try:
                ids.add(tokenizer.piece_to_id("<|end|>"))
            except (KeyError, ValueError):
                pass
            self.eos_ids = tuple(sorted(i for i in ids if i is not None and i >= 0))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def encode(self, text: str) -> list[int]:
        """A completion prompt: the text's ids (with BOS where the tokenizer's models expect one)."""
        if self.is_hf:
            return self.tokenizer.encode(text)
        return self.tokenizer.encode(text, add_bos=True)

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """The ids of ``messages`` rendered by the model's chat template, ending with the assistant header.

        Raises:
          ValueError: the model has no chat template, or a message is malformed (``role``/``content``).
        """
        if self.is_hf:
            if self.tokenizer.chat_template is None:
                raise ValueError("messages: this model has no chat template; use /v1/completions")
            return self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        from mani_jax.chat import encode_prompt

        return [int(t) for t in encode_prompt(self.tokenizer, messages)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens dropped)."""
        if not ids:
            return ""
        if self.is_hf:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)
        return self.tokenizer.decode(list(ids))

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token contributes to the text (for ``logprobs``' ``token`` and ``bytes`` fields)."""
        if self.is_hf:
            return self.tokenizer.decode([token]).encode("utf-8", "replace")
        piece = self.tokenizer.id_to_piece(token)
        m = _BYTE_PIECE.match(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        if self.tokenizer.token_type(token) in (2, 3):  # unknown / control: contributes nothing
            return b""
        return piece.replace("\u2581", " ").encode("utf-8")

    def token_str(self, token: int) -> str:
        return self.token_bytes(token).decode("utf-8", "replace")


class TextStream:
    """Incremental detokenizer for one generated sequence, with stop strings.

    Each :meth:`push` adds a token and returns the text that is now safe to send. Text is held back while
    it ends in an incomplete UTF-8 sequence (decoded as U+FFFD) or while its tail is a prefix of a stop
    string. When a stop string appears, the text before it is returned and :attr:`stopped` is set; the stop
    string itself is never returned (OpenAI's contract).

    Args:
      codec: the model's :class:`TextCodec`.
      stop: up to a few stop strings (empty strings are ignored).
      context: the prompt's ids (its last few are decoded with the output so the first word keeps its
        leading space).
    """

    def __init__(self, codec: TextCodec, stop: Sequence[str] = (), context: Sequence[int] = ()):
        self.codec = codec
        self.stop = [s for s in stop if s]
        # Decoding is done after a few prompt tokens and their text cut off: tokenizers drop the leading
        # space of a sequence's first word, which a continuation must keep.
        self.context = [int(t) for t in context][-4:]
        self._context_text = codec.decode(self.context)
        if "\ufffd" in self._context_text or not codec.decode(self.context + [0]).startswith(self._context_text):
            self.context, self._context_text = [], ""
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already returned
        self.text = ""  # the full text returned so far
        self.stopped = False

    def _emit_to(self, decoded: str, end: int) -> str:
        delta = decoded[self.sent:end]
        self.sent = end
        self.text += delta
        return delta

    def push(self, token: int) -> str:
        """Add one generated token; returns the new text that may be sent (possibly ``""``)."""
        if self.stopped:
            raise RuntimeError("push after a stop string was found")
        self.ids.append(int(token))
        decoded = self._decoded()
        if self.stop:
            start = max(0, self.sent - max(len(s) for s in self.stop) + 1)
            hits = [i for i in (decoded.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._emit_to(decoded, max(min(hits), self.sent))
        full = len(decoded)
        while full > self.sent and decoded[full - 1] == "\ufffd":
            full -= 1  # an incomplete multi-byte character: wait for its other bytes
        end = full
        for s in self.stop:  # hold back the longest tail that could still grow into a stop string
            for k in range(min(len(s) - 1, full - self.sent), 0, -1):
                if decoded.endswith(s[:k], 0, full):
                    end = min(end, full - k)
                    break
        return self._emit_to(decoded, max(end, self.sent))

    def _decoded(self) -> str:
        text = self.codec.decode(self.context + self.ids)
        return text[len(self._context_text):]

    def flush(self) -> str:
        """At the end of generation (no stop string found): the text still held back."""
        if self.stopped:
            return ""
        decoded = self._decoded()
        return self._emit_to(decoded, max(len(decoded), self.sent))
