"""mani_jax.core against float64 NumPy references written independently here (loops, no shared code)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mani_jax import core

RNG = np.random.default_rng(1234)


def f32(x):
    return jnp.asarray(x, jnp.float32)


# ---------------------------------------------------------------- attention
def np_attention(q, k, v, mask, scale):
    """float64 loop reference. q [b,t,hq,d], k/v [b,s,hkv,d], mask [b,t,s] bool."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    out = np.zeros((b, t, hq, v.shape[-1]))
    lse = np.full((b, t, hq), -np.inf)
    for bi in range(b):
        for h in range(hq):
            kh = h // g
            logits = q[bi, :, h] @ k[bi, :, kh].T * scale
            for ti in range(t):
                vis = mask[bi, ti]
                if not vis.any():
                    continue
                row = logits[ti][vis]
                m = row.max()
                p = np.exp(row - m)
                out[bi, ti, h] = p @ v[bi, vis, kh] / p.sum()
                lse[bi, ti, h] = m + np.log(p.sum())
    return out, lse


def np_mask(qpos, kpos, causal, qseg=None, kseg=None, window=None):
    m = np.ones((qpos.shape[0], qpos.shape[1], kpos.shape[1]), bool)
    dq, dk = qpos[:, :, None], kpos[:, None, :]
    if causal:
        m &= dk <= dq
    if window is not None:
        m &= (dq - dk) < window
        if not causal:
            m &= (dk - dq) < window
    if qseg is not None:
        m &= qseg[:, :, None] == kseg[:, None, :]
    return m


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("use_seg", [False, True])
@pytest.mark.parametrize("window", [None, 4])
def test_attention_matches_float64(causal, use_seg, window):
    b, t, hq, hkv, d = 2, 13, 6, 2, 8
    q, k, v = (RNG.normal(size=(b, t, h, d)) for h in (hq, hkv, hkv))
    seg = np.sort(RNG.integers(1, 4, size=(b, t)), axis=1) if use_seg else None
    pos = np.broadcast_to(np.arange(t), (b, t))
    scale = 0.37
    ref, ref_lse = np_attention(q, k, v, np_mask(pos, pos, causal, seg, seg, window), scale)
    out, lse = core.attention(f32(q), f32(k), f32(v), causal=causal, segment_ids=None if seg is None else jnp.asarray(seg),
                              sliding_window=window, softmax_scale=scale, return_lse=True)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), ref_lse, atol=2e-5, rtol=1e-5)
    for block in (1, 4, 7, 64):
        out_b, lse_b = core.blockwise_attention(f32(q), f32(k), f32(v), block_kv=block, causal=causal,
                                                segment_ids=None if seg is None else jnp.asarray(seg),
                                                sliding_window=window, softmax_scale=scale, return_lse=True)
        np.testing.assert_allclose(np.asarray(out_b), ref, atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(lse_b), ref_lse, atol=2e-5, rtol=1e-5)


def test_attention_cross_lengths_bottom_right_and_default_scale():
    b, t, s, h, d = 1, 3, 11, 2, 16
    q, k, v = RNG.normal(size=(b, t, h, d)), RNG.normal(size=(b, s, h, d)), RNG.normal(size=(b, s, h, 5))
    qpos = np.arange(t)[None] + s - t
    ref, _ = np_attention(q, k, v, np_mask(qpos, np.arange(s)[None], True), 1 / np.sqrt(d))
    out = core.attention(f32(q), f32(k), f32(v), causal=True)
    assert out.shape == (b, t, h, 5)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=1e-5)


def test_attention_fully_masked_rows_are_zero_not_nan():
    q = k = v = f32(RNG.normal(size=(1, 4, 2, 8)))
    seg_q = jnp.array([[1, 1, 2, 2]])
    out, lse = core.attention(q, k, v, segment_ids=seg_q, kv_segment_ids=jnp.array([[1, 1, 1, 1]]), return_lse=True)
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_array_equal(np.asarray(out[:, 2:]), 0.0)
    assert np.all(np.isneginf(np.asarray(lse[:, 2:])))
    out_b = core.blockwise_attention(q, k, v, block_kv=3, segment_ids=seg_q, kv_segment_ids=jnp.array([[1, 1, 1, 1]]))
    np.testing.assert_array_equal(np.asarray(out_b[:, 2:]), 0.0)
    g = jax.grad(lambda q: core.attention(q, k, v, segment_ids=seg_q, kv_segment_ids=jnp.ones((1, 4), jnp.int32)).sum())(q)
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("bad", [
    dict(q=(2, 5, 4, 8), k=(2, 5, 3, 8)),  # heads not a multiple
    dict(q=(2, 5, 4, 8), k=(2, 5, 2, 6)),  # head_dim mismatch
    dict(q=(5, 4, 8), k=(2, 5, 2, 8)),  # rank
])
def test_attention_bad_shapes(bad):
    q = jnp.zeros(bad["q"])
    k = jnp.zeros(bad["k"])
    with pytest.raises(ValueError):
        core.attention(q, k, k)


def test_attention_bad_options():
    x = jnp.zeros((1, 5, 2, 4))
    with pytest.raises(ValueError, match="segment_ids"):
        core.attention(x, x, x, segment_ids=jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="sliding_window"):
        core.attention(x, x, x, sliding_window=0)


# ---------------------------------------------------------------- rope, norms, activations
def test_rope_matches_float64_and_is_relative():
    b, t, h, d, theta = 2, 9, 3, 10, 500.0
    x = RNG.normal(size=(b, t, h, d))
    pos = RNG.integers(0, 1000, size=(b, t))
    inv = theta ** (-np.arange(0, d, 2) / d)
    ref = np.empty_like(x)
    for i in range(d // 2):  # rotate-half pairs (i, i + d/2)
        ang = pos[..., None] * inv[i]
        x1, x2 = x[..., i], x[..., i + d // 2]
        ref[..., i] = x1 * np.cos(ang) - x2 * np.sin(ang)
        ref[..., i + d // 2] = x2 * np.cos(ang) + x1 * np.sin(ang)
    out = core.apply_rope(f32(x), jnp.asarray(pos), theta=theta)
    np.testing.assert_allclose(np.asarray(out), ref, atol=3e-4, rtol=1e-4)  # angles up to 1000 rad in f32
    # <rope(q, m), rope(k, n)> depends only on m - n.
    q, k = f32(RNG.normal(size=(1, 1, 1, d))), f32(RNG.normal(size=(1, 1, 1, d)))
    dot = lambda m, n: float(jnp.sum(core.apply_rope(q, jnp.array([[m]])) * core.apply_rope(k, jnp.array([[n]]))))
    assert abs(dot(7, 3) - dot(104, 100)) < 1e-4
    partial = core.apply_rope(f32(x), jnp.asarray(pos), theta=theta, rotary_dim=4)
    np.testing.assert_array_equal(np.asarray(partial[..., 4:]), np.asarray(f32(x))[..., 4:])
    with pytest.raises(ValueError, match="positions"):
        core.apply_rope(f32(x), jnp.zeros((b, t + 1), jnp.int32))


def test_rms_norm_and_gated_grouped_norm():
    x = RNG.normal(size=(3, 5, 12))
    w = RNG.normal(size=12)
    eps = 1e-5
    ref = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w
    np.testing.assert_allclose(np.asarray(core.rms_norm(f32(x), f32(w), eps)), ref, rtol=1e-5, atol=1e-5)
    z = RNG.normal(size=x.shape)
    h = x * z / (1 + np.exp(-z))
    for g in (1, 2, 3):
        hg = h.reshape(3, 5, g, 12 // g)
        refg = (hg / np.sqrt((hg ** 2).mean(-1, keepdims=True) + eps)).reshape(h.shape) * w
        out = core.gated_rms_norm(f32(x), f32(z), f32(w), n_groups=g, eps=eps)
        np.testing.assert_allclose(np.asarray(out), refg, rtol=1e-5, atol=1e-5)
    assert core.rms_norm(f32(x).astype(jnp.bfloat16), f32(w), eps).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="n_groups"):
        core.gated_rms_norm(f32(x), f32(z), f32(w), n_groups=5)
    with pytest.raises(ValueError, match="weight"):
        core.rms_norm(f32(x), f32(w[:5]))


def test_swiglu_and_softplus():
    a, b = RNG.normal(size=(4, 7)), RNG.normal(size=(4, 7))
    np.testing.assert_allclose(np.asarray(core.swiglu(f32(a), f32(b))), a / (1 + np.exp(-a)) * b, rtol=1e-5, atol=1e-6)
    xs = np.array([-50.0, -3.0, 0.0, 2.0, 30.0])
    np.testing.assert_allclose(np.asarray(core.softplus(f32(xs))), np.log1p(np.exp(xs)), rtol=1e-6)
    with pytest.raises(ValueError):
        core.swiglu(f32(a), f32(b[:, :3]))


# ---------------------------------------------------------------- SSD
def ssd_inputs(b=2, l=37, h=4, p=3, g=2, n=5):
    x = RNG.normal(size=(b, l, h, p))
    dt = np.log1p(np.exp(RNG.normal(size=(b, l, h)) - 1))
    A = -np.exp(RNG.normal(size=h))
    B, C = RNG.normal(size=(b, l, g, n)), RNG.normal(size=(b, l, g, n))
    D = RNG.normal(size=h)
    s0 = RNG.normal(size=(b, h, p, n))
    return x, dt, A, B, C, D, s0


def np_ssd(x, dt, A, B, C, D, s0, seg=None):
    """float64 token loop: h = exp(dt A) h + dt x B^T, reset at segment starts; y = h C + D x."""
    b, l, h, p = x.shape
    g = B.shape[2]
    y = np.zeros_like(x)
    final = np.zeros_like(s0)
    for bi in range(b):
        state = s0[bi].copy()
        for t in range(l):
            if seg is not None and t > 0 and seg[bi, t] != seg[bi, t - 1]:
                state[:] = 0
            for hi in range(h):
                gi = hi // (h // g)
                state[hi] = np.exp(dt[bi, t, hi] * A[hi]) * state[hi] + dt[bi, t, hi] * np.outer(x[bi, t, hi], B[bi, t, gi])
                y[bi, t, hi] = state[hi] @ C[bi, t, gi] + D[hi] * x[bi, t, hi]
        final[bi] = state
    return y, final


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 64])
def test_ssd_chunked_matches_float64_recurrence(chunk_size):
    x, dt, A, B, C, D, s0 = ssd_inputs()
    y_ref, s_ref = np_ssd(x, dt, A, B, C, D, s0)
    y, s = core.ssd_chunked(f32(x), f32(dt), f32(A), f32(B), f32(C), chunk_size=chunk_size, D=f32(D),
                            initial_state=f32(s0))
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(s), s_ref, rtol=1e-4, atol=1e-4)
    y2, s2 = core.ssd_recurrent(f32(x), f32(dt), f32(A), f32(B), f32(C), D=f32(D), initial_state=f32(s0))
    np.testing.assert_allclose(np.asarray(y2), y_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk_size", [4, 16])
def test_ssd_segments_equal_separate_runs(chunk_size):
    x, dt, A, B, C, D, s0 = ssd_inputs(b=1)
    seg = np.array([[1] * 9 + [2] * 14 + [3] * 14])
    y, _ = core.ssd_chunked(f32(x), f32(dt), f32(A), f32(B), f32(C), chunk_size=chunk_size, D=f32(D),
                            initial_state=f32(s0), segment_ids=jnp.asarray(seg))
    y_ref, _ = np_ssd(x, dt, A, B, C, D, s0, seg)
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-4, atol=1e-4)
    # Independently: the third document alone from a zero state.
    sl = slice(23, 37)
    y3, _ = core.ssd_chunked(f32(x[:, sl]), f32(dt[:, sl]), f32(A), f32(B[:, sl]), f32(C[:, sl]),
                             chunk_size=chunk_size, D=f32(D))
    np.testing.assert_allclose(np.asarray(y[:, sl]), np.asarray(y3), rtol=1e-4, atol=1e-4)


def test_ssd_step_chain_and_prefill_handoff():
    x, dt, A, B, C, D, s0 = ssd_inputs()
    y_full, s_full = core.ssd_chunked(f32(x), f32(dt), f32(A), f32(B), f32(C), chunk_size=8, D=f32(D))
    _, state = core.ssd_chunked(f32(x[:, :20]), f32(dt[:, :20]), f32(A), f32(B[:, :20]), f32(C[:, :20]),
                                chunk_size=8, D=f32(D))
    for t in range(20, 37):
        yt, state = core.ssd_step(state, f32(x[:, t]), f32(dt[:, t]), f32(A), f32(B[:, t]), f32(C[:, t]), D=f32(D))
        np.testing.assert_allclose(np.asarray(yt), np.asarray(y_full[:, t]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(state), np.asarray(s_full), rtol=1e-4, atol=1e-4)


def test_segsum_is_stable_and_exact():
    a = RNG.normal(size=(3, 6))
    s = np.asarray(core.segsum(f32(a)))
    for i in range(6):
        for j in range(6):
            if i >= j:
                np.testing.assert_allclose(s[:, i, j], a[:, j + 1:i + 1].sum(-1), atol=1e-5)
            else:
                assert np.all(np.isneginf(s[:, i, j]))


def test_ssd_gradients_are_finite_and_match_recurrent():
    x, dt, A, B, C, D, s0 = ssd_inputs(l=19)
    seg = jnp.asarray(np.array([[1] * 7 + [2] * 12, [1] * 19]))
    args = tuple(f32(t) for t in (x, dt, A, B, C))

    def loss(fn, *a, **kw):
        y, s = fn(*a, D=f32(D), segment_ids=seg, **kw)
        return jnp.sum(jnp.sin(y)) + jnp.sum(s ** 2)

    g1 = jax.grad(lambda *a: loss(core.ssd_chunked, *a, chunk_size=4), argnums=(0, 1, 2, 3, 4))(*args)
    g2 = jax.grad(lambda *a: loss(core.ssd_recurrent, *a), argnums=(0, 1, 2, 3, 4))(*args)
    for a, b in zip(g1, g2):
        assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=2e-3)


def test_ssd_bad_inputs():
    x, dt, A, B, C, D, s0 = (f32(t) for t in ssd_inputs())
    with pytest.raises(ValueError, match="dt"):
        core.ssd_chunked(x, dt[:, :3], A, B, C, chunk_size=8)
    with pytest.raises(ValueError, match="n_groups"):
        core.ssd_chunked(x, dt, A, B[:, :, :1].repeat(3, 2), C[:, :, :1].repeat(3, 2), chunk_size=8)
    with pytest.raises(ValueError, match="chunk_size"):
        core.ssd_chunked(x, dt, A, B, C, chunk_size=0)
    with pytest.raises(ValueError, match="initial_state"):
        core.ssd_chunked(x, dt, A, B, C, chunk_size=8, initial_state=s0[:, :2])


# ---------------------------------------------------------------- causal conv1d
def np_conv(x, w, bias, init):
    b, l, c = x.shape
    k = w.shape[1]
    xp = np.concatenate([init, x], 1)
    y = np.zeros_like(x)
    for t in range(l):
        for j in range(k):
            y[:, t] += w[:, j] * xp[:, t + j]
    return y + bias, xp[:, l:]


@pytest.mark.parametrize("l", [1, 2, 11])
def test_causal_conv1d_matches_float64_and_steps(l):
    b, c, k = 2, 7, 4
    x, w, bias, init = RNG.normal(size=(b, l, c)), RNG.normal(size=(c, k)), RNG.normal(size=c), RNG.normal(size=(b, k - 1, c))
    y_ref, s_ref = np_conv(x, w, bias, init)
    y, s = core.causal_conv1d(f32(x), f32(w), f32(bias), initial_state=f32(init))
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s), s_ref, rtol=1e-6)
    state = f32(init)
    for t in range(l):
        yt, state = core.causal_conv1d_step(state, f32(x[:, t]), f32(w), f32(bias))
        np.testing.assert_allclose(np.asarray(yt), y_ref[:, t], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state), s_ref, rtol=1e-6)


def test_causal_conv1d_segments_do_not_mix():
    b, l, c, k = 1, 10, 3, 4
    x, w = RNG.normal(size=(b, l, c)), RNG.normal(size=(c, k))
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2, 3, 3]])
    y, s = core.causal_conv1d(f32(x), f32(w), segment_ids=seg)
    y2, _ = core.causal_conv1d(f32(x[:, 3:8]), f32(w))
    np.testing.assert_allclose(np.asarray(y[:, 3:8]), np.asarray(y2), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(s[:, 0]), 0.0)  # the state row from segment 2 is dropped
    with pytest.raises(ValueError, match="weight"):
        core.causal_conv1d(f32(x), f32(w[:2]))
