"""The engine against the model's plain prefill/decode loop: every model kind, staggered arrivals, chunked
prefill on and off, prefix-cache hits and misses, page accounting, cancellation, per-seed sampling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mani_jax.core.sampling import sample_token
from mani_jax.inference import generate
from mani_jax.inference.engine import Engine, SamplingParams, _sample_rows
from mani_jax.models import HybridLM, get_config
from mani_jax.models.quantize import quantize_model

SMALL = {"vocab_size": 384, "d_model": 64, "n_heads": 2, "n_kv_heads": 1, "head_dim": 32, "d_ff": 128}
KINDS = {
    "attention": lambda: get_config("dense-tiny", {**SMALL, "n_layers": 2}),
    "hybrid": lambda: get_config("smoke", {"n_layers": 4, "vocab_size": 384}),
    "moe": lambda: get_config("dense-tiny", {**SMALL, "n_layers": 2, "n_experts": 4, "top_k": 2,
                                             "d_ff_expert": 64, "dropless_impl": "blocked"}),
}
_MODELS = {}


def _model(kind):
    if kind not in _MODELS:
        # A large init makes the logits peaked, so greedy choices are not decided by rounding noise.
        cfg = dataclasses.replace(KINDS[kind](), initializer_range=0.2, max_seq_len=96)
        _MODELS[kind] = HybridLM(cfg, rngs=nnx.Rngs(0))
    return _MODELS[kind]


def _prompts(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, vocab, n)] for n in lengths]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("budget", [16, 64], ids=["chunked", "whole-prompt"])
def test_greedy_matches_plain_decode_loop_with_staggered_arrivals(kind, budget):
    model = _model(kind)
    prompts = _prompts(model.config.vocab_size, [5, 23, 40, 9, 17], seed=len(kind))
    n_new = [10, 6, 12, 8, 1]
    ref = [generate(model, p, n, temperature=0.0) for p, n in zip(prompts, n_new)]
    eng = Engine(model, max_batch=3, page_size=8, prefill_budget=budget)
    ids = [eng.add_request(p, SamplingParams(max_new_tokens=n)) for p, n in zip(prompts[:2], n_new[:2])]
    for _ in range(3):
        eng.step()
    ids += [eng.add_request(p, SamplingParams(max_new_tokens=n)) for p, n in zip(prompts[2:], n_new[2:])]
    eng.run()
    for i, r in zip(ids, ref):
        assert eng.requests[i].tokens == r
        assert eng.requests[i].finish_reason == "length"
    eng.pool.check()
    assert eng.pool.n_in_use == 0 and sorted(eng._free_slots) == [0, 1, 2]
    # Bounded compilation: one program per power-of-two chunk length, decode, sampling, slot state.
    assert eng.n_programs <= int(np.log2(budget)) + 1 + 4


@pytest.mark.parametrize("kind", ["attention", "hybrid"])
def test_prefix_cache_hits_give_identical_outputs(kind):
    model = _model(kind)
    vocab = model.config.vocab_size
    system = _prompts(vocab, [32], seed=5)[0]  # 4 full pages of 8
    prompts = [system + q for q in _prompts(vocab, [3, 7, 12], seed=6)]
    ref = [generate(model, p, 6, temperature=0.0) for p in prompts]
    eng = Engine(model, max_batch=2, page_size=8, prefill_budget=16)
    first = eng.generate(prompts[:1], SamplingParams(max_new_tokens=6))
    assert eng.prefix_hit_rate == 0.0
    rest = eng.generate(prompts[1:], SamplingParams(max_new_tokens=6))
    assert first + rest == ref
    hits = [eng.requests[i].prefix_hit_tokens for i in (1, 2)]
    assert all(h == 32 for h in hits), hits  # the shared system prompt came from the cache
    assert eng.pool.stats["hit_tokens"] == 64
    eng.pool.check()
    assert eng.pool.n_in_use == 0


def test_requests_wait_for_pages_and_oversized_requests_are_refused():
    model = _model("attention")
    prompts = _prompts(model.config.vocab_size, [20, 20, 20], seed=2)
    ref = [generate(model, p, 8, temperature=0.0) for p in prompts]
    # 4 pages of 8 tokens: exactly one 28-token request at a time.
    eng = Engine(model, max_batch=3, page_size=8, n_pages=4, prefill_budget=16, prefix_caching=False)
    ids = [eng.add_request(p, SamplingParams(max_new_tokens=8)) for p in prompts]
    eng.step()
    assert sum(r.status != "waiting" for r in eng.requests.values()) == 1
    eng.run()
    assert [eng.requests[i].tokens for i in ids] == ref
    with pytest.raises(ValueError, match="pages"):
        eng.add_request(list(range(30)), SamplingParams(max_new_tokens=8))  # 38 tokens > 32 slots
    with pytest.raises(ValueError, match="max_seq_len"):
        eng.add_request([1] * 90, SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="prompt"):
        eng.add_request([], SamplingParams())


def test_cancel_releases_pages_and_slot():
    model = _model("hybrid")
    eng = Engine(model, max_batch=2, page_size=8, prefill_budget=16)
    a = eng.add_request(_prompts(384, [30])[0], SamplingParams(max_new_tokens=20))
    b = eng.add_request(_prompts(384, [10], seed=1)[0], SamplingParams(max_new_tokens=20))
    c = eng.add_request(_prompts(384, [10], seed=2)[0], SamplingParams(max_new_tokens=3))
    eng.step()
    eng.step()
    eng.cancel(a)
    eng.cancel(c)  # still waiting
    eng.run()
    assert eng.requests[a].finish_reason == eng.requests[c].finish_reason == "cancelled"
    assert len(eng.requests[b].tokens) == 20
    eng.pool.check()
    assert eng.pool.n_in_use == 0 and sorted(eng._free_slots) == [0, 1]


def test_sampling_is_reproducible_per_seed_whatever_the_batch():
    model = _model("attention")
    prompts = _prompts(model.config.vocab_size, [12, 7, 25], seed=9)
    sp = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=123, max_new_tokens=10)
    alone = Engine(model, max_batch=1, page_size=8).generate(prompts[:1], sp)[0]
    others = [dataclasses.replace(sp, seed=7), dataclasses.replace(sp, seed=8)]
    batched = Engine(model, max_batch=3, page_size=8).generate(prompts, [sp] + others)
    assert batched[0] == alone
    other_seed = Engine(model, max_batch=1, page_size=8).generate(prompts[:1], dataclasses.replace(sp, seed=124))[0]
    assert other_seed != alone


def test_stop_tokens_end_a_request():
    model = _model("attention")
    p = _prompts(model.config.vocab_size, [9], seed=4)[0]
    ref = generate(model, p, 10, temperature=0.0)
    stop = ref[3]
    out = Engine(model, max_batch=2, page_size=8).generate([p], SamplingParams(max_new_tokens=10,
                                                                               stop_token_ids=(stop,)))[0]
    assert out == ref[:ref.index(stop) + 1]


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8),
                                                     (1.0, 20, 0.5)])
def test_batched_sampler_matches_core_sample_token(temperature, top_k, top_p):
    logits = jax.random.normal(jax.random.PRNGKey(1), (6, 97)) * 3
    seeds, counters = jnp.arange(6, dtype=jnp.uint32) + 40, jnp.arange(6, dtype=jnp.int32) * 3
    ours = _sample_rows(logits, seeds, counters, jnp.full(6, temperature), jnp.full(6, top_k, jnp.int32),
                        jnp.full(6, top_p))
    keys = [jax.random.fold_in(jax.random.PRNGKey(int(s)), int(c)) for s, c in zip(seeds, counters)]
    ref = [int(sample_token(keys[i], logits[i:i + 1], temperature=temperature, top_k=top_k, top_p=top_p)[0])
           for i in range(6)]
    assert [int(t) for t in ours] == ref


def test_quantized_model_serves_like_its_own_decode_loop():
    cfg = dataclasses.replace(KINDS["attention"](), initializer_range=0.2, max_seq_len=64)
    model = HybridLM(cfg, rngs=nnx.Rngs(3))
    quantize_model(model, "int8")
    prompts = _prompts(cfg.vocab_size, [6, 14], seed=3)
    ref = [generate(model, p, 6, temperature=0.0) for p in prompts]
    assert Engine(model, max_batch=2, page_size=8).generate(prompts, SamplingParams(max_new_tokens=6)) == ref


@pytest.mark.slow
def test_engine_throughput_smoke(tmp_path):
    from experiments import engine_throughput
    s = engine_throughput.main(["--preset", "smoke", "--out", str(tmp_path)])
    for w in ("mixed", "shared_prefix"):
        assert s["outputs_agree"][w] == {"plain_equals_engine": True, "plain_equals_prefix_cache": True}
        systems = [r["system"] for r in s["results"][w]]
        assert systems == ["plain loop, one at a time", "engine", "engine + prefix cache",
                           "llama.cpp F16, one at a time"]
        for r in s["results"][w]:
            assert r["generated_tokens"] == 4 * 8 and r["tokens_per_second"] > 0 and r["ttft_s"]["median"] > 0
    shared = {r["system"]: r for r in s["results"]["shared_prefix"]}
    assert shared["engine + prefix cache"]["prefix_hit_rate"] > 0.5
    assert shared["engine"]["prefix_hit_rate"] == 0.0
    assert (tmp_path / "engine_throughput.png").stat().st_size > 0
