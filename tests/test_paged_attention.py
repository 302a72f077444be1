"""Paged attention reference == contiguous-cache attention, for decode and prefill chunks, GQA, partial
last pages, empty slots and scattered page ids."""

import jax.numpy as jnp
import numpy as np
import pytest

from mani_jax import core


def _setup(seed, lengths, page_size=4, hq=4, hkv=2, d=8, extra_pages=3):
    rng = np.random.default_rng(seed)
    b = len(lengths)
    max_pages = max(1, max(-(-l // page_size) for l in lengths))
    n_pages = b * max_pages + extra_pages
    perm = rng.permutation(n_pages)  # scattered, non-contiguous page ids
    tables = perm[:b * max_pages].reshape(b, max_pages).astype(np.int32)
    s = max_pages * page_size
    k = rng.normal(size=(b, s, hkv, d)).astype(np.float32)
    v = rng.normal(size=(b, s, hkv, d)).astype(np.float32)
    k_pages = rng.normal(size=(n_pages, page_size, hkv, d)).astype(np.float32) * 100  # poison
    v_pages = rng.normal(size=(n_pages, page_size, hkv, d)).astype(np.float32) * 100
    for i in range(b):
        for j in range(max_pages):
            k_pages[tables[i, j]] = k[i, j * page_size:(j + 1) * page_size]
            v_pages[tables[i, j]] = v[i, j * page_size:(j + 1) * page_size]
    return rng, tables, k, v, jnp.asarray(k_pages), jnp.asarray(v_pages), hq, d


def test_gather_pages_restores_contiguous_layout():
    _, tables, k, _, k_pages, _, _, _ = _setup(0, [5, 8])
    np.testing.assert_array_equal(core.gather_pages(k_pages, jnp.asarray(tables)), k)


@pytest.mark.parametrize("lengths", [[1, 5, 8], [4, 13], [0, 3]])
def test_decode_matches_contiguous_attention(lengths):
    rng, tables, k, v, k_pages, v_pages, hq, d = _setup(len(lengths) * 7, lengths)
    q = jnp.asarray(rng.normal(size=(len(lengths), hq, d)).astype(np.float32))
    lens = jnp.asarray(lengths, jnp.int32)
    out = core.paged_attention(q, k_pages, v_pages, jnp.asarray(tables), lens)
    for i, l in enumerate(lengths):
        if l == 0:
            np.testing.assert_array_equal(out[i], 0.0)  # empty slot: zeros, not NaN
            continue
        ref = core.attention(q[i:i + 1, None], jnp.asarray(k[i:i + 1, :l]), jnp.asarray(v[i:i + 1, :l]))
        np.testing.assert_allclose(out[i], ref[0, 0], rtol=1e-5, atol=1e-5)


def test_prefill_chunk_matches_causal_attention():
    lengths = [11, 6]
    rng, tables, k, v, k_pages, v_pages, hq, d = _setup(3, lengths)
    t = 4  # the last 4 tokens of each sequence are the new chunk
    q = jnp.asarray(rng.normal(size=(2, t, hq, d)).astype(np.float32))
    qpos = jnp.asarray([[l - t + j for j in range(t)] for l in lengths], jnp.int32)
    out = core.paged_attention(q, k_pages, v_pages, jnp.asarray(tables), jnp.asarray(lengths, jnp.int32),
                               q_positions=qpos)
    for i, l in enumerate(lengths):
        ref = core.attention(q[i:i + 1], jnp.asarray(k[i:i + 1, :l]), jnp.asarray(v[i:i + 1, :l]), causal=True)
        np.testing.assert_allclose(out[i], ref[0], rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_rejected():
    _, tables, _, _, k_pages, v_pages, hq, d = _setup(0, [3])
    with pytest.raises(ValueError, match="q_positions"):
        core.paged_attention(jnp.zeros((1, 2, hq, d)), k_pages, v_pages, jnp.asarray(tables), jnp.asarray([3]))
    with pytest.raises(ValueError, match="lengths"):
        core.paged_attention(jnp.zeros((1, hq, d)), k_pages, v_pages, jnp.asarray(tables), jnp.asarray([3, 4]))
