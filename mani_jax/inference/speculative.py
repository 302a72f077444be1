"""Speculative decoding for one sequence: a draft model (or prompt lookup) proposes, the target verifies.

Each round: the draft proposes ``gamma`` tokens with ``gamma`` cached decode steps (or
:func:`~mani_jax.core.speculative.prompt_lookup_draft` copies them from the context, with a one-hot ``q``);
the target scores ``[last, x_1 .. x_gamma]`` in **one** cached prefill call; :func:`~mani_jax.core.
speculative.speculative_verify` keeps the accepted prefix and adds one token from the residual or bonus
distribution (Leviathan et al. 2023, Alg. 1). So each round costs one target call and emits 1 to gamma + 1
tokens, distributed exactly as target-only sampling with the same temperature / top-k / top-p (and, at
temperature 0, identical to target-only greedy decoding up to floating-point ties).

Cache rollback after a rejection: an attention cache only moves its position back (entries past it are
masked and later overwritten); a model with Mamba-2 layers cannot undo its recurrent state, so the target
re-runs the accepted tokens from its pre-verify state (one extra, shorter target call per rejected
round), and the draft takes the state it had after the last accepted token (kept from its proposal steps).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mani_jax.core.sampling import apply_temperature, top_k_filter, top_p_filter
from mani_jax.core.speculative import prompt_lookup_draft, speculative_verify
from mani_jax.inference.generate import _prefill


@functools.partial(jax.jit, static_argnums=0)
def _decode_logits(graphdef, state, token, cache):
    return nnx.merge(graphdef, state).decode_step(token, cache)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _probs(logits, temperature: float, top_k: int, top_p: float):
    """The sampling distribution ``[..., V]`` that temperature / top-k / top-p define (one-hot argmax at 0)."""
    if temperature == 0:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    x = top_p_filter(top_k_filter(apply_temperature(logits, temperature), top_k), top_p)
    return jax.nn.softmax(x, axis=-1)


def _has_mamba(model) -> bool:
    return model.config.n_mamba_layers > 0


def speculative_generate(
    target,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    draft=None,
    gamma: int = 4,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: Sequence[int] = (),
    n_gram: int = 3,
) -> tuple[list[int], dict]:
    """Generate up to ``max_new_tokens`` tokens after ``prompt`` from ``target`` with speculative decoding.

    Args:
      target: a :class:`~mani_jax.models.HybridLM` (the distribution that is sampled).
      prompt: token ids (non-empty).
      max_new_tokens: >= 1.
      draft: a smaller model with the same vocabulary, or None for prompt-lookup drafting (``n_gram``).
      gamma: draft tokens per round (>= 1).
      temperature, top_k, top_p: the target's sampling settings (temperature 0 = greedy); the draft samples
        with the same settings.
      seed: PRNG seed. stop_ids: stop after emitting any of these.

    Returns:
      ``(tokens, stats)``; ``stats``: ``target_calls`` (verify passes + rollback re-runs + the prompt),
      ``rounds``, ``drafted`` and ``accepted`` draft tokens, ``acceptance_rate``, ``tokens_per_target_call``.

    Raises:
      ValueError: empty prompt, bad ``max_new_tokens`` / ``gamma``, a draft with another vocabulary, or a
        prompt + generation (+ gamma of look-ahead) longer than either model's ``max_seq_len``.
    """
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("prompt: expected at least one token id")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    if gamma < 1:
        raise ValueError(f"gamma: expected >= 1, got {gamma}")
    if draft is not None and draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft: vocabulary {draft.config.vocab_size} != target's {target.config.vocab_size}")
    total = len(prompt) + max_new_tokens + gamma + 1
    for name, m in (("target", target), ("draft", draft)):
        if m is not None and total > m.config.max_seq_len:
            raise ValueError(f"{name}: prompt + max_new_tokens + gamma + 1 = {total} exceeds max_seq_len="
                             f"{m.config.max_seq_len}")
    sp = (float(temperature), int(top_k), float(top_p))
    key = jax.random.PRNGKey(seed)
    tg, ts = nnx.split(target)
    t_cache = target.init_cache(1, total)
    logits, t_cache = _prefill(tg, ts, jnp.asarray([prompt], jnp.int32), t_cache)
    key, sub = jax.random.split(key)
    first = jax.random.categorical(sub, jnp.log(_probs(logits[:, -1], *sp)), axis=-1)
    out = [int(first[0])]
    stats = {"target_calls": 1, "rounds": 0, "drafted": 0, "accepted": 0}
    if draft is not None:
        dg, ds = nnx.split(draft)
        d_cache = draft.init_cache(1, total)
        _, d_cache = _prefill(dg, ds, jnp.asarray([prompt], jnp.int32), d_cache)
    stops = set(int(s) for s in stop_ids)
    vocab = target.config.vocab_size

    while len(out) < max_new_tokens and out[-1] not in stops:
        last = out[-1]
        # 1. Propose.
        if draft is None:
            proposal = prompt_lookup_draft(prompt + out, n_gram=n_gram, gamma=gamma)
            if not proposal:  # nothing to copy: a plain target step (a 1-token verify with no draft)
                proposal = []
            drafts = proposal
            q = jax.nn.one_hot(jnp.asarray(drafts, jnp.int32), vocab, dtype=jnp.float32)[None]
        else:
            drafts, qs, d_states = [], [], []
            tok = jnp.asarray([last], jnp.int32)
            for _ in range(gamma):
                d_logits, d_cache = _decode_logits(dg, ds, tok, d_cache)
                d_states.append(d_cache)
                qi = _probs(d_logits, *sp)
                key, sub = jax.random.split(key)
                tok = jax.random.categorical(sub, jnp.log(qi), axis=-1).astype(jnp.int32)
                drafts.append(int(tok[0]))
                qs.append(qi[0])
            q = jnp.stack(qs)[None]
        g = len(drafts)
        # 2. Verify with one target call over [last, x_1 .. x_g].
        t_before = t_cache
        p_logits, t_after = _prefill(tg, ts, jnp.asarray([[last] + drafts], jnp.int32), t_cache)
        stats["target_calls"] += 1
        p = _probs(p_logits[0], *sp)[None]
        key, sub = jax.random.split(key)
        if g:
            tokens, n = speculative_verify(sub, jnp.asarray([drafts], jnp.int32), q, p)
            n_emit = int(n[0])
            new = [int(x) for x in tokens[0, :n_emit]]
        else:
            n_emit = 1
            new = [int(jax.random.categorical(sub, jnp.log(p[0, 0])))]
        n_acc = n_emit - 1
        stats["rounds"] += 1
        stats["drafted"] += g
        stats["accepted"] += n_acc
        # 3. Roll both caches back to "consumed last, x_1 .. x_n_acc".
        if n_acc == g:
            t_cache = t_after
        elif _has_mamba(target):
            _, t_cache = _prefill(tg, ts, jnp.asarray([[last] + drafts[:n_acc]], jnp.int32), t_before)
            stats["target_calls"] += 1
        else:
            t_cache = {"pos": t_before["pos"] + 1 + n_acc, "layers": t_after["layers"]}
        if draft is not None:
            if n_acc < g:
                d_cache = d_states[n_acc]
            else:  # every proposal accepted: the draft has not consumed its own last proposal yet
                _, d_cache = _decode_logits(dg, ds, jnp.asarray([drafts[-1]], jnp.int32), d_states[-1])
        for t in new:
            out.append(t)
            if len(out) >= max_new_tokens or t in stops:
                break
    drafted = stats["drafted"]
    stats["acceptance_rate"] = stats["accepted"] / drafted if drafted else 0.0
    stats["tokens_per_target_call"] = len(out) / stats["target_calls"]
    return out, stats
