"""Speculative decoding inside the engine (continuous batching): greedy output identical to target-only
decoding for a draft model that agrees fully, partly and never, and for prompt lookup; both models' Mamba-2
states rolled back to the last accepted token; sampling with draft == target accepts every proposal;
logprobs equal the target's own log-softmax."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from mani_jax.inference import generate
from mani_jax.inference.engine import Engine, SamplingParams
from mani_jax.models import HybridLM, get_config

_CACHE = {}


def _pair():
    """A hybrid target (Mamba-2 + attention), a 2-layer hybrid draft, and a near-copy of the target whose
    proposals are accepted only part of the time (so rollback happens at every position of a round)."""
    if not _CACHE:
        cfg = dataclasses.replace(get_config("smoke", {"n_layers": 4, "vocab_size": 384}), initializer_range=0.2,
                                  max_seq_len=96)
        target = HybridLM(cfg, rngs=nnx.Rngs(0))
        draft = HybridLM(dataclasses.replace(cfg, n_layers=2, layer_types=("mamba", "attention")), rngs=nnx.Rngs(1))
        near = HybridLM(cfg, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(near)
        noise = jax.tree.map(lambda x: x + 0.003 * jax.random.normal(jax.random.PRNGKey(2), x.shape, x.dtype), state)
        near = nnx.merge(graphdef, noise)
        _CACHE.update(target=target, draft=draft, near=near)
    return _CACHE["target"], _CACHE["draft"], _CACHE["near"]


def _prompts(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, vocab, n)] for n in lengths]


@pytest.mark.parametrize("which", ["near", "draft", "ngram"])
def test_greedy_speculative_engine_equals_target_only(which):
    target, draft, near = _pair()
    d = {"near": near, "draft": draft, "ngram": "ngram"}[which]
    prompts = _prompts(384, [5, 19, 11, 8], seed=3)
    if which == "ngram":  # repetitive prompts give lookup something to propose
        prompts = [(p[:4] * 6)[:n] for p, n in zip(prompts, [12, 19, 16, 9])]
    n_new = [10, 12, 8, 16]
    ref = [generate(target, p, n, temperature=0.0) for p, n in zip(prompts, n_new)]
    eng = Engine(target, max_batch=2, page_size=8, prefill_budget=8, draft=d, gamma=3)
    ids = [eng.add_request(p, SamplingParams(max_new_tokens=n)) for p, n in zip(prompts[:2], n_new[:2])]
    eng.step()  # the others arrive while the first ones decode
    ids += [eng.add_request(p, SamplingParams(max_new_tokens=n)) for p, n in zip(prompts[2:], n_new[2:])]
    eng.run()
    for i, r in zip(ids, ref):
        assert eng.requests[i].tokens == list(r)
    assert eng.n_proposed > 0
    if which == "near":  # partly accepted: rollback happened at positions inside rounds
        assert 0.2 < eng.acceptance_rate < 0.95, eng.acceptance_rate
    assert eng.pool.n_in_use == 0 and sorted(eng._free_slots) == [0, 1]  # every page and slot returned


def test_sampling_with_draft_equal_to_target_accepts_everything_and_logprobs_match():
    target, _, _ = _pair()
    eng = Engine(target, max_batch=2, page_size=8, prefill_budget=8, draft=target, gamma=2)
    prompt = _prompts(384, [11], seed=5)[0]
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_new_tokens=9, logprobs=2)
    rid = eng.add_request(prompt, params)
    eng.run()
    req = eng.requests[rid]
    assert eng.acceptance_rate == 1.0  # p == q: min(1, p/q) = 1
    assert len(req.tokens) == 9 and len(req.logprobs) == 9
    # logprobs are the target's own log-softmax at each position of the produced sequence
    seq = prompt + req.tokens
    logits = target(np.asarray([seq[:-1]], np.int32))[0]
    ref = jax.nn.log_softmax(logits.astype(np.float32), axis=-1)
    for j, (lp, ids, lps) in enumerate(req.logprobs):
        row = np.asarray(ref[len(prompt) - 1 + j])
        np.testing.assert_allclose(lp, row[req.tokens[j]], atol=2e-4)
        np.testing.assert_array_equal(ids, np.argsort(-row)[:2])
        np.testing.assert_allclose(lps, np.sort(row)[::-1][:2], atol=2e-4)


def test_bad_speculative_arguments():
    target, _, _ = _pair()
    with pytest.raises(ValueError, match="gamma"):
        Engine(target, draft="ngram", gamma=0)
    with pytest.raises(ValueError, match="draft"):
        Engine(target, draft="medusa")
    cfg = get_config("smoke", {"vocab_size": 256})
    other = HybridLM(dataclasses.replace(cfg, n_layers=2, layer_types=("mamba", "attention")), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="vocab_size"):
        Engine(target, draft=other)
