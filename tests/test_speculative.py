"""The speculative verify rule keeps the target distribution (chi-square on adversarial p/q pairs, and a
wrong rule fails the same test); greedy verification equals the target's argmax; prompt-lookup drafting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chisquare

from mani_jax.core.speculative import prompt_lookup_draft, speculative_verify

V, G, N = 6, 3, 20000


def _pairs():
    rng = np.random.default_rng(0)
    p_rand = rng.dirichlet(np.ones(V), size=G + 1)
    q_rand = rng.dirichlet(np.ones(V), size=G)
    disjoint_p = np.tile([0.5, 0.3, 0.2, 0, 0, 0], (G + 1, 1))
    disjoint_q = np.tile([0, 0, 0, 0.2, 0.3, 0.5], (G, 1))
    one_hot_q = np.tile(np.eye(V)[1], (G, 1))
    return {
        "random": (p_rand, q_rand),
        "disjoint supports": (disjoint_p, disjoint_q),
        "one-hot draft": (p_rand, one_hot_q),
        "p equals q": (p_rand, p_rand[:G]),
    }


def _run(p, q, seed, wrong=False):
    """N independent rounds with fixed per-position p and q; returns the emitted tokens and counts."""
    p = jnp.asarray(p, jnp.float32)[None].repeat(N, 0)
    q = jnp.asarray(q, jnp.float32)[None].repeat(N, 0)
    k_draft, k_verify = jax.random.split(jax.random.PRNGKey(seed))
    draft = jax.random.categorical(k_draft, jnp.log(q), axis=-1)  # [N, G] sampled from q
    if wrong:  # accept every draft token, then a bonus from p
        bonus = jax.random.categorical(k_verify, jnp.log(p[:, G]), axis=-1)
        return np.asarray(jnp.concatenate([draft, bonus[:, None]], 1)), np.full(N, G + 1)
    tokens, n = speculative_verify(k_verify, draft, q, p)
    return np.asarray(tokens), np.asarray(n)


def _chi2_pvalue(samples, probs):
    counts = np.bincount(samples, minlength=V)
    support = probs > 0
    assert counts[~support].sum() == 0, "a token outside p's support was emitted"
    expected = probs[support] / probs[support].sum() * counts.sum()
    return chisquare(counts[support], expected).pvalue if support.sum() > 1 else 1.0


@pytest.mark.parametrize("name", list(_pairs()))
def test_emitted_tokens_follow_the_target_distribution(name):
    p, q = _pairs()[name]
    tokens, n = _run(p, q, seed=1)
    assert n.min() >= 1 and n.max() <= G + 1
    # Position 0 is always emitted and must be ~ p_0; position 1, when emitted, ~ p_1 (p does not depend
    # on the prefix here, so the guarantee holds position by position).
    assert _chi2_pvalue(tokens[:, 0], p[0]) > 1e-3
    emitted1 = tokens[n >= 2, 1]
    if emitted1.size > 1000:
        assert _chi2_pvalue(emitted1, p[1]) > 1e-3
    if name == "p equals q":
        assert (n == G + 1).all()  # identical distributions: every draft token is accepted
    if name == "disjoint supports":
        assert (n == 1).all()  # nothing the draft proposes is possible under p


@pytest.mark.parametrize("name", ["random", "disjoint supports", "one-hot draft"])
def test_accepting_every_draft_token_fails_the_same_test(name):
    p, q = _pairs()[name]
    tokens, _ = _run(p, q, seed=1, wrong=True)
    counts = np.bincount(tokens[:, 0], minlength=V)
    if (counts[p[0] == 0] > 0).any():
        return  # emitted tokens that p forbids: fails outright
    assert _chi2_pvalue(tokens[:, 0], p[0]) < 1e-6


def test_greedy_verification_is_target_argmax():
    rng = np.random.default_rng(3)
    b, g, v = 64, 4, 11
    p_logits = rng.normal(size=(b, g + 1, v))
    target = p_logits.argmax(-1)
    draft = np.where(rng.random((b, g)) < 0.7, target[:, :g], rng.integers(0, v, (b, g)))
    one_hot = lambda idx: jax.nn.one_hot(idx, v)
    tokens, n = speculative_verify(jax.random.PRNGKey(0), jnp.asarray(draft), one_hot(draft), one_hot(target))
    tokens, n = np.asarray(tokens), np.asarray(n)
    for i in range(b):
        match = 0
        while match < g and draft[i, match] == target[i, match]:
            match += 1
        assert n[i] == match + 1
        np.testing.assert_array_equal(tokens[i, :n[i]], target[i, :n[i]])


def test_verify_rejects_bad_shapes():
    with pytest.raises(ValueError, match="p_probs"):
        speculative_verify(jax.random.PRNGKey(0), jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3, 5)),
                           jnp.zeros((2, 3, 5)))


def test_prompt_lookup_draft():
    seq = [5, 6, 7, 8, 9, 1, 2, 5, 6, 7]
    assert prompt_lookup_draft(seq, n_gram=3, gamma=2) == [8, 9]
    assert prompt_lookup_draft(seq, n_gram=3, gamma=10) == [8, 9, 1, 2, 5, 6, 7]
    assert prompt_lookup_draft([1, 2, 3, 4], n_gram=2) == []
    assert prompt_lookup_draft([4, 1, 2, 4], n_gram=2, gamma=2) == [1, 2]  # falls back to a 1-gram
    assert prompt_lookup_draft([3, 1, 3, 2, 3], n_gram=1, gamma=1) == [2]  # the most recent match wins
    with pytest.raises(ValueError, match="gamma"):
        prompt_lookup_draft(seq, gamma=0)
