"""mani_jax.core.moe against float64 NumPy references written independently here (loops, no shared code)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mani_jax.core import moe

RNG = np.random.default_rng(7)
MOE_FFN = jax.jit(moe.moe_ffn, static_argnames=("top_k", "capacity_factor", "renormalize", "dispatch",
                                                 "dropless_impl", "block_size"))


def f32(x):
    return jnp.asarray(x, jnp.float32)


# ------------------------------------------------------------------ NumPy float64 references
def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_logsumexp(z):
    m = z.max(-1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]


def np_router(x, w, k, renormalize=True):
    logits = x.astype(np.float64) @ w.astype(np.float64)
    probs = np_softmax(logits)
    flat = probs.reshape(-1, probs.shape[-1])
    experts = np.zeros((flat.shape[0], k), np.int64)
    weights = np.zeros((flat.shape[0], k))
    for t in range(flat.shape[0]):
        order = sorted(range(flat.shape[1]), key=lambda e: (-flat[t, e], e))[:k]
        experts[t] = order
        weights[t] = flat[t, order] / (flat[t, order].sum() if renormalize else 1.0)
    lead = logits.shape[:-1]
    return weights.reshape(*lead, k), experts.reshape(*lead, k), logits


def np_swiglu_expert(xt, wg, wu, wd):
    g, u = xt @ wg, xt @ wu
    return (g / (1.0 + np.exp(-g)) * u) @ wd


def np_moe(x, weights, experts, wg, wu, wd, keep=None):
    """Per token: sum over its k experts (those kept) of weight * SwiGLU_e(x)."""
    d = x.shape[-1]
    xf = x.reshape(-1, d).astype(np.float64)
    k = experts.shape[-1]
    ef, wf = experts.reshape(-1, k), weights.reshape(-1, k).astype(np.float64)
    wg, wu, wd = (np.asarray(w, np.float64) for w in (wg, wu, wd))
    y = np.zeros_like(xf)
    for t in range(xf.shape[0]):
        for j in range(k):
            if keep is not None and not keep[t, j]:
                continue
            e = ef[t, j]
            y[t] += wf[t, j] * np_swiglu_expert(xf[t], wg[e], wu[e], wd[e])
    return y.reshape(x.shape)


def np_capacity_keep(experts, n_experts, cap, valid=None):
    """Which (token, slot) assignments survive: first choices of all tokens (token order), then second, ..."""
    t, k = experts.shape
    valid = np.ones(t, bool) if valid is None else valid
    used = [0] * n_experts
    keep = np.zeros((t, k), bool)
    for j in range(k):
        for ti in range(t):
            if not valid[ti]:
                continue
            e = experts[ti, j]
            if used[e] < cap:
                keep[ti, j] = True
            used[e] += 1
    return keep


def make_params(d, f, e, scale=0.4, dtype=np.float32):
    return tuple(np.asarray(RNG.normal(size=s) * scale, dtype) for s in ((e, d, f), (e, d, f), (e, f, d)))


# ------------------------------------------------------------------ router
@pytest.mark.parametrize("k", [1, 2, 3])
def test_router_matches_float64(k):
    d, e = 16, 6
    x, w = RNG.normal(size=(2, 5, d)), RNG.normal(size=(d, e))
    ref_w, ref_e, ref_logits = np_router(x, w, k)
    weights, experts, logits = moe.router(f32(x), f32(w), top_k=k)
    assert weights.dtype == jnp.float32 and experts.dtype == jnp.int32 and logits.dtype == jnp.float32
    assert weights.shape == (2, 5, k) and experts.shape == (2, 5, k) and logits.shape == (2, 5, e)
    np.testing.assert_array_equal(np.asarray(experts), ref_e)
    np.testing.assert_allclose(np.asarray(weights), ref_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)
    # renormalised softmax over experts == softmax over the k selected logits
    top = np.take_along_axis(ref_logits, ref_e, axis=-1)
    np.testing.assert_allclose(np.asarray(weights), np_softmax(top), rtol=1e-5, atol=1e-6)
    # without renormalisation: the plain softmax probabilities of the selected experts
    w_plain, e_plain, _ = moe.router(f32(x), f32(w), top_k=k, renormalize=False)
    np.testing.assert_array_equal(np.asarray(e_plain), ref_e)
    np.testing.assert_allclose(np.asarray(w_plain), np_router(x, w, k, renormalize=False)[0], rtol=1e-5, atol=1e-6)


def test_router_bf16_input_gives_float32_router_math():
    d, e, k = 32, 8, 2
    x = jnp.asarray(RNG.normal(size=(7, d)), jnp.bfloat16)
    w = jnp.asarray(RNG.normal(size=(d, e)), jnp.bfloat16)
    weights, experts, logits = moe.router(x, w, top_k=k)
    assert weights.dtype == jnp.float32 and logits.dtype == jnp.float32 and experts.dtype == jnp.int32
    # the bf16 values, multiplied exactly (float64) -- float32 math at HIGHEST precision matches closely
    ref_w, ref_e, ref_logits = np_router(np.asarray(x.astype(jnp.float32)), np.asarray(w.astype(jnp.float32)), k)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(experts), ref_e)
    np.testing.assert_allclose(np.asarray(weights), ref_w, rtol=1e-5, atol=1e-6)


def test_router_ties_follow_lax_top_k():
    x = jnp.zeros((3, 4), jnp.float32)  # all logits equal
    weights, experts, _ = moe.router(x, jnp.ones((4, 5)), top_k=3)
    _, ref = jax.lax.top_k(jnp.zeros((3, 5)), 3)
    np.testing.assert_array_equal(np.asarray(experts), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(experts), np.tile([0, 1, 2], (3, 1)))
    np.testing.assert_allclose(np.asarray(weights), 1.0 / 3, rtol=1e-6)


# ------------------------------------------------------------------ dispatch paths
PATHS = [
    ("dropless", {}),
    ("dropless_blocked", {}),
    ("capacity_einsum", {"dispatch": "einsum"}),
    ("capacity_gather", {"dispatch": "gather"}),
]


def run_path(name, x, weights, experts, params, *, capacity_factor=None, mask=None):
    if name == "dropless":
        return moe.moe_dropless(x, weights, experts, *params, mask=mask)
    if name == "dropless_blocked":  # a small awkward block: groups straddle blocks, padding rows in between
        return moe.moe_dropless(x, weights, experts, *params, mask=mask, impl="blocked", block_size=3)
    dispatch = name.split("_")[1]
    n_experts = params[0].shape[0]
    cf = n_experts / experts.shape[-1] if capacity_factor is None else capacity_factor  # C = T: never drops
    return moe.moe_capacity(x, weights, experts, *params, capacity_factor=cf, mask=mask, dispatch=dispatch)


@pytest.mark.parametrize("name", [p[0] for p in PATHS])
@pytest.mark.parametrize("k", [1, 2])
def test_dispatch_matches_float64_loop(name, k):
    b, s, d, f, e = 2, 7, 12, 20, 5
    x, wr = RNG.normal(size=(b, s, d)), RNG.normal(size=(d, e))
    params = make_params(d, f, e)
    ref_w, ref_e, _ = np_router(x, wr, k)
    ref = np_moe(x, ref_w, ref_e, *params)
    weights, experts, _ = moe.router(f32(x), f32(wr), top_k=k)
    y, stats = run_path(name, f32(x), weights, experts, tuple(map(f32, params)))
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-5, atol=2e-5)
    assert int(stats["n_dropped"]) == 0 and float(stats["dropped_fraction"]) == 0.0
    np.testing.assert_array_equal(np.asarray(stats["expert_counts"]), np.bincount(ref_e.ravel(), minlength=e))


@pytest.mark.parametrize("name", [p[0] for p in PATHS])
def test_dispatch_with_padding_mask(name):
    t, d, f, e, k = 11, 8, 16, 4, 2
    x, wr = RNG.normal(size=(t, d)), RNG.normal(size=(d, e))
    params = make_params(d, f, e)
    valid = RNG.random(t) < 0.6
    valid[0] = True
    ref_w, ref_e, _ = np_router(x, wr, k)
    ref = np_moe(x, ref_w, ref_e, *params, keep=np.repeat(valid[:, None], k, 1))
    weights, experts, _ = moe.router(f32(x), f32(wr), top_k=k)
    y, stats = run_path(name, f32(x), weights, experts, tuple(map(f32, params)), mask=jnp.asarray(valid))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(y)[~valid], 0.0)
    np.testing.assert_array_equal(np.asarray(stats["expert_counts"]),
                                  np.bincount(ref_e[valid].ravel(), minlength=e))


def test_dropless_blocked_with_empty_and_overfull_experts():
    d, f, e, k = 4, 6, 5, 2
    x = f32(RNG.normal(size=(9, d)))
    params = tuple(map(f32, make_params(d, f, e)))
    # expert 1 and 3 get nothing, expert 0 everything's first choice; one token is padding
    experts = jnp.asarray([[0, 2]] * 5 + [[0, 4]] * 4, jnp.int32)
    weights = f32(RNG.random((9, k)))
    valid = np.array([True] * 8 + [False])
    ref = np_moe(np.asarray(x), np.asarray(weights), np.asarray(experts), *map(np.asarray, params),
                 keep=np.repeat(valid[:, None], k, 1))
    for bs in (1, 2, 4, 64):
        y, stats = moe.moe_dropless(x, weights, experts, *params, mask=jnp.asarray(valid), impl="blocked",
                                    block_size=bs)
        np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-5, atol=2e-5)
        np.testing.assert_array_equal(np.asarray(stats["expert_counts"]), [8, 0, 5, 0, 3])
    y, _ = moe.moe_dropless(x, weights, experts, *params, mask=jnp.asarray(valid))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dropless_equals_capacity_without_drops(dtype):
    b, s, d, f, e, k = 3, 16, 16, 24, 8, 2
    x = jnp.asarray(RNG.normal(size=(b, s, d)), dtype)
    wr = jnp.asarray(RNG.normal(size=(d, e)), jnp.float32)
    params = tuple(jnp.asarray(p, dtype) for p in make_params(d, f, e))
    y_drop, aux_drop = MOE_FFN(x, wr, *params, top_k=k)
    assert y_drop.dtype == dtype and float(aux_drop["dropped_fraction"]) == 0.0
    for dispatch in ("einsum", "gather", "blocked"):
        if dispatch == "blocked":  # the other dropless implementation
            y_cap, aux_cap = MOE_FFN(x, wr, *params, top_k=k, dropless_impl="blocked", block_size=8)
        else:  # capacity_factor = n_experts / top_k gives capacity = T: an expert can never overflow
            y_cap, aux_cap = MOE_FFN(x, wr, *params, top_k=k, capacity_factor=e / k, dispatch=dispatch)
        assert y_cap.dtype == dtype and float(aux_cap["dropped_fraction"]) == 0.0
        tol = 1e-6 if dtype == jnp.float32 else 1e-2
        np.testing.assert_allclose(np.asarray(y_cap, np.float32), np.asarray(y_drop, np.float32), rtol=tol, atol=tol)
        np.testing.assert_array_equal(np.asarray(aux_cap["experts"]), np.asarray(aux_drop["experts"]))
    if dtype == jnp.bfloat16:  # bf16 experts with f32 accumulation stay close to the f32 computation
        ref = np_moe(np.asarray(x, np.float64), np.asarray(aux_drop["weights"]), np.asarray(aux_drop["experts"]),
                     *(np.asarray(p, np.float64) for p in params))
        np.testing.assert_allclose(np.asarray(y_drop, np.float32), ref, rtol=0.05, atol=0.05)


def test_capacity_formula():
    assert moe.capacity(4096, 8, 2, 1.25) == 1280
    assert moe.capacity(10, 4, 2, 0.5) == 3  # ceil(2.5)
    assert moe.capacity(10, 4, 1, 1.0) == 3  # ceil(2.5)
    assert moe.capacity(25, 5, 2, 1.1) == 11  # 2 * 25 * 1.1 / 5 = 11.000000000000002 in floats: no extra slot
    assert moe.capacity(1, 8, 1, 0.1) == 1


def test_capacity_priority_first_choices_before_second():
    # C = ceil(2 * 3 * (1/3) / 2) = 1. First choices in token order: t0->0 kept, t1->1 kept, t2->0 dropped;
    # then every second choice finds its expert full. (Token-major order would keep both of t0's instead.)
    x = f32(RNG.normal(size=(3, 4)))
    params = tuple(map(f32, make_params(4, 6, 2)))
    experts = jnp.asarray([[0, 1], [1, 0], [0, 1]], jnp.int32)
    weights = f32([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]])
    keep = np.array([[True, False], [True, False], [False, False]])
    ref = np_moe(np.asarray(x), np.asarray(weights), np.asarray(experts), *map(np.asarray, params), keep=keep)
    for dispatch in ("einsum", "gather"):
        y, stats = moe.moe_capacity(x, weights, experts, *params, capacity_factor=1 / 3, dispatch=dispatch)
        assert stats["capacity"] == 1 and int(stats["n_dropped"]) == 4
        np.testing.assert_allclose(float(stats["dropped_fraction"]), 4 / 6, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dispatch", ["einsum", "gather"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_capacity_drops_exactly_the_expected_assignments(dispatch, use_mask):
    t, d, f, e, k, cf = 40, 8, 12, 4, 2, 0.75
    x = RNG.normal(size=(t, d)) + 1.0
    wr = RNG.normal(size=(d, e))
    wr[:, 0] += 0.15  # skew the router (logit bias ~ 0.15 * sum(x) ~ 1.2) so expert 0 overflows
    params = make_params(d, f, e)
    valid = (RNG.random(t) < 0.8) if use_mask else np.ones(t, bool)
    weights, experts, _ = moe.router(f32(x), f32(wr), top_k=k)
    ew = np.asarray(experts)
    cap = math.ceil(k * t * cf / e)  # 15
    keep = np_capacity_keep(ew, e, cap, valid)
    n_assign = k * valid.sum()
    n_dropped = n_assign - keep.sum()
    assert n_dropped > 0, "test needs some drops"
    y, stats = moe.moe_capacity(f32(x), weights, experts, *map(f32, params), capacity_factor=cf,
                                mask=jnp.asarray(valid) if use_mask else None, dispatch=dispatch)
    assert stats["capacity"] == cap
    assert int(stats["n_dropped"]) == n_dropped
    np.testing.assert_allclose(float(stats["dropped_fraction"]), n_dropped / n_assign, rtol=1e-6)
    ref = np_moe(x, np.asarray(weights), ew, *params, keep=keep)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-5, atol=2e-5)
    # the dropped contributions really are missing (the full output differs on affected tokens)
    full = np_moe(x, np.asarray(weights), ew, *params, keep=np.repeat(valid[:, None], k, 1))
    hit = (~keep & valid[:, None]).any(1)
    assert np.abs(full[hit] - np.asarray(y)[hit]).max() > 1e-3
    np.testing.assert_allclose(np.asarray(y)[~hit], full[~hit], rtol=2e-5, atol=2e-5)


def test_moe_ffn_jit_and_leading_axes():
    b, s, d, f, e, k = 2, 6, 8, 16, 4, 2
    x, wr = f32(RNG.normal(size=(b, s, d))), f32(RNG.normal(size=(d, e)))
    params = tuple(map(f32, make_params(d, f, e)))
    fn = jax.jit(moe.moe_ffn, static_argnames=("top_k", "capacity_factor", "renormalize", "dispatch"))
    for cf in (None, 1.0):
        y_eager, aux_eager = moe.moe_ffn(x, wr, *params, top_k=k, capacity_factor=cf)
        y_jit, aux_jit = fn(x, wr, *params, top_k=k, capacity_factor=cf)
        assert y_jit.shape == (b, s, d)
        assert aux_jit["experts"].shape == (b, s, k) and aux_jit["logits"].shape == (b, s, e)
        np.testing.assert_allclose(np.asarray(y_jit), np.asarray(y_eager), rtol=1e-5, atol=1e-6)
        for key in ("load_balancing_loss", "router_z_loss", "dropped_fraction"):
            np.testing.assert_allclose(float(aux_jit[key]), float(aux_eager[key]), rtol=1e-6)


# ------------------------------------------------------------------ gradients
def test_gradients_of_both_paths_are_finite_and_agree():
    t, d, f, e, k = 24, 8, 12, 4, 2
    x, wr = f32(RNG.normal(size=(t, d))), f32(RNG.normal(size=(d, e)))
    params = tuple(map(f32, make_params(d, f, e)))
    target = f32(RNG.normal(size=(t, d)))

    def loss(cf, dispatch, x, wr, wg, wu, wd):
        if dispatch == "blocked":
            y, aux = moe.moe_ffn(x, wr, wg, wu, wd, top_k=k, dropless_impl="blocked", block_size=4)
        else:
            y, aux = moe.moe_ffn(x, wr, wg, wu, wd, top_k=k, capacity_factor=cf, dispatch=dispatch)
        return jnp.sum((y - target) ** 2) + 0.1 * aux["load_balancing_loss"] + 0.01 * aux["router_z_loss"]

    args = (x, wr, *params)
    grad = jax.jit(jax.grad(loss, argnums=(2, 3, 4, 5, 6)), static_argnums=(0, 1))
    g_drop = grad(None, "einsum", *args)
    for dispatch in ("einsum", "gather", "blocked"):
        g_cap = grad(None, "blocked", *args) if dispatch == "blocked" else grad(e / k, dispatch, *args)
        for a, b_ in zip(g_drop, g_cap):
            assert np.isfinite(np.asarray(a)).all() and np.isfinite(np.asarray(b_)).all()
            assert np.abs(np.asarray(a)).max() > 0
            np.testing.assert_allclose(np.asarray(b_), np.asarray(a), rtol=1e-4, atol=1e-5)


def central_fd(fn, z, eps=1e-6):
    fn = jax.jit(fn)
    z = np.asarray(z, np.float64)
    g = np.zeros_like(z)
    for i in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[i] += eps
        zm[i] -= eps
        g[i] = (float(fn(jnp.asarray(zp))) - float(fn(jnp.asarray(zm)))) / (2 * eps)
    return g


def test_balancing_loss_gradients_match_finite_differences_float64():
    t, e, k = 9, 5, 2
    logits_np = RNG.normal(size=(t, e)) * 1.5
    valid = np.ones(t, bool)
    valid[[2, 7]] = False
    with jax.enable_x64(True):
        logits = jnp.asarray(logits_np, jnp.float64)
        experts = jax.lax.top_k(logits, k)[1]  # fixed routing: f_i is piecewise constant
        mask = jnp.asarray(valid)
        for fn in (lambda z: moe.load_balancing_loss(z, experts, n_experts=e),
                   lambda z: moe.load_balancing_loss(z, experts, n_experts=e, mask=mask),
                   lambda z: moe.router_z_loss(z),
                   lambda z: moe.router_z_loss(z, mask=mask)):
            assert fn(logits).dtype == jnp.float64
            g = np.asarray(jax.jit(jax.grad(fn))(logits))
            np.testing.assert_allclose(g, central_fd(fn, logits_np), rtol=1e-6, atol=1e-9)
        # through the router too: d/dW of load-balancing + z-loss, with the top-k choice re-made inside
        x = jnp.asarray(RNG.normal(size=(t, 6)), jnp.float64)

        def from_router(w):
            _, ex, lg = moe.router(x, w, top_k=k)
            return moe.load_balancing_loss(lg, ex, n_experts=e) + 0.3 * moe.router_z_loss(lg)

        w0 = RNG.normal(size=(6, e))
        g = np.asarray(jax.jit(jax.grad(from_router))(jnp.asarray(w0)))
        np.testing.assert_allclose(g, central_fd(from_router, w0), rtol=1e-6, atol=1e-9)
    assert jnp.zeros(1).dtype == jnp.float32  # x64 did not leak out of the context


def test_dropless_output_gradient_matches_finite_differences_float64():
    t, d, f, e, k = 6, 3, 4, 3, 2
    params_np = make_params(d, f, e, dtype=np.float64)
    x_np, wr_np = RNG.normal(size=(t, d)), RNG.normal(size=(d, e))
    with jax.enable_x64(True):
        params = tuple(jnp.asarray(p) for p in params_np)
        x = jnp.asarray(x_np)
        # dropless only: the capacity path's gradients are checked equal to these in the float32 test above

        def fn(wr):
            y, _ = moe.moe_ffn(x, wr, *params, top_k=k)
            assert y.dtype == jnp.float64
            return jnp.sum(y * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)

        g = np.asarray(jax.jit(jax.grad(fn))(jnp.asarray(wr_np)))
        np.testing.assert_allclose(g, central_fd(fn, wr_np), rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------ loss values
def np_hf_load_balancing(logits, experts, e, mask=None):
    """Transcription of transformers' load_balancing_loss_func (Mixtral): f per slot, summed over the k slots."""
    probs = np_softmax(logits)
    onehot = np.eye(e)[experts]  # [T, k, E]
    m = np.ones(len(logits)) if mask is None else mask.astype(np.float64)
    tokens_per_expert = (onehot * m[:, None, None]).sum(0) / m.sum()  # [k, E]
    router_prob = (probs * m[:, None]).sum(0) / m.sum()  # [E]
    return np.sum(tokens_per_expert * router_prob[None]) * e


def test_load_balancing_loss_values():
    e = 4
    # uniform routing: equal probabilities, every expert gets the same share of assignments -> 1.0
    for k in (1, 2, 4):
        t = 8
        experts = jnp.asarray([[(i + j) % e for j in range(k)] for i in range(t)], jnp.int32)
        loss = moe.load_balancing_loss(jnp.zeros((t, e)), experts, n_experts=e)
        np.testing.assert_allclose(float(loss), 1.0, rtol=1e-6)
    # collapsed top-1: all tokens and all probability on expert 0 -> N
    logits = jnp.asarray(np.tile([60.0, 0, 0, 0], (8, 1)))
    np.testing.assert_allclose(float(moe.load_balancing_loss(logits, jnp.zeros((8, 1), jnp.int32), n_experts=e)),
                               e, rtol=1e-6)
    # collapsed top-2: all tokens pick {0, 1}, probability split there -> N / k (the maximum)
    logits = jnp.asarray(np.tile([60.0, 60.0, 0, 0], (8, 1)))
    experts = jnp.asarray(np.tile([0, 1], (8, 1)), jnp.int32)
    np.testing.assert_allclose(float(moe.load_balancing_loss(logits, experts, n_experts=e)), e / 2, rtol=1e-6)
    # random routing against a direct float64 formula, and HF's value = top_k * ours (also with a mask)
    t, e, k = 13, 6, 2
    logits = RNG.normal(size=(t, e)) * 2
    experts = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    valid = RNG.random(t) < 0.7
    for mask in (None, valid):
        m = np.ones(t, bool) if mask is None else mask
        f = np.bincount(experts[m].ravel(), minlength=e) / (k * m.sum())
        p = np_softmax(logits)[m].mean(0)
        ours = float(moe.load_balancing_loss(f32(logits), jnp.asarray(experts, jnp.int32), n_experts=e,
                                             mask=None if mask is None else jnp.asarray(mask)))
        np.testing.assert_allclose(ours, e * np.sum(f * p), rtol=1e-5)
        np.testing.assert_allclose(k * ours, np_hf_load_balancing(logits, experts, e, mask), rtol=1e-5)


def test_router_z_loss_values():
    logits = RNG.normal(size=(3, 5, 7)) * 3
    ref = np.mean(np_logsumexp(logits) ** 2)
    np.testing.assert_allclose(float(moe.router_z_loss(f32(logits))), ref, rtol=1e-5)
    mask = RNG.random((3, 5)) < 0.5
    mask[0, 0] = True
    ref_m = np.mean(np_logsumexp(logits)[mask] ** 2)
    np.testing.assert_allclose(float(moe.router_z_loss(f32(logits), mask=jnp.asarray(mask))), ref_m, rtol=1e-5)
    np.testing.assert_allclose(float(moe.router_z_loss(jnp.zeros((4, 8)))), np.log(8) ** 2, rtol=1e-6)
    # bf16 logits: float32 math, large logits do not overflow
    big = jnp.asarray([[80.0, 79.0, -5.0]], jnp.bfloat16)
    z = moe.router_z_loss(big)
    assert z.dtype == jnp.float32
    np.testing.assert_allclose(float(z), np_logsumexp(np.array([[80.0, 79.0, -5.0]]))[0] ** 2, rtol=1e-5)


# ------------------------------------------------------------------ utilisation
def test_expert_utilisation_hand_made_cases():
    e = 4
    # uniform: 8 tokens, top-2, each expert 4 of 16 assignments
    experts = jnp.asarray([[i % e, (i + 1) % e] for i in range(8)], jnp.int32)
    logits = f32(RNG.normal(size=(8, e)))
    u = moe.expert_utilisation(experts, logits, n_experts=e)
    np.testing.assert_allclose(np.asarray(u["load"]), 0.25, rtol=1e-6)
    np.testing.assert_allclose(float(u["entropy"]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(u["max_over_mean"]), 1.0, rtol=1e-6)
    assert int(u["dead_experts"]) == 0 and "dropped_fraction" not in u
    np.testing.assert_allclose(float(u["router_logit_norm"]), np.linalg.norm(np.asarray(logits), axis=1).mean(),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(u["mean_prob"]), np_softmax(np.asarray(logits, np.float64)).mean(0),
                               rtol=1e-5)
    # collapsed, top-1: everything on expert 2
    u = moe.expert_utilisation(jnp.full((6, 1), 2, jnp.int32), jnp.zeros((6, e)), n_experts=e,
                               dropped_fraction=0.25)
    np.testing.assert_allclose(np.asarray(u["load"]), [0, 0, 1, 0], atol=1e-7)
    np.testing.assert_allclose(float(u["entropy"]), 0.0, atol=1e-7)
    np.testing.assert_allclose(float(u["max_over_mean"]), e, rtol=1e-6)
    assert int(u["dead_experts"]) == 3
    np.testing.assert_allclose(float(u["dropped_fraction"]), 0.25)
    np.testing.assert_allclose(float(u["router_logit_norm"]), 0.0, atol=1e-7)
    # one dead expert: load 1/3 on 0, 1, 2; expert 3 never chosen
    experts = jnp.asarray([[0], [1], [2], [0], [1], [2]], jnp.int32)
    u = moe.expert_utilisation(experts, jnp.zeros((6, e)), n_experts=e)
    np.testing.assert_allclose(np.asarray(u["load"]), [1 / 3, 1 / 3, 1 / 3, 0], rtol=1e-6)
    np.testing.assert_allclose(float(u["entropy"]), np.log(3) / np.log(4), rtol=1e-6)
    np.testing.assert_allclose(float(u["max_over_mean"]), 4 / 3, rtol=1e-6)
    assert int(u["dead_experts"]) == 1
    # a mask excludes padding: the padded tokens were the only users of expert 3
    experts = jnp.asarray([[0], [1], [2], [3], [3]], jnp.int32)
    logits = f32(np.diag([1.0, 2.0, 3.0, 4.0, 5.0])[:, :4])
    u = moe.expert_utilisation(experts, logits, n_experts=e, mask=jnp.asarray([1, 1, 1, 0, 0], bool))
    np.testing.assert_allclose(np.asarray(u["load"]), [1 / 3, 1 / 3, 1 / 3, 0], rtol=1e-6)
    assert int(u["dead_experts"]) == 1
    np.testing.assert_allclose(float(u["router_logit_norm"]), 2.0, rtol=1e-6)


# ------------------------------------------------------------------ bad input
def test_bad_inputs_raise_value_error_naming_the_argument():
    d, f, e = 8, 12, 4
    x, wr = jnp.ones((5, d)), jnp.ones((d, e))
    wg, wu, wd = jnp.ones((e, d, f)), jnp.ones((e, d, f)), jnp.ones((e, f, d))
    weights, experts = jnp.ones((5, 2)) / 2, jnp.zeros((5, 2), jnp.int32)
    with pytest.raises(ValueError, match="top_k"):
        moe.router(x, wr, top_k=e + 1)
    with pytest.raises(ValueError, match="top_k"):
        moe.router(x, wr, top_k=0)
    with pytest.raises(ValueError, match="top_k"):
        moe.moe_ffn(x, wr, wg, wu, wd, top_k=5)
    with pytest.raises(ValueError, match="w_router"):
        moe.router(x, jnp.ones((d + 1, e)), top_k=2)
    with pytest.raises(ValueError, match="w_router"):
        moe.moe_ffn(x, jnp.ones((d, e + 1)), wg, wu, wd, top_k=2)
    with pytest.raises(ValueError, match="w_gate"):
        moe.moe_dropless(x, weights, experts, jnp.ones((e, d + 1, f)), wu, wd)
    with pytest.raises(ValueError, match="w_up"):
        moe.moe_dropless(x, weights, experts, wg, jnp.ones((e, d, f + 1)), wd)
    with pytest.raises(ValueError, match="w_down"):
        moe.moe_capacity(x, weights, experts, wg, wu, jnp.ones((e, d, f)), capacity_factor=1.0)
    with pytest.raises(ValueError, match="weights"):
        moe.moe_dropless(x, jnp.ones((5, 3)), experts, wg, wu, wd)
    with pytest.raises(ValueError, match="experts"):
        moe.moe_dropless(x, jnp.ones((4, 2)), jnp.zeros((4, 2), jnp.int32), wg, wu, wd)
    with pytest.raises(ValueError, match="experts"):
        moe.moe_dropless(x, weights, jnp.zeros((5, 2)), wg, wu, wd)  # float experts
    with pytest.raises(ValueError, match="mask"):
        moe.moe_dropless(x, weights, experts, wg, wu, wd, mask=jnp.ones((4,), bool))
    for cf in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="capacity_factor"):
            moe.moe_capacity(x, weights, experts, wg, wu, wd, capacity_factor=cf)
        with pytest.raises(ValueError, match="capacity_factor"):
            moe.moe_ffn(x, wr, wg, wu, wd, top_k=2, capacity_factor=cf)
        with pytest.raises(ValueError, match="capacity_factor"):
            moe.capacity(16, e, 2, cf)
    with pytest.raises(ValueError, match="top_k"):
        moe.capacity(16, e, e + 1, 1.0)
    with pytest.raises(ValueError, match="dispatch"):
        moe.moe_capacity(x, weights, experts, wg, wu, wd, capacity_factor=1.0, dispatch="sparse")
    with pytest.raises(ValueError, match="impl"):
        moe.moe_dropless(x, weights, experts, wg, wu, wd, impl="megablocks")
    with pytest.raises(ValueError, match="block_size"):
        moe.moe_dropless(x, weights, experts, wg, wu, wd, impl="blocked", block_size=0)
    with pytest.raises(ValueError, match="logits"):
        moe.load_balancing_loss(jnp.ones((5, e)), experts, n_experts=e + 1)
    with pytest.raises(ValueError, match="experts"):
        moe.load_balancing_loss(jnp.ones((5, e)), jnp.zeros((4, 2), jnp.int32), n_experts=e)
    with pytest.raises(ValueError, match="mask"):
        moe.router_z_loss(jnp.ones((5, e)), mask=jnp.ones((5, 1)))
    with pytest.raises(ValueError, match="logits"):
        moe.expert_utilisation(experts, jnp.ones((5, e + 1)), n_experts=e)
