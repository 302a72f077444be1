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
import math
import time
from collections import deque
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mani_jax.inference.pages import PagePool


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one request.

    Attributes:
      temperature: 0 = greedy (argmax); > 0 divides the logits.
      top_k: keep the k most likely tokens (0 = all). top_p: nucleus mass in (0, 1] (1 = all).
      seed: PRNG seed of this request.
      max_new_tokens: generate at most this many tokens (>= 1).
      stop_token_ids: stop after emitting any of these (the stop token is returned).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()

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

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def length(self) -> int:
        """Tokens whose keys are (or are being) cached: prompt so far + generated tokens fed back."""
        return self.n_computed + max(len(self.tokens) - 1, 0)


def _sample_rows(logits, seeds, counters, temperature, top_k, top_p):
    """Per-row sampling with per-row parameters: ``logits [B, V]``; ``seeds``, ``counters`` int ``[B]`` (row
    ``b`` uses the key ``fold_in(PRNGKey(seeds[b]), counters[b])``); ``temperature``, ``top_k``, ``top_p`` ``[B]``.

    Matches :func:`mani_jax.core.sampling.sample_token` row by row with that key (greedy when temperature
    is 0; top-k keeps ties at the boundary; top-p keeps the smallest prefix of the sorted distribution
    reaching p). When every row is greedy only the argmax is computed.
    """
    def one(lg, seed, counter, t, k, p):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), counter)
        x = lg.astype(jnp.float32) / jnp.where(t > 0, t, 1.0)
        srt = jnp.sort(x)[::-1]
        kth = srt[jnp.clip(k - 1, 0, x.shape[0] - 1)]
        x = jnp.where((k > 0) & (x < kth), -jnp.inf, x)
        order = jnp.argsort(-x)
        probs = jax.nn.softmax(x[order])
        before = jnp.cumsum(probs) - probs
        keep = jnp.zeros_like(x, dtype=bool).at[order].set(before < p)
        x = jnp.where((p < 1.0) & ~keep, -jnp.inf, x)
        sampled = jax.random.categorical(key, x).astype(jnp.int32)
        return jnp.where(t > 0, sampled, jnp.argmax(lg).astype(jnp.int32))

    greedy = lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32)
    full = lambda: jax.vmap(one)(logits, seeds, counters, temperature, top_k, top_p)
    return jax.lax.cond(jnp.all(temperature == 0), greedy, full)


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
                 kv_dtype=None):
        cfg = model.config
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
        self.max_pages = -(-self.max_seq_len // page_size)
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
        self._programs: set[tuple] = set()
        self.reset()
        self._build_programs()

    def reset(self) -> None:
        """Forget every request and cached page (fresh zeroed caches); compiled programs are kept."""
        self.pool = PagePool(self.n_pages, self.page_size, prefix_caching=self.prefix_caching)
        # Committed to the device from the start, like every later (donated) cache, so jit sees one signature.
        self.cache = jax.device_put(self._init_cache(), jax.devices()[0])
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
                   top_p):
            logits, cache = forward(state, cache, tokens, positions, block_tables, lengths, slots)
            return _sample_rows(logits[:, 0], seeds, counters, temp, top_k, top_p), cache

        def set_slot(cache, slot, states):
            new = list(cache)
            for i, st in zip(self._mamba_idx, states):
                new[i] = {"conv": cache[i]["conv"].at[slot].set(st["conv"]),
                          "ssm": cache[i]["ssm"].at[slot].set(st["ssm"])}
            return new

        def get_slot(cache, slot):
            return [{"conv": cache[i]["conv"][slot], "ssm": cache[i]["ssm"][slot]} for i in self._mamba_idx]

        self._prefill = jax.jit(prefill, donate_argnums=1)
        self._decode = jax.jit(decode, donate_argnums=1)
        self._sample = jax.jit(_sample_rows)
        self._set_slot = jax.jit(set_slot, donate_argnums=0)
        self._get_slot = jax.jit(get_slot)

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
        tok, self.cache = self._run(("decode",), lambda: self._decode(
            self._state, self.cache, np.zeros((b, 1), np.int32), np.zeros((b, 1), np.int32),
            np.full((b, self.max_pages), self.scratch_page, np.int32), zi, np.full(b, self.scratch_slot, np.int32),
            zu, zi, zf, zi, np.ones(b, np.float32)))
        self._run(("sample",), lambda: self._sample(logits, zu[:1], zi[:1], zf[:1], zi[:1], np.ones(1, np.float32)))
        if self.has_mamba:
            st = self._run(("get_slot",), lambda: self._get_slot(self.cache, self.scratch_slot))
            self._run(("set_slot",), lambda: self._set_slot(self.cache, self.scratch_slot, st), assign=True)
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
        if self.has_attention and self._pages_needed(total) > self.n_pages:
            raise ValueError(f"request needs {self._pages_needed(total)} KV pages of {self.page_size} tokens but the "
                             f"cache has only {self.n_pages}: it can never be scheduled")
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

    def _pages_needed(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    # ------------------------------------------------------------------ scheduling
    def _admit(self) -> None:
        while self._waiting and self._free_slots:
            req = self._waiting[0]
            total = len(req.prompt) + req.params.max_new_tokens
            # At least the last prompt token is computed (its logits give the first new token).
            hit, payloads = self.pool.match_prefix(req.prompt, max_tokens=len(req.prompt) - 1)
            if self.has_mamba:  # the recurrent state must be restorable at the end of the hit
                keep = max((i + 1 for i, p in enumerate(payloads) if p is not None), default=0)
                self.pool.release(hit[keep:])
                hit, payloads = hit[:keep], payloads[:keep]
            need = self._pages_needed(total) - len(hit) if self.has_attention else 0
            if not self.pool.can_allocate(need):
                self.pool.release(hit)
                break  # FCFS: the head waits until pages free up
            self._waiting.popleft()
            req.pages = hit + self.pool.allocate(need)
            req.slot = self._free_slots.pop()
            req.n_computed = req.prefix_hit_tokens = len(hit) * self.page_size
            req.n_registered_pages = len(hit)
            req.status = "prefill"
            if self.has_mamba:
                states = payloads[-1] if hit else self._zero_slot_state()
                self._run(("set_slot",), lambda: self._set_slot(self.cache, req.slot, states), assign=True)
            self._running.append(req)

    def _zero_slot_state(self):
        return [{"conv": jnp.zeros_like(self.cache[i]["conv"][0]), "ssm": jnp.zeros_like(self.cache[i]["ssm"][0])}
                for i in self._mamba_idx]

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
                req.n_computed += n
                budget -= n
                self._register(req)
                if req.n_computed == len(req.prompt):
                    p = req.params
                    tok = self._run(("sample",), lambda: self._sample(
                        logits, np.asarray([p.seed], np.uint32), np.zeros(1, np.int32),
                        np.asarray([p.temperature], np.float32), np.asarray([p.top_k], np.int32),
                        np.asarray([p.top_p], np.float32)))
                    req.status = "decode"
                    self._emit(req, int(tok[0]), events)

    def _register(self, req: Request) -> None:
        """Register the request's newly completed full pages in the prefix cache.

        All-attention models: every full page of prompt + fed-back tokens. Hybrid models: only at a prefill
        chunk end on a page boundary, where the slot's Mamba-2 state is the state at the end of that page;
        it is stored with the last page (earlier unregistered pages get no state, and a hit is cut back to
        a page that has one)."""
        ps = self.page_size
        if not self.pool.prefix_caching or not self.has_attention:
            return
        if self.has_mamba:
            if req.status != "prefill" or req.n_computed % ps:
                return
            n_full, seq = req.n_computed // ps, req.prompt
        else:
            n_full, seq = req.length // ps, req.prompt + req.tokens
        if n_full <= req.n_registered_pages:
            return
        payloads = None
        if self.has_mamba:
            payloads = [None] * n_full
            payloads[-1] = self._run(("get_slot",), lambda: self._get_slot(self.cache, req.slot))
        self.pool.register(seq[:n_full * ps], req.pages, payloads, start=req.n_registered_pages)
        req.n_registered_pages = n_full

    def _emit(self, req: Request, token: int, events: list) -> None:
        now = time.perf_counter()
        req.tokens.append(token)
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
        out, cache = self._run(("decode",), lambda: self._decode(
            self._state, self.cache, tokens, positions, tables, lengths, slots, seeds, counters, temp, top_k, top_p))
        self.cache = cache
        out = np.asarray(out)
        for i, r in enumerate(rows):
            self._emit(r, int(out[i]), events)
            if r.status == "decode":
                self._register(r)

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
