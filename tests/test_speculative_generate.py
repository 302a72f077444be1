"""Speculative generation with a draft model and with prompt lookup: greedy output == target-only greedy
decoding token for token (attention and hybrid targets), sampled output reproducible, stats consistent."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from mani_jax.inference import generate
from mani_jax.inference.speculative import speculative_generate
from mani_jax.models import HybridLM, get_config

SMALL = {"vocab_size": 256, "d_model": 64, "n_heads": 2, "n_kv_heads": 1, "head_dim": 32, "d_ff": 128}


def _model(name, overrides, seed):
    cfg = dataclasses.replace(get_config(name, overrides), initializer_range=0.2, max_seq_len=128)
    return HybridLM(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def models():
    return {
        "attention": _model("dense-tiny", {**SMALL, "n_layers": 2}, 0),
        "hybrid": _model("smoke", {"n_layers": 4, "vocab_size": 256}, 1),
        "draft": _model("dense-tiny", {**SMALL, "n_layers": 1, "d_ff": 64}, 2),
    }


@pytest.mark.parametrize("target_kind", ["attention", "hybrid"])
@pytest.mark.parametrize("use_draft", [True, False], ids=["draft", "prompt-lookup"])
def test_greedy_equals_target_only(models, target_kind, use_draft):
    target = models[target_kind]
    rng = np.random.default_rng(0)
    # Repetitive prompts so prompt lookup finds matches; random ones so the draft is often wrong.
    prompts = [list(rng.integers(0, 256, 12)) * 2, list(rng.integers(0, 256, 20))]
    for prompt in prompts:
        ref = generate(target, prompt, 24, temperature=0.0)
        out, stats = speculative_generate(target, prompt, 24, draft=models["draft"] if use_draft else None,
                                          gamma=3)
        assert out == ref
        assert stats["accepted"] <= stats["drafted"] and stats["rounds"] >= 1
        assert stats["target_calls"] <= 1 + 2 * stats["rounds"]


def test_self_draft_accepts_everything(models):
    target = models["attention"]
    prompt = [1, 2, 3, 4, 5]
    out, stats = speculative_generate(target, prompt, 20, draft=target, gamma=4)
    assert out == generate(target, prompt, 20, temperature=0.0)
    assert stats["acceptance_rate"] == 1.0
    assert stats["tokens_per_target_call"] > 3  # 5 tokens per verify call, plus the prompt call


def test_sampling_is_reproducible_and_valid(models):
    kw = dict(draft=models["draft"], gamma=3, temperature=0.9, top_k=40, seed=7)
    a, _ = speculative_generate(models["hybrid"], [3, 4, 5], 16, **kw)
    b, _ = speculative_generate(models["hybrid"], [3, 4, 5], 16, **kw)
    assert a == b and len(a) == 16 and all(0 <= t < 256 for t in a)


def test_bad_input(models):
    with pytest.raises(ValueError, match="gamma"):
        speculative_generate(models["attention"], [1], 4, gamma=0)
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(models["attention"], [1], 4, draft=_model("smoke", {"n_layers": 1}, 0))
    with pytest.raises(ValueError, match="max_seq_len"):
        speculative_generate(models["attention"], [1] * 100, 30)


def _perturbed_copy(model, scale, seed):
    import jax
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, noisy))


@pytest.mark.parametrize("target_kind", ["attention", "hybrid"])
def test_partial_acceptance_rolls_caches_back(models, target_kind):
    """A slightly perturbed copy of the target as draft: most proposals accepted, some rejected, so both
    rollback paths (position reset, recurrent-state re-run) are exercised; output still equals greedy."""
    target = models[target_kind]
    draft = _perturbed_copy(target, 0.003, seed=3)
    prompt = [7, 8, 9, 10, 11]
    out, stats = speculative_generate(target, prompt, 40, draft=draft, gamma=4)
    assert out == generate(target, prompt, 40, temperature=0.0)
    assert 0.2 < stats["acceptance_rate"] < 1.0, stats


@pytest.mark.slow
def test_speculative_benchmark_smoke(tmp_path):
    from experiments import speculative
    s = speculative.main(["--preset", "smoke", "--out", str(tmp_path)])
    rows = s["results"]
    assert {r["system"] for r in rows} == {"target only", "prompt lookup", "draft",
                                           "engine", "engine + draft", "engine + prompt lookup"}
    for r in rows:
        assert r["tokens_per_second"] > 0
        if not r["system"].startswith("engine"):
            assert r["tokens_per_target_call"] > 0
        if r["temperature"] == 0:
            assert r["greedy_equal"] is True  # speculative greedy == target-only greedy, token for token
    assert s["cost_ratio_c"] > 0 and (tmp_path / "speculative.png").stat().st_size > 0
    assert speculative.expected_speedup(0.0, 4, 0.1) == pytest.approx(1 / 1.4)
    assert speculative.expected_speedup(1.0, 4, 0.0) == pytest.approx(5.0)
