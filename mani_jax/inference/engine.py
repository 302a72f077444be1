"""The inference engine: paged KV cache, iteration-level continuous batching, chunked prefill, prefix caching.

One :class:`Engine` serves one :class:`~mani_jax.models.HybridLM` (all-attention, hybrid Mamba-2 + attention,
MoE; float or weight-quantized with :func:`mani_jax.models.quantize.quantize_model`).

Memory. Attention layers keep their keys and values in ``n_pages`` pages of ``page_size`` tokens
(:mod:`mani_jax.core.paged_attention` layout, plus one scratch page that padding rows write to); Mamba-2
layers keep conv + SSM state in ``max_batch`` slots. Everything is allocated once, at construction, from
the configuration. A request reserves the pages for its whole prompt + ``max_new_tokens`` when it is
admitted, so a running request never runs out; a request that does not fit now waits in the queue, and one
that could never fit is refused by :meth:`Engine.add_request` with a ``ValueError``.

Scheduling (Orca-style iteration-level batching, Yu et al. 2022; chunked prefill as in Sarathi / vLLM). Each
:meth:`Engine.step`:

1. admits waiting requests first-come-first-served while a slot and their pages are available, mapping any
   prefix-cache hit into the block table (its prefill is skipped);
2. prefills prompt chunks within a token budget ``prefill_budget``: a chunk is the largest power of two that
   fits the budget and the rest of the prompt, so a prompt is split without padding and there are at most
   ``log2(prefill_budget) + 1`` prefill programs; a finished prompt samples its first token;
3. runs one decode step for every request in its decode phase (including those whose prompt finished in
   step 2), as one batch of fixed shape ``[max_batch, 1]`` (empty rows write to a scratch page and a scratch
   state slot and are ignored): one decode program.

Shapes are fixed per program, so ``jax.jit`` compiles a bounded number of programs (:attr:`Engine.n_programs`).

Prefix caching (:class:`~mani_jax.inference.pages.PagePool`): full prompt pages are registered under a hash
chained over their tokens; for hybrid models each registered page also stores the Mamba-2 state at its end
(taken at prefill-chunk ends, which fall on page boundaries), and a hit is cut back to the last page with a
state, which is restored into the new request's slot. For all-attention models, pages filled while decoding
are registered too (a follow-up turn that repeats the conversation hits them).

Sampling: each request has its own :class:`SamplingParams`; token ``i`` of a request uses the key
``fold_in(PRNGKey(seed), i)``, so a request's tokens do not depend on what it was batched with.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections import deque
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mani_jax.core.speculative import prompt_lookup_draft, speculative_verify
from mani_jax.inference.pages import PagePool


#: Most alternatives :attr:`SamplingParams.logprobs` can ask for (OpenAI's ``top_logprobs`` limit).
MAX_TOP_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one request.

    Attributes:
      temperature: 0 = greedy (argmax); > 0 divides the logits.
      top_k: keep the k most likely tokens (0 = all). top_p: nucleus mass in (0, 1] (1 = all).
      seed: PRNG seed of this request.
      max_new_tokens: generate at most this many tokens (>= 1).
      stop_token_ids: stop after emitting any of these (the stop token is returned).
      logprobs: ``None`` = no log-probabilities; ``k >= 0`` = record, for every generated token, its
        log-probability and the ``k`` most likely tokens with theirs (``k <= MAX_TOP_LOGPROBS``). They are
        the model's own distribution, ``log_softmax(logits)`` before temperature / top-k / top-p (what
        OpenAI's API and vLLM's default report).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature: expected >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: expected >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: expected in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed: expected an int in [0, 2**32), got {self.seed}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {self.max_new_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs: expected None or an int in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")


@dataclasses.dataclass
class Request:
    """A request's state inside the engine (read-only for callers)."""

    request_id: int
    prompt: list[int]
    params: SamplingParams
    tokens: list[int] = dataclasses.field(default_factory=list)  # generated so far
    status: str = "waiting"  # waiting | prefill | decode | finished
    finish_reason: str | None = None  # stop | length | cancelled
    slot: int = -1
    pages: list[int] = dataclasses.field(default_factory=list)
    n_computed: int = 0  # prompt tokens whose keys are in the cache
    prefix_hit_tokens: int = 0
    n_registered_pages: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    # per generated token, when params.logprobs is set: (logprob, top ids, top logprobs)
    logprobs: list[tuple[float, list[int], list[float]]] = dataclasses.field(default_factory=list)
    n_accepted: int = 0  # speculative decoding: draft tokens accepted / rejected
    n_rejected: int = 0

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def length(self) -> int:
        """Tokens whose keys are (or are being) cached: prompt so far + generated tokens fed back."""
        return self.n_computed + max(len(self.tokens) - 1, 0)


def _filtered(lg, t, k, p):
    """One row's logits ``[V]`` divided by temperature ``t`` (when > 0), with tokens outside the top ``k``
    (ties at the boundary kept) and outside the top-``p`` nucleus set to ``-inf``."""
    x = lg.astype(jnp.float32) / jnp.where(t > 0, t, 1.0)
    srt = jnp.sort(x)[::-1]
    kth = srt[jnp.clip(k - 1, 0, x.shape[0] - 1)]
    x = jnp.where((k > 0) & (x < kth), -jnp.inf, x)
    order = jnp.argsort(-x)
    probs = jax.nn.softmax(x[order])
    before = jnp.cumsum(probs) - probs
    keep = jnp.zeros_like(x, dtype=bool).at[order].set(before < p)
    return jnp.where((p < 1.0) & ~keep, -jnp.inf, x)


def _probs_rows(logits, temperature, top_k, top_p):
    """The sampling distribution of each position: ``logits [B, T, V]``, per-row parameters ``[B]`` ->
    float32 ``[B, T, V]``; one-hot on the argmax for greedy rows (temperature 0). Speculative decoding
    verifies with these (Leviathan et al. 2023, Sec. 2.2: apply the same transform to p and q)."""
    def row(lg, t, k, p):
        soft = jax.vmap(lambda x: jax.nn.softmax(_filtered(x, t, k, p)))(lg)
        hard = jax.nn.one_hot(jnp.argmax(lg, axis=-1), lg.shape[-1], dtype=jnp.float32)
        return jnp.where(t > 0, soft, hard)

    return jax.vmap(row)(logits, temperature, top_k, top_p)


def _probs_fast(logits, temperature, top_k, top_p):
    """:func:`_probs_rows`, computing only the one-hot argmax when every row is greedy."""
    hard = lambda: jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jax.lax.cond(jnp.all(temperature == 0), hard, lambda: _probs_rows(logits, temperature, top_k, top_p))


def _sample_rows(logits, seeds, counters, temperature, top_k, top_p):
    """Per-row sampling with per-row parameters: ``logits [B, V]``; ``seeds``, ``counters`` int ``[B]`` (row
    ``b`` uses the key ``fold_in(PRNGKey(seeds[b]), counters[b])``); ``temperature``, ``top_k``, ``top_p`` ``[B]``.

    Matches :func:`mani_jax.core.sampling.sample_token` row by row with that key (greedy when temperature
    is 0; top-k keeps ties at the boundary; top-p keeps the smallest prefix of the sorted distribution
    reaching p). When every row is greedy only the argmax is computed.
    """
    def one(lg, seed, counter, t, k, p):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), counter)
        sampled = jax.random.categorical(key, _filtered(lg, t, k, p)).astype(jnp.int32)
        return jnp.where(t > 0, sampled, jnp.argmax(lg).astype(jnp.int32))

    greedy = lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32)
    full = lambda: jax.vmap(one)(logits, seeds, counters, temperature, top_k, top_p)
    return jax.lax.cond(jnp.all(temperature == 0), greedy, full)


def _token_logprobs(logits, tokens):
    """``logits [B, V]``, chosen ``tokens [B]`` -> (their logprobs ``[B]``, the ``MAX_TOP_LOGPROBS`` most likely
    ids ``[B, K]`` and logprobs ``[B, K]``), from ``log_softmax`` of the raw logits in float32."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(lp, min(MAX_TOP_LOGPROBS, lp.shape[-1]))
    return chosen, top_ids, top_lp


class Engine:
    """Continuous-batching engine over a paged KV cache (see the module docstring).

    Args:
      model: a :class:`~mani_jax.models.HybridLM` (its weights are captured at construction).
      max_batch: sequences decoded together (= Mamba-2 state slots).
      page_size: tokens per KV page (a power of two).
      n_pages: KV pages for all attention layers; default enough for ``max_batch`` sequences of
        ``max_seq_len``. Memory: ``2 * n_attention_layers * n_pages * page_size * n_kv_heads * head_dim``
        elements of ``kv_dtype``.
      max_seq_len: longest prompt + generation (default ``model.config.max_seq_len``).
      prefill_budget: prompt tokens prefilled per step (a power of two >= page_size).
      prefix_caching: reuse cached full prompt pages across requests.
      kv_dtype: cache dtype (default: the model's parameter dtype).

    Raises:
      ValueError: on a non-power-of-two ``page_size`` / ``prefill_budget`` or non-positive sizes.
    """

    def __init__(self, model, *, max_batch: int = 8, page_size: int = 16, n_pages: int | None = None,
                 max_seq_len: int | None = None, prefill_budget: int = 64, prefix_caching: bool = True,
                 kv_dtype=None, draft=None, gamma: int | str = 4, max_gamma: int = 8, n_gram: int = 3):
        cfg = model.config
        if draft is not None and not (draft == "ngram" if isinstance(draft, str) else hasattr(draft, "config")):
            raise ValueError(f"draft: expected None, a HybridLM or 'ngram', got {draft!r}")
        if gamma == "adaptive":
            if max_gamma < 1:
                raise ValueError(f"max_gamma: expected >= 1, got {max_gamma}")
        elif not isinstance(gamma, int) or gamma < 1:
            raise ValueError(f"gamma: expected an int >= 1 or 'adaptive', got {gamma!r}")
        if draft is not None and not isinstance(draft, str) and draft.config.vocab_size != cfg.vocab_size:
            raise ValueError(f"draft: vocab_size {draft.config.vocab_size} differs from the model's {cfg.vocab_size}")
        if max_batch < 1:
            raise ValueError(f"max_batch: expected >= 1, got {max_batch}")
        if page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"page_size: expected a power of two, got {page_size}")
        if prefill_budget < page_size or prefill_budget & (prefill_budget - 1):
            raise ValueError(f"prefill_budget: expected a power of two >= page_size={page_size}, got {prefill_budget}")
        self.config = cfg
        self.max_batch, self.page_size, self.prefill_budget = max_batch, page_size, prefill_budget
        self.prefix_caching = prefix_caching
        self.max_seq_len = max_seq_len or cfg.max_seq_len
        # Speculative decoding (module docstring): a draft model, prompt lookup ("ngram") or none.
        self.draft_kind = None if draft is None else ("ngram" if isinstance(draft, str) else "model")
        self.adaptive_gamma = gamma == "adaptive"
        self.max_gamma = max_gamma if self.adaptive_gamma else gamma
        self.gamma = min(4, self.max_gamma) if self.adaptive_gamma else gamma
        self.n_gram = n_gram
        # A verification pass writes up to gamma + 1 keys past the last emitted token: reserve room for them.
        self._spec_extra = self.max_gamma + 1 if draft is not None else 0
        self.max_pages = -(-(self.max_seq_len + self._spec_extra) // page_size)
        self.n_pages = n_pages if n_pages is not None else max_batch * self.max_pages
        if self.n_pages < 1:
            raise ValueError(f"n_pages: expected >= 1, got {self.n_pages}")
        self.scratch_page = self.n_pages  # padding rows write here; never allocated
        self.scratch_slot = max_batch  # likewise for the Mamba-2 state
        self.has_attention = cfg.n_attention_layers > 0
        self.has_mamba = cfg.n_mamba_layers > 0
        self._graphdef, self._state = nnx.split(model)
        self._init_cache = lambda: model.init_paged_cache(self.n_pages + 1, page_size, max_batch + 1, kv_dtype)
        self._mamba_idx = [i for i, t in enumerate(cfg.layer_types) if t != "attention"]
        self._draft_mamba_idx: list[int] = []
        if self.draft_kind == "model":
            self._dgraphdef, self._dstate = nnx.split(draft)
            self._init_dcache = lambda: draft.init_paged_cache(self.n_pages + 1, page_size, max_batch + 1, kv_dtype)
            self._draft_mamba_idx = [i for i, t in enumerate(draft.config.layer_types) if t != "attention"]
        self.draft_has_mamba = bool(self._draft_mamba_idx)
        # Recurrent state to snapshot / restore per slot in either model (prefix cache, speculative rollback).
        self.any_mamba = self.has_mamba or self.draft_has_mamba
        self._round_time: dict[int, float] = {}  # adaptive gamma: EMA of a round's seconds per gamma
        self._accept_ema = 0.7
        self._programs: set[tuple] = set()
        self.reset()
        self._build_programs()

    def reset(self) -> None:
        """Forget every request and cached page (fresh zeroed caches); compiled programs are kept."""
        self.pool = PagePool(self.n_pages, self.page_size, prefix_caching=self.prefix_caching)
        # Committed to the device from the start, like every later (donated) cache, so jit sees one signature.
        self.cache = jax.device_put(self._init_cache(), jax.devices()[0])
        self.dcache = jax.device_put(self._init_dcache(), jax.devices()[0]) if self.draft_kind == "model" else None
        self.n_proposed = self.n_accepted = 0
        self._free_slots = list(range(self.max_batch - 1, -1, -1))
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self.requests: dict[int, Request] = {}
        self._next_id = 0
        self.n_steps = 0

    # ------------------------------------------------------------------ compiled programs
    def _build_programs(self):
        graphdef = self._graphdef

        def forward(state, cache, tokens, positions, block_tables, lengths, slots):
            model = nnx.merge(graphdef, state)
            return model.forward_paged(tokens, positions, cache, block_tables, lengths, slots)

        def prefill(state, cache, tokens, positions, block_tables, lengths, slots):
            logits, cache = forward(state, cache, tokens, positions, block_tables, lengths, slots)
            return logits[:, -1], cache

        def decode(state, cache, tokens, positions, block_tables, lengths, slots, seeds, counters, temp, top_k,
                   top_p, with_logprobs):
            logits, cache = forward(state, cache, tokens, positions, block_tables, lengths, slots)
            return sample(logits[:, 0], seeds, counters, temp, top_k, top_p, with_logprobs), cache

        def sample(logits, seeds, counters, temp, top_k, top_p, with_logprobs):
            tok = _sample_rows(logits, seeds, counters, temp, top_k, top_p)
            return tok, (_token_logprobs(logits, tok) if with_logprobs else None)

        def set_slot(idx, cache, slot, states):
            new = list(cache)
            for i, st in zip(idx, states):
                new[i] = {"conv": cache[i]["conv"].at[slot].set(st["conv"]),
                          "ssm": cache[i]["ssm"].at[slot].set(st["ssm"])}
            return new

        def get_slot(idx, cache, slot):
            return [{"conv": cache[i]["conv"][slot], "ssm": cache[i]["ssm"][slot]} for i in idx]

        self._prefill = jax.jit(prefill, donate_argnums=1)
        self._decode = jax.jit(decode, donate_argnums=1, static_argnums=12)
        self._sample = jax.jit(sample, static_argnums=6)
        self._set_slot = jax.jit(functools.partial(set_slot, self._mamba_idx), donate_argnums=0)
        self._get_slot = jax.jit(functools.partial(get_slot, self._mamba_idx))
        if self.draft_kind == "model":
            self._build_draft_programs(set_slot, get_slot)
        if self.draft_kind is not None:
            self._build_verify_program()

    def _build_draft_programs(self, set_slot, get_slot):
        dgraphdef, didx = self._dgraphdef, self._draft_mamba_idx

        def dprefill(dstate, dcache, tokens, positions, block_tables, lengths, slots):
            return nnx.merge(dgraphdef, dstate).forward_paged(tokens, positions, dcache, block_tables, lengths,
                                                              slots)[1]

        def propose(dstate, dcache, tokens, positions, block_tables, slots, seeds, counters, temp, top_k, top_p,
                    gamma):
            """gamma + 1 draft decode steps from ``tokens [B]`` at ``positions [B]``: the proposals ``[B, gamma]``,
            the distributions they were drawn from ``[B, gamma, V]``, the cache, and per Mamba-2 layer the slot
            state after each step (``[gamma + 1, B, ...]``). The last step only feeds the last proposal, so the
            draft has seen every token the target may accept."""
            model = nnx.merge(dgraphdef, dstate)

            def body(carry, j):
                dcache, tok = carry
                pos = positions + j
                logits, dcache = model.forward_paged(tok[:, None], pos[:, None], dcache, block_tables, pos + 1,
                                                     slots)
                q = _probs_fast(logits, temp, top_k, top_p)[:, 0]
                keys = jax.vmap(lambda sd, c: jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(sd), c),
                                                                 j + 1))(seeds, counters)
                sampled = jax.vmap(lambda k, qq: jax.random.categorical(k, jnp.log(qq)))(keys, q)
                nxt = jnp.where(temp > 0, sampled, jnp.argmax(logits[:, 0], axis=-1)).astype(jnp.int32)
                states = [{"conv": dcache[i]["conv"][slots], "ssm": dcache[i]["ssm"][slots]} for i in didx]
                return (dcache, nxt), (nxt, q, states)

            (dcache, _), (drafts, qs, states) = jax.lax.scan(body, (dcache, tokens), jnp.arange(gamma + 1))
            return drafts[:gamma].T, qs[:gamma].swapaxes(0, 1), dcache, states

        self._dprefill = jax.jit(dprefill, donate_argnums=1)
        self._propose = jax.jit(propose, donate_argnums=1, static_argnums=11)
        self._dset_slot = jax.jit(functools.partial(set_slot, didx), donate_argnums=0)
        self._dget_slot = jax.jit(functools.partial(get_slot, didx))

    def _build_verify_program(self):
        graphdef, idx, didx = self._graphdef, self._mamba_idx, self._draft_mamba_idx
        has_mamba, ngram = self.has_mamba, self.draft_kind == "ngram"

        def verify(state, cache, dcache, tokens, positions, block_tables, slots, q, dsteps, seeds, counters, temp,
                   top_k, top_p, with_logprobs):
            """The target scores ``tokens [B, g + 1]`` (last emitted token, then the g proposals) in one pass;
            :func:`speculative_verify` keeps each row's accepted prefix plus one token; both models' Mamba-2
            slots are set to their state after the last accepted token (attention needs no rollback: keys past
            a row's length are masked and later overwritten)."""
            model = nnx.merge(graphdef, state)
            lengths = positions[:, -1] + 1
            out = model.forward_paged(tokens, positions, cache, block_tables, lengths, slots, step_states=has_mamba)
            logits, cache = out[0], out[1]
            p = _probs_fast(logits, temp, top_k, top_p)
            drafts = tokens[:, 1:]
            if ngram:  # prompt lookup: the proposals are certain under q
                q = jax.nn.one_hot(drafts, logits.shape[-1], dtype=jnp.float32)
            keys = jax.vmap(lambda sd, c: jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(sd), c), 0))(
                seeds, counters)
            emitted, n_emit = jax.vmap(lambda k, d, qq, pp: speculative_verify(k, d[None], qq[None], pp[None]))(
                keys, drafts, q, p)
            emitted, n_emit = emitted[:, 0], n_emit[:, 0]
            last = n_emit - 1  # index of the state after the last accepted token
            rows = jnp.arange(tokens.shape[0])
            cache = list(cache)
            for k, i in enumerate(idx):
                st = out[2][k]
                cache[i] = {"conv": cache[i]["conv"].at[slots].set(st["conv"][rows, last]),
                            "ssm": cache[i]["ssm"].at[slots].set(st["ssm"][rows, last])}
            if dcache is not None:
                dcache = list(dcache)
                for k, i in enumerate(didx):
                    st = dsteps[k]
                    dcache[i] = {"conv": dcache[i]["conv"].at[slots].set(st["conv"][last, rows]),
                                 "ssm": dcache[i]["ssm"].at[slots].set(st["ssm"][last, rows])}
            lps = None
            if with_logprobs:
                b, t, v = logits.shape
                lps = jax.tree.map(lambda x: x.reshape(b, t, *x.shape[1:]),
                                   _token_logprobs(logits.reshape(b * t, v), emitted.reshape(b * t)))
            return emitted, n_emit, cache, dcache, lps

        self._verify = jax.jit(verify, donate_argnums=(1, 2), static_argnums=14)

    def warmup(self) -> None:
        """Compile every program the engine can use (each prefill chunk length, decode, sampling, slot
        state) on the scratch page and slot, so no later step waits for the compiler."""
        n = 1
        scratch = np.full((1, self.max_pages), self.scratch_page, np.int32)
        while n <= self.prefill_budget:
            logits, self.cache = self._run(("prefill", n), lambda: self._prefill(
                self._state, self.cache, np.zeros((1, n), np.int32), np.arange(n, dtype=np.int32)[None], scratch,
                np.asarray([n], np.int32), np.asarray([self.scratch_slot], np.int32)))
            n *= 2
        b = self.max_batch
        zf, zi, zu = np.zeros(b, np.float32), np.zeros(b, np.int32), np.zeros(b, np.uint32)
        tok, self.cache = self._run(("decode", False), lambda: self._decode(
            self._state, self.cache, np.zeros((b, 1), np.int32), np.zeros((b, 1), np.int32),
            np.full((b, self.max_pages), self.scratch_page, np.int32), zi, np.full(b, self.scratch_slot, np.int32),
            zu, zi, zf, zi, np.ones(b, np.float32), False))
        self._run(("sample", False), lambda: self._sample(logits, zu[:1], zi[:1], zf[:1], zi[:1], np.ones(1, np.float32),
                                                     False))
        if self.any_mamba:
            self._restore_slot(self.scratch_slot, self._slot_payload(self.scratch_slot))
        if self.draft_kind == "model":
            n = 1
            while n <= self.prefill_budget:
                self.dcache = self._run(("draft_prefill", n), lambda: self._dprefill(
                    self._dstate, self.dcache, np.zeros((1, n), np.int32), np.arange(n, dtype=np.int32)[None],
                    scratch, np.asarray([n], np.int32), np.asarray([self.scratch_slot], np.int32)))
                n *= 2
        if self.draft_kind is not None:
            tables = np.full((b, self.max_pages), self.scratch_page, np.int32)
            slots = np.full(b, self.scratch_slot, np.int32)
            for g in (self._gamma_candidates() if self.adaptive_gamma else [self.gamma]):
                q = dsteps = None
                if self.draft_kind == "model":
                    _, q, self.dcache, dsteps = self._run(("propose", g), lambda: self._propose(
                        self._dstate, self.dcache, zi, zi, tables, slots, zu, zi, zf, zi, np.ones(b, np.float32), g))
                out = self._run(("verify", g, False), lambda: self._verify(
                    self._state, self.cache, self.dcache, np.zeros((b, g + 1), np.int32),
                    np.broadcast_to(np.arange(g + 1, dtype=np.int32), (b, g + 1)).copy(), tables, slots, q, dsteps,
                    zu, zi, zf, zi, np.ones(b, np.float32), False))
                self.cache, self.dcache = out[2], out[3]
        jax.block_until_ready(tok)

    @property
    def n_programs(self) -> int:
        """Distinct compiled programs used so far (prefill chunk lengths + decode + helpers)."""
        return len(self._programs)

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: Sequence[int], params: SamplingParams | None = None) -> int:
        """Queue a request; returns its id.

        Raises:
          ValueError: empty prompt, token ids outside the vocabulary, prompt + ``max_new_tokens`` longer
            than ``max_seq_len``, or more pages than the whole cache holds (it could never run).
        """
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("prompt: expected at least one token id")
        if min(prompt) < 0 or max(prompt) >= self.config.vocab_size:
            raise ValueError(f"prompt: token ids must lie in [0, {self.config.vocab_size})")
        total = len(prompt) + params.max_new_tokens
        if total > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} "
                             f"exceeds max_seq_len={self.max_seq_len}")
        need = self._pages_needed(total + self._spec_extra)
        if self.has_attention and need > self.n_pages:
            raise ValueError(f"request needs {need} KV pages of {self.page_size} tokens but the cache has only "
                             f"{self.n_pages}: it can never be scheduled")
        req = Request(self._next_id, prompt, params, arrival_time=time.perf_counter())
        self._next_id += 1
        self.requests[req.request_id] = req
        self._waiting.append(req)
        return req.request_id

    def cancel(self, request_id: int) -> None:
        """Stop a request now (waiting or running); its pages and slot are released."""
        req = self.requests[request_id]
        if req.finished:
            return
        if req in self._waiting:
            self._waiting.remove(req)
            req.status, req.finish_reason = "finished", "cancelled"
            return
        self._finish(req, "cancelled")

    @property
    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def n_waiting(self) -> int:
        """Requests queued for a slot (not yet admitted)."""
        return len(self._waiting)

    @property
    def n_running(self) -> int:
        """Requests holding a slot (prefilling or decoding)."""
        return len(self._running)

    def forget(self, request_id: int) -> None:
        """Drop a finished request's record from :attr:`requests` (a long-running server calls this so the
        table does not grow without bound).

        Raises:
          ValueError: the request has not finished.
        """
        req = self.requests.get(request_id)
        if req is None:
            return
        if not req.finished:
            raise ValueError(f"request_id: request {request_id} has not finished (cancel it first)")
        del self.requests[request_id]

    def speculative_stats(self, request_id: int) -> dict:
        """Draft tokens accepted and rejected so far for a request (zeros without speculative decoding)."""
        req = self.requests[request_id]
        return {"accepted": req.n_accepted, "rejected": req.n_rejected}

    def _pages_needed(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    # ------------------------------------------------------------------ scheduling
    def _admit(self) -> None:
        while self._waiting and self._free_slots:
            req = self._waiting[0]
            total = len(req.prompt) + req.params.max_new_tokens
            # At least the last prompt token is computed (its logits give the first new token).
            hit, payloads = self.pool.match_prefix(req.prompt, max_tokens=len(req.prompt) - 1)
            if self.any_mamba:  # the recurrent state must be restorable at the end of the hit
                keep = max((i + 1 for i, p in enumerate(payloads) if p is not None), default=0)
                self.pool.release(hit[keep:])
                hit, payloads = hit[:keep], payloads[:keep]
            need = self._pages_needed(total + self._spec_extra) - len(hit) if self.has_attention else 0
            if not self.pool.can_allocate(need):
                self.pool.release(hit)
                break  # FCFS: the head waits until pages free up
            self._waiting.popleft()
            req.pages = hit + self.pool.allocate(need)
            req.slot = self._free_slots.pop()
            req.n_computed = req.prefix_hit_tokens = len(hit) * self.page_size
            req.n_registered_pages = len(hit)
            req.status = "prefill"
            if self.any_mamba:
                self._restore_slot(req.slot, payloads[-1] if hit else None)
            self._running.append(req)

    def _slot_payload(self, slot: int) -> tuple:
        """Both models' Mamba-2 states in ``slot`` (stored with a prefix-cache page)."""
        t = self._run(("get_slot",), lambda: self._get_slot(self.cache, slot)) if self.has_mamba else None
        d = self._run(("draft_get_slot",), lambda: self._dget_slot(self.dcache, slot)) if self.draft_has_mamba \
            else None
        return t, d

    def _restore_slot(self, slot: int, payload: tuple | None) -> None:
        """Put :meth:`_slot_payload`'s states (or zeros, for ``None``) into ``slot`` of both models."""
        t, d = payload if payload is not None else (None, None)
        zeros = lambda cache, idx: [{"conv": jnp.zeros_like(cache[i]["conv"][0]),
                                     "ssm": jnp.zeros_like(cache[i]["ssm"][0])} for i in idx]
        if self.has_mamba:
            t = zeros(self.cache, self._mamba_idx) if t is None else t
            self._run(("set_slot",), lambda: self._set_slot(self.cache, slot, t), assign=True)
        if self.draft_has_mamba:
            d = zeros(self.dcache, self._draft_mamba_idx) if d is None else d
            self.dcache = self._run(("draft_set_slot",), lambda: self._dset_slot(self.dcache, slot, d))

    def _run(self, key, fn, assign=False):
        self._programs.add(key)
        out = fn()
        if assign:
            self.cache = out
        return out

    def _block_table(self, req: Request | None) -> np.ndarray:
        bt = np.full(self.max_pages, self.scratch_page, np.int32)
        if req is not None and req.pages:
            bt[:len(req.pages)] = req.pages
        return bt

    def _prefill_chunks(self, events: list) -> None:
        budget = self.prefill_budget
        for req in [r for r in self._running if r.status == "prefill"]:
            while budget > 0 and req.status == "prefill":
                remaining = len(req.prompt) - req.n_computed
                n = 1 << (min(remaining, budget).bit_length() - 1)  # largest power of two that fits
                if n < self.page_size and remaining > budget:
                    return  # keep chunk ends on page boundaries: wait for a fuller budget
                start = req.n_computed
                tokens = np.asarray([req.prompt[start:start + n]], np.int32)
                positions = np.arange(start, start + n, dtype=np.int32)[None]
                logits, cache = self._run(("prefill", n), lambda: self._prefill(
                    self._state, self.cache, tokens, positions, self._block_table(req)[None],
                    np.asarray([start + n], np.int32), np.asarray([req.slot], np.int32)))
                self.cache = cache
                if self.draft_kind == "model":
                    self.dcache = self._run(("draft_prefill", n), lambda: self._dprefill(
                        self._dstate, self.dcache, tokens, positions, self._block_table(req)[None],
                        np.asarray([start + n], np.int32), np.asarray([req.slot], np.int32)))
                req.n_computed += n
                budget -= n
                self._register(req)
                if req.n_computed == len(req.prompt):
                    p = req.params
                    lp = p.logprobs is not None
                    tok, lps = self._run(("sample", lp), lambda: self._sample(
                        logits, np.asarray([p.seed], np.uint32), np.zeros(1, np.int32),
                        np.asarray([p.temperature], np.float32), np.asarray([p.top_k], np.int32),
                        np.asarray([p.top_p], np.float32), lp))
                    req.status = "decode"
                    self._emit(req, int(tok[0]), events, _row_logprobs(lps, 0))

    def _register(self, req: Request) -> None:
        """Register the request's newly completed full pages in the prefix cache.

        All-attention models: every full page of prompt + fed-back tokens. Hybrid models: only at a prefill
        chunk end on a page boundary, where the slot's Mamba-2 state is the state at the end of that page;
        it is stored with the last page (earlier unregistered pages get no state, and a hit is cut back to
        a page that has one)."""
        ps = self.page_size
        if not self.pool.prefix_caching or not self.has_attention:
            return
        if self.any_mamba:
            if req.status != "prefill" or req.n_computed % ps:
                return
            n_full, seq = req.n_computed // ps, req.prompt
        else:
            n_full, seq = req.length // ps, req.prompt + req.tokens
        if n_full <= req.n_registered_pages:
            return
        payloads = None
        if self.any_mamba:
            payloads = [None] * n_full
            payloads[-1] = self._slot_payload(req.slot)
        self.pool.register(seq[:n_full * ps], req.pages, payloads, start=req.n_registered_pages)
        req.n_registered_pages = n_full

    def _emit(self, req: Request, token: int, events: list, logprobs=None) -> None:
        now = time.perf_counter()
        req.tokens.append(token)
        if req.params.logprobs is not None:
            lp, ids, lps = logprobs
            k = req.params.logprobs
            req.logprobs.append((lp, ids[:k], lps[:k]))
        req.token_times.append(now)
        if req.first_token_time is None:
            req.first_token_time = now
        reason = None
        if token in req.params.stop_token_ids:
            reason = "stop"
        elif len(req.tokens) >= req.params.max_new_tokens:
            reason = "length"
        events.append((req.request_id, token, reason is not None))
        if reason:
            self._finish(req, reason)

    def _finish(self, req: Request, reason: str) -> None:
        self.pool.release(req.pages)
        req.pages = []
        self._free_slots.append(req.slot)
        req.slot = -1
        req.status, req.finish_reason = "finished", reason
        self._running.remove(req)

    def _decode_batch(self, events: list) -> None:
        rows = [r for r in self._running if r.status == "decode"]
        if not rows:
            return
        if self.draft_kind is not None:
            self._speculative_batch(rows, events)
            return
        b = self.max_batch
        tokens = np.zeros((b, 1), np.int32)
        positions = np.zeros((b, 1), np.int32)
        tables = np.full((b, self.max_pages), self.scratch_page, np.int32)
        lengths = np.zeros(b, np.int32)
        slots = np.zeros(b, np.int32)
        temp = np.zeros(b, np.float32)
        top_k = np.zeros(b, np.int32)
        top_p = np.ones(b, np.float32)
        seeds, counters = np.zeros(b, np.uint32), np.zeros(b, np.int32)
        for i in range(b):
            if i < len(rows):
                r = rows[i]
                pos = len(r.prompt) + len(r.tokens) - 1
                tokens[i, 0], positions[i, 0], lengths[i], slots[i] = r.tokens[-1], pos, pos + 1, r.slot
                tables[i] = self._block_table(r)
                temp[i], top_k[i], top_p[i] = r.params.temperature, r.params.top_k, r.params.top_p
                seeds[i], counters[i] = r.params.seed, len(r.tokens)
            else:
                slots[i] = self.scratch_slot  # padding row: scratch page, scratch state slot
        lp = any(r.params.logprobs is not None for r in rows)
        (out, lps), cache = self._run(("decode", lp), lambda: self._decode(
            self._state, self.cache, tokens, positions, tables, lengths, slots, seeds, counters, temp, top_k, top_p,
            lp))
        self.cache = cache
        out = np.asarray(out)
        lps = None if lps is None else jax.tree.map(np.asarray, lps)
        for i, r in enumerate(rows):
            self._emit(r, int(out[i]), events, _row_logprobs(lps, i))
            if r.status == "decode":
                self._register(r)

    # ------------------------------------------------------------------ speculative decoding
    def _gamma_candidates(self) -> list[int]:
        return sorted({g for g in (1, 2, 4, 8, 16) if g <= self.max_gamma} | {self.max_gamma})

    def _choose_gamma(self) -> int:
        """Fixed gamma, or (adaptive) the candidate with the most expected tokens per second: expected tokens
        per round ``(1 - a^(g+1)) / (1 - a)`` (Leviathan et al. 2023, eq. 1) at the running per-token
        acceptance rate ``a``, over the measured seconds per round at that gamma (each candidate is timed
        once before it competes)."""
        if not self.adaptive_gamma:
            return self.gamma
        for g in self._gamma_candidates():
            if g not in self._round_time:
                return g
        a = min(max(self._accept_ema, 0.01), 0.99)
        return max(self._round_time, key=lambda g: (1 - a ** (g + 1)) / (1 - a) / self._round_time[g])

    def _speculative_batch(self, rows: list[Request], events: list) -> None:
        """One draft/verify round for every decoding request (module docstring, "Speculative decoding")."""
        t0 = time.perf_counter()
        gamma = self._choose_gamma()
        b = self.max_batch
        last = np.zeros(b, np.int32)
        pos0 = np.zeros(b, np.int32)
        tables = np.full((b, self.max_pages), self.scratch_page, np.int32)
        slots = np.full(b, self.scratch_slot, np.int32)
        temp, top_k, top_p = np.zeros(b, np.float32), np.zeros(b, np.int32), np.ones(b, np.float32)
        seeds, counters = np.zeros(b, np.uint32), np.zeros(b, np.int32)
        for i, r in enumerate(rows):
            last[i], pos0[i] = r.tokens[-1], len(r.prompt) + len(r.tokens) - 1
            tables[i], slots[i] = self._block_table(r), r.slot
            temp[i], top_k[i], top_p[i] = r.params.temperature, r.params.top_k, r.params.top_p
            seeds[i], counters[i] = r.params.seed, len(r.tokens)
        if self.draft_kind == "model":
            drafts, q, self.dcache, dsteps = self._run(("propose", gamma), lambda: self._propose(
                self._dstate, self.dcache, last, pos0, tables, slots, seeds, counters, temp, top_k, top_p, gamma))
            drafts = np.asarray(drafts)
        else:
            q = dsteps = None
            drafts = np.repeat(last[:, None], gamma, axis=1)
            for i, r in enumerate(rows):
                prop = prompt_lookup_draft(r.prompt + r.tokens, self.n_gram, gamma)
                drafts[i, :len(prop)] = prop
                drafts[i, len(prop):] = prop[-1] if prop else last[i]
        tokens = np.concatenate([last[:, None], drafts], axis=1).astype(np.int32)
        positions = (pos0[:, None] + np.arange(gamma + 1, dtype=np.int32)[None]).astype(np.int32)
        lp = any(r.params.logprobs is not None for r in rows)
        emitted, n_emit, self.cache, self.dcache, lps = self._run(("verify", gamma, lp), lambda: self._verify(
            self._state, self.cache, self.dcache, tokens, positions, tables, slots, q, dsteps, seeds, counters,
            temp, top_k, top_p, lp))
        emitted, n_emit = np.asarray(emitted), np.asarray(n_emit)
        lps = None if lps is None else jax.tree.map(np.asarray, lps)
        accepted = 0
        for i, r in enumerate(rows):
            n_acc = int(n_emit[i]) - 1
            r.n_accepted += n_acc
            r.n_rejected += gamma - n_acc
            accepted += n_acc
            for j in range(int(n_emit[i])):
                self._emit(r, int(emitted[i, j]), events,
                           None if lps is None else (float(lps[0][i, j]), lps[1][i, j].tolist(), lps[2][i, j].tolist()))
                if r.finished:
                    break
            if r.status == "decode":
                self._register(r)
        self.n_proposed += gamma * len(rows)
        self.n_accepted += accepted
        rate = accepted / (gamma * len(rows))
        self._accept_ema = 0.9 * self._accept_ema + 0.1 * rate
        dt = time.perf_counter() - t0
        self._round_time[gamma] = dt if gamma not in self._round_time else 0.8 * self._round_time[gamma] + 0.2 * dt

    @property
    def acceptance_rate(self) -> float:
        """Draft tokens accepted / proposed over the engine's life (0 without speculative decoding)."""
        return self.n_accepted / self.n_proposed if self.n_proposed else 0.0

    def step(self) -> list[tuple[int, int, bool]]:
        """One scheduler iteration: admit, prefill within the budget, decode every generating request.

        Returns:
          the tokens produced, as ``(request_id, token, finished)`` in order.
        """
        events: list[tuple[int, int, bool]] = []
        self._admit()
        self._prefill_chunks(events)
        self._decode_batch(events)  # includes requests whose first token came from this step's prefill
        self.n_steps += 1
        if not events and self._waiting and not self._running:
            raise RuntimeError("engine stalled: the head request cannot be admitted with an empty engine")
        return events

    def run(self) -> dict[int, list[int]]:
        """Step until every request has finished; returns ``{request_id: generated tokens}``."""
        while self.has_unfinished:
            self.step()
        return {i: r.tokens for i, r in self.requests.items()}

    def generate(self, prompts: Iterable[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[list[int]]:
        """Add all ``prompts`` (with one shared or per-prompt ``params``), run to completion, return the
        generated tokens of each, in order."""
        prompts = list(prompts)
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"params: expected one per prompt ({len(prompts)}), got {len(plist)}")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        self.run()
        return [self.requests[i].tokens for i in ids]

    @property
    def prefix_hit_rate(self) -> float:
        return self.pool.hit_rate


def _row_logprobs(lps, i):
    """Row ``i`` of ``_token_logprobs``'s output as ``(float, list[int], list[float])`` (``None`` passes)."""
    if lps is None:
        return None
    chosen, ids, top = (np.asarray(x) for x in lps)
    return float(chosen[i]), ids[i].tolist(), top[i].tolist()
