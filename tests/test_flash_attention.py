"""kernels.flash_attention against a float64 reference, in Pallas interpret mode on CPU (and compiled on a GPU).

The float64 reference is :func:`mani_jax.core.attention`'s definition (its mask, :func:`core.attention_mask`,
and its bottom-right position alignment) with every operation in float64 under ``jax.enable_x64``; the
float32 core reference is checked against it too. Outputs of every Pallas call start as NaN in interpret
mode (``test_interpret_mode_poisons_unwritten_tiles`` guards that), so a tile the kernels never write fails
the comparisons. Fully masked tiles hold NaN keys/values in ``test_masked_tiles_are_never_read``: a kernel
that read one would turn the output or gradients NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from kernels.flash_attention import BlockSizes, flash_attention
from kernels.flash_attention import _masking
from mani_jax import core

ON_GPU = jax.default_backend() == "gpu"


# ----------------------------------------------------------------------------------------------- reference

def reference64(q, k, v, do, dlse, *, causal=False, segment_ids=None, kv_segment_ids=None, q_positions=None,
                kv_positions=None, sliding_window=None, softmax_scale=None):
    """``(out, lse, dq, dk, dv)`` in float64 (numpy) for the loss ``<out, do> + <lse, dlse>``."""
    b, t, hq, d = q.shape
    s = k.shape[1]
    if q_positions is None:
        q_positions = np.broadcast_to(np.arange(t) + (s - t), (b, t))
    if kv_positions is None:
        kv_positions = np.broadcast_to(np.arange(s), (b, s))
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, do, dlse)]
        ids = [None if x is None else jnp.asarray(np.asarray(x, np.int64))
               for x in (q_positions, kv_positions, segment_ids, kv_segment_ids)]
        out = _reference64_jit(*f64, *ids, causal=causal, window=sliding_window, scale=scale)
        return tuple(np.asarray(x) for x in out)


@functools.partial(jax.jit, static_argnames=("causal", "window", "scale"))
def _reference64_jit(q, k, v, do, dlse, qp, kp, seg, kvseg, *, causal, window, scale):
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    mask = core.attention_mask(qp, kp, causal=causal, segment_ids=seg, kv_segment_ids=kvseg,
                               sliding_window=window)  # [b, t, s]

    def f(q, k, v):
        qg = q.reshape(b, t, hkv, g, d)
        logits = jnp.einsum("btkgd,bskd->bkgts", qg, k) * scale
        logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
        m = jnp.max(logits, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(logits - m)
        l = jnp.sum(p, axis=-1, keepdims=True)
        out = jnp.einsum("bkgts,bskd->btkgd", p / jnp.where(l == 0, 1.0, l), v).reshape(b, t, hq, -1)
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]
        return out, lse.reshape(b, hq, t).transpose(0, 2, 1)

    (out, lse), vjp = jax.vjp(f, q, k, v)
    return (out, lse) + vjp((do, dlse))


def run_kernel(q, k, v, do, dlse, **kw):
    """``(out, lse, dq, dk, dv)`` of the kernel (one jitted vjp: forward and both backward kernels)."""

    def f(q, k, v, do, dlse):
        (out, lse), vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, return_lse=True, **kw), q, k, v)
        return (out, lse) + vjp((do, dlse))

    return tuple(np.asarray(x, np.float64) for x in jax.jit(f)(q, k, v, do, dlse))


def random_segments(rng, b, n, n_segments):
    """Sorted ids in ``[0, n_segments)`` with random boundaries (segments of length 1 included)."""
    return np.sort(rng.integers(0, n_segments, (b, n)), axis=1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    b: int
    t: int
    s: int
    hq: int
    hkv: int
    d: int
    causal: bool = False
    window: int | None = None
    segments: str | None = None  # None | "shared" (same ids for q and kv, t == s) | "separate"
    positions: bool = False  # explicit positions (restarting per segment, as the model passes them)
    dv: int | None = None
    scale: float | None = None
    blocks: tuple[int, int] | None = (16, 16)
    dtype: str = "float32"


CASES = [
    Case("noncausal_ragged_mha", 1, 40, 40, 2, 2, 64),
    Case("causal_t_lt_s_gqa2", 2, 37, 53, 4, 2, 64, causal=True, blocks=(16, 32)),
    # t > s: the first t - s queries sit before every key -> rows with nothing to attend to.
    Case("causal_t_gt_s_mqa_d128", 1, 53, 29, 8, 1, 128, causal=True, blocks=(32, 16)),
    Case("causal_window_gqa4", 1, 48, 48, 8, 2, 64, causal=True, window=12),
    Case("window_noncausal_t_ne_s", 1, 33, 45, 2, 1, 64, window=9),
    Case("causal_segments_gqa2", 2, 50, 50, 4, 2, 64, causal=True, segments="shared"),
    # Query segments missing from the keys -> fully masked rows; non-causal.
    Case("separate_segments_masked_rows", 1, 40, 56, 2, 1, 64, segments="separate", blocks=(16, 32)),
    # What HybridLM passes: causal by positions restarting per segment, plus segment ids.
    Case("model_positions_segments_window", 1, 45, 45, 4, 1, 64, causal=True, window=10, segments="shared",
         positions=True),
    Case("odd_head_dims_scale", 1, 24, 40, 2, 2, 40, causal=True, dv=24, scale=0.3),
    Case("default_blocks_bf16", 1, 70, 70, 4, 2, 64, causal=True, blocks=None, dtype="bfloat16"),
    Case("segments_bf16_d128", 1, 64, 64, 2, 1, 128, causal=True, segments="shared", blocks=(32, 32),
         dtype="bfloat16"),
]


def make_inputs(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    dv = case.d if case.dv is None else case.dv
    dtype = jnp.dtype(case.dtype)
    q = rng.standard_normal((case.b, case.t, case.hq, case.d)).astype(np.float32)
    k = rng.standard_normal((case.b, case.s, case.hkv, case.d)).astype(np.float32)
    v = rng.standard_normal((case.b, case.s, case.hkv, dv)).astype(np.float32)
    do = rng.standard_normal((case.b, case.t, case.hq, dv)).astype(np.float32)
    dlse = rng.standard_normal((case.b, case.t, case.hq)).astype(np.float32)
    # Round through the kernel dtype so the reference sees exactly the kernel's inputs.
    q, k, v, do = (np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)) for x in (q, k, v, do))
    kw = dict(causal=case.causal, sliding_window=case.window, softmax_scale=case.scale)
    if case.segments == "shared":
        kw["segment_ids"] = random_segments(rng, case.b, case.t, 4)
    elif case.segments == "separate":
        kw["segment_ids"] = random_segments(rng, case.b, case.t, 4)
        kw["kv_segment_ids"] = random_segments(rng, case.b, case.s, 4) * 2  # only even ids -> odd rows masked
    if case.positions:
        pos = np.asarray(core.positions_from_segments(jnp.asarray(kw["segment_ids"])))
        kw["q_positions"], kw["kv_positions"] = pos, pos
    return (q, k, v, do, dlse), kw, dtype


SLOW = {"causal_t_lt_s_gqa2", "odd_head_dims_scale", "default_blocks_bf16"}  # overlap the others; ~6 s each


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c.name in SLOW else c for c in CASES],
                         ids=lambda c: c.name)
def test_matches_float64_reference(case):
    (q, k, v, do, dlse), kw, dtype = make_inputs(case, seed=hash(case.name) % 2**31)
    ref = reference64(q, k, v, do, dlse, **kw)
    blocks = {} if case.blocks is None else dict(block_q=case.blocks[0], block_kv=case.blocks[1])
    got = run_kernel(*(jnp.asarray(x, dtype) for x in (q, k, v, do)), jnp.asarray(dlse), interpret=True,
                     **blocks, **{a: (None if x is None else jnp.asarray(x)) if isinstance(x, np.ndarray) or x is None
                                  else x for a, x in kw.items()})
    names = ("out", "lse", "dq", "dk", "dv")
    # Measured: <= 7e-7 (float32) and <= 6e-3 (bf16) on every case; the tolerances leave ~10x.
    if case.dtype == "float32":
        tol = dict(out=5e-6, lse=5e-6, dq=1e-5, dk=1e-5, dv=1e-5)
    else:  # bf16 inputs, P and dS rounded to bf16 before the matmuls (as on the GPU)
        tol = dict(out=2e-2, lse=1e-4, dq=4e-2, dk=4e-2, dv=4e-2)
    for name, r, g in zip(names, ref, got):
        assert r.shape == g.shape, name
        if name == "lse":  # -inf exactly where the reference has it (rows with nothing to attend to)
            np.testing.assert_array_equal(np.isneginf(g), np.isneginf(r), err_msg="lse -inf pattern")
            r, g = np.where(np.isinf(r), 0, r), np.where(np.isinf(g), 0, g)
        assert np.all(np.isfinite(g)), f"{name}: non-finite values (unwritten tile or NaN)"
        err = np.max(np.abs(g - r)) / max(1.0, np.max(np.abs(r)))
        assert err < tol[name], f"{name}: max error {err:.3g} (scaled) > {tol[name]}"
    if case.name in ("causal_t_gt_s_mqa_d128", "separate_segments_masked_rows"):
        empty = np.isneginf(ref[1])
        assert empty.any(), "case meant to have fully masked rows"
        assert np.all(got[0].transpose(0, 2, 1, 3)[empty.transpose(0, 2, 1)] == 0.0)
        assert np.all(got[2].transpose(0, 2, 1, 3)[empty.transpose(0, 2, 1)] == 0.0)


def test_core_float32_reference_agrees_with_float64_reference():
    """The test's float64 reference is the same function as mani_jax.core.attention (masks, lse, rows)."""
    (q, k, v, do, dlse), kw, _ = make_inputs(CASES[7], seed=1)
    ref = reference64(q, k, v, do, dlse, **kw)
    out, lse = core.attention(*(jnp.asarray(x) for x in (q, k, v)), return_lse=True,
                              **{a: jnp.asarray(x) if isinstance(x, np.ndarray) else x for a, x in kw.items()})
    np.testing.assert_allclose(np.asarray(out), ref[0], atol=2e-5)
    np.testing.assert_allclose(np.asarray(lse), ref[1], atol=2e-5)


def test_fresh_inputs_give_fresh_outputs():
    """Guards against a cached/stale result: two seeds, two different outputs, both right."""
    case = CASES[1]
    outs = []
    for seed in (11, 12):
        (q, k, v, do, dlse), kw, _ = make_inputs(case, seed)
        out = flash_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), interpret=True, block_q=16,
                              block_kv=32, causal=True)
        ref = reference64(q, k, v, do, dlse, causal=True)[0]
        np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)
        outs.append(np.asarray(out))
    assert np.abs(outs[0] - outs[1]).max() > 0.1


def test_interpret_mode_poisons_unwritten_tiles():
    """Interpret mode starts every Pallas output as NaN, so a skipped write shows up as NaN in the tests."""

    def kernel(x_ref, o_ref):
        @pl.when(pl.program_id(0) != 1)
        def _():
            o_ref[...] = x_ref[...]

    x = jnp.ones((64, 16), jnp.float32)
    out = pl.pallas_call(kernel, grid=(4,), in_specs=[pl.BlockSpec((16, 16), lambda i: (i, 0))],
                         out_specs=pl.BlockSpec((16, 16), lambda i: (i, 0)),
                         out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=True)(x)
    out = np.asarray(out)
    assert np.isnan(out[16:32]).all() and np.all(out[:16] == 1) and np.all(out[32:] == 1)


# ---------------------------------------------------------------------------------------- tile skipping

def _brute_force_tiles(t, s, bq, bk, causal, window):
    """visible[i, j] / full[i, j]: query tile i sees some / every key of key tile j (padding keys masked)."""
    nq, nk = -(-t // bq), -(-s // bk)
    qp = np.arange(nq * bq) + (s - t)
    kp = np.arange(nk * bk)
    m = np.ones((qp.size, kp.size), bool)
    if causal:
        m &= kp[None] <= qp[:, None]
    if window is not None:
        m &= (qp[:, None] - kp[None]) < window
        if not causal:
            m &= (kp[None] - qp[:, None]) < window
    m &= kp[None] < s
    tiles = m.reshape(nq, bq, nk, bk)
    return tiles.any(axis=(1, 3)), tiles.all(axis=(1, 3))


@pytest.mark.parametrize("causal,window", [(True, None), (False, 7), (True, 7), (True, 40), (False, 33)])
def test_tile_loop_bounds_are_exact(causal, window):
    """Loop bounds visit exactly the first..last visible tile; the unmasked range is exactly the full tiles."""
    rng = np.random.default_rng(0)
    for _ in range(12):
        t, s = (int(x) for x in rng.integers(1, 150, 2))
        bq, bk = (int(x) for x in rng.choice([16, 32, 64], 2))
        nq, nk = -(-t // bq), -(-s // bk)
        spec = _masking.MaskSpec(causal=causal, window=window, offset=s - t, default_positions=True,
                                 segments=False, seq_kv=s, kv_padded=nk * bk != s)
        vis, full = _brute_force_tiles(t, s, bq, bk, causal, window)
        for i in range(nq):
            lo, hi = (int(x) for x in _masking.kv_block_range(spec, jnp.int32(i * bq), bq, bk, nk))
            js = np.flatnonzero(vis[i])
            if js.size:
                assert (lo, hi) == (js[0], js[-1] + 1), (t, s, bq, bk, i, lo, hi, js)
                assert vis[i, lo:hi].all()  # no invisible tile inside the loop either
            else:
                assert hi <= lo, (t, s, bq, bk, i, lo, hi)
            flo, fhi = (int(x) for x in _masking.kv_full_range(spec, jnp.int32(i * bq), bq, bk))
            got = set(range(max(flo, lo), min(fhi, hi)))
            assert got == set(np.flatnonzero(full[i]).tolist()), (t, s, bq, bk, i, flo, fhi)
        for j in range(nk):
            lo, hi = (int(x) for x in _masking.q_block_range(spec, jnp.int32(j * bk), bk, bq, nq))
            is_ = np.flatnonzero(vis[:, j])
            if is_.size:
                assert (lo, hi) == (is_[0], is_[-1] + 1), (t, s, bq, bk, j, lo, hi, is_)
                assert vis[lo:hi, j].all()
            else:
                assert hi <= lo, (t, s, bq, bk, j, lo, hi)
            flo, fhi = (int(x) for x in _masking.q_full_range(spec, jnp.int32(j * bk), bk, bq))
            got = set(range(max(flo, lo), min(fhi, hi)))
            assert got == set(np.flatnonzero(full[:, j]).tolist()), (t, s, bq, bk, j, flo, fhi)


@pytest.mark.parametrize("mode", ["bounds", "segments", "positions"])
def test_masked_tiles_are_never_read(mode):
    """Keys/values of tiles no query can see are NaN: any read of them would make the result NaN."""
    rng = np.random.default_rng(5)
    b, hq, hkv, d, blk = 1, 2, 1, 32, 16
    if mode == "bounds":  # t < s, causal + window: keys 0..40 are invisible to every query (tiles 0, 1)
        t, s = 16, 64
        kw = dict(causal=True, sliding_window=8)
        dead = np.arange(s) < 32
    else:  # key tile 1 belongs to a segment no query has
        t = s = 64
        qseg = np.repeat(np.array([0, 1, 2, 3]), 16)[None].astype(np.int32)
        kvseg = qseg.copy()
        kvseg[0, 16:32] = 9
        kw = dict(causal=True, segment_ids=jnp.asarray(qseg), kv_segment_ids=jnp.asarray(kvseg))
        if mode == "positions":
            kw.update(q_positions=jnp.arange(t)[None] + 3, kv_positions=jnp.arange(s)[None] + 3)
        dead = kvseg[0] == 9
    q = rng.standard_normal((b, t, hq, d)).astype(np.float32)
    k = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
    do = rng.standard_normal((b, t, hq, d)).astype(np.float32)
    k[:, dead], v[:, dead] = 0.0, 0.0
    ref = reference64(q, k, v, do, np.zeros((b, t, hq), np.float32),
                      **{a: np.asarray(x) if hasattr(x, "shape") else x for a, x in kw.items()})
    k[:, dead], v[:, dead] = np.nan, np.nan
    out, lse, dq, dk, dv = run_kernel(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(do),
                                      jnp.zeros((b, t, hq), jnp.float32), interpret=True, block_q=blk,
                                      block_kv=blk, **kw)
    np.testing.assert_allclose(out, ref[0], atol=2e-5)
    np.testing.assert_allclose(dq, ref[2], atol=5e-5)
    np.testing.assert_allclose(dk[:, ~dead], ref[3][:, ~dead], atol=5e-5)
    assert np.all(dk[:, dead] == 0) and np.all(dv[:, dead] == 0)


def test_segment_tile_test_is_conservative_and_exact_for_sorted_ids():
    rng = np.random.default_rng(3)
    spec = _masking.MaskSpec(causal=False, window=None, offset=0, default_positions=True, segments=True,
                             seq_kv=10**6, kv_padded=False)
    for _ in range(200):
        qs, ks = np.sort(rng.integers(0, 6, 16)), np.sort(rng.integers(0, 6, 16))
        side = lambda ids: _masking.Side(None, None, 0, 0, jnp.asarray(ids), ids.min(), ids.max())
        any_v, all_v = _masking.classify(spec, side(qs), side(ks), 0, 16)
        eq = qs[:, None] == ks[None]
        assert bool(any_v) == eq.any() and bool(all_v) == eq.all()


# -------------------------------------------------------------------------------------------- arguments

def test_bad_arguments_raise_clear_errors():
    q = jnp.zeros((1, 32, 4, 64), jnp.float32)
    kv = jnp.zeros((1, 32, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="block_q"):
        flash_attention(q, kv, kv, block_q=48, interpret=True)
    with pytest.raises(ValueError, match="block_kv"):
        flash_attention(q, kv, kv, block_kv=8, interpret=True)
    with pytest.raises(ValueError, match="block_sizes"):
        flash_attention(q, kv, kv, block_q=64, block_sizes=BlockSizes(), interpret=True)
    with pytest.raises(ValueError, match="backend"):
        flash_attention(q, kv, kv, backend="cuda", interpret=True)
    with pytest.raises(ValueError, match="q: expected float16"):
        flash_attention(q.astype(jnp.int32), kv, kv, interpret=True)
    with pytest.raises(ValueError, match="one dtype"):
        flash_attention(q, kv.astype(jnp.bfloat16), kv, interpret=True)
    with pytest.raises(ValueError, match="n_kv_heads"):
        flash_attention(q, jnp.zeros((1, 32, 3, 64)), jnp.zeros((1, 32, 3, 64)), interpret=True)
    with pytest.raises(ValueError, match="segment_ids"):
        flash_attention(q, kv, kv, segment_ids=jnp.zeros((1, 31), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="segment_ids: expected an integer"):
        flash_attention(q, kv, kv, segment_ids=jnp.zeros((1, 32), jnp.float32), interpret=True)
    with pytest.raises(ValueError, match="q_positions"):
        flash_attention(q, kv, kv, q_positions=jnp.zeros((1, 30), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="sliding_window"):
        flash_attention(q, kv, kv, sliding_window=0, interpret=True)


def test_block_size_table():
    for d, dt in itertools.product((32, 64, 128, 256), (jnp.bfloat16, jnp.float16, jnp.float32)):
        bs = BlockSizes.for_shape(d, dt)
        for f in ("block_q", "block_kv", "block_q_dkv", "block_kv_dkv", "block_q_dq", "block_kv_dq"):
            val = getattr(bs, f)
            assert val >= 16 and val & (val - 1) == 0
    assert BlockSizes.baseline().block_q == BlockSizes.baseline().block_kv == 64


# ------------------------------------------------------------------------------------ Triton lowering

@pytest.mark.parametrize("variant", ["causal_window_gqa", "segments_positions"])
def test_lowers_to_triton_ir_for_h100_without_a_gpu(variant):
    """Ahead-of-time lowering for an abstract H100: every kernel (forward, dK/dV, dQ) passes the Pallas
    Triton lowering (power-of-two shapes, supported primitives). Compiling the Triton IR needs a GPU."""
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    q = jax.ShapeDtypeStruct((2, 300, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 300, 2, 128), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((2, 300), jnp.int32)

    def loss(q, k, v, ids):
        if variant == "causal_window_gqa":
            extra = dict(causal=True, sliding_window=100)
        else:
            extra = dict(causal=True, segment_ids=ids, q_positions=ids, kv_positions=ids)
        return flash_attention(q, k, v, **extra).astype(jnp.float32).sum()

    with jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, ids).lower(
            lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 3


# ----------------------------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("causal,segments", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("d", [64, 128])
def test_compiled_gpu_matches_reference(causal, segments, d):
    rng = np.random.default_rng(d)
    b, t, hq, hkv = 2, 1000, 8, 2
    q, k, v, do = (rng.standard_normal(shape).astype(np.float32) for shape in
                   [(b, t, hq, d), (b, t, hkv, d), (b, t, hkv, d), (b, t, hq, d)])
    q, k, v, do = (np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)) for x in (q, k, v, do))
    kw = dict(causal=causal)
    if segments:
        kw["segment_ids"] = random_segments(rng, b, t, 5)
    ref = reference64(q, k, v, do, np.zeros((b, t, hq), np.float32), **kw)
    got = run_kernel(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, do)), jnp.zeros((b, t, hq)),
                     **{a: jnp.asarray(x) if isinstance(x, np.ndarray) else x for a, x in kw.items()})
    for name, r, g, tol in zip(("out", "lse", "dq", "dk", "dv"), ref, got, (2e-2, 2e-3, 6e-2, 6e-2, 6e-2)):
        r, g = np.where(np.isinf(r), 0, r), np.where(np.isinf(g), 0, g)
        err = np.max(np.abs(g - r)) / max(1.0, np.max(np.abs(r)))
        assert err < tol, f"{name}: {err}"


# ------------------------------------------------------------------------------------------------- models

def _lm_loss_and_grads(cfg, tokens, segment_ids):
    from flax import nnx

    from mani_jax.models import HybridLM

    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(params):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1], segment_ids=segment_ids[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    return float(loss), jax.tree.leaves(grads)


def test_hybrid_lm_trains_through_the_pallas_kernel():
    """HybridLM with attention_impl="pallas" (interpret mode): same loss and parameter gradients as "xla"
    on packed sequences (segment ids, GQA, a sliding window)."""
    from mani_jax.models import ModelConfig

    base = dict(vocab_size=61, d_model=32, n_layers=2, layer_types=("attention", "mamba"), n_heads=4,
                n_kv_heads=2, head_dim=16, d_ff=48, mamba_n_heads=4, mamba_head_dim=16, d_state=8,
                chunk_size=8, max_seq_len=64, initializer_range=0.3, sliding_window=9)
    rng = np.random.default_rng(7)
    tokens = jnp.asarray(rng.integers(0, 61, (2, 41)), jnp.int32)
    segment_ids = jnp.asarray(random_segments(rng, 2, 41, 3))
    loss_x, g_x = _lm_loss_and_grads(ModelConfig(**base, attention_impl="xla"), tokens, segment_ids)
    loss_p, g_p = _lm_loss_and_grads(ModelConfig(**base, attention_impl="pallas", attention_interpret=True),
                                     tokens, segment_ids)
    assert abs(loss_x - loss_p) < 1e-5 * max(1.0, abs(loss_x))
    assert len(g_x) == len(g_p)
    for a, b in zip(g_x, g_p):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-4)
    assert max(float(jnp.abs(a).max()) for a in g_x) > 1e-3  # the gradients are not trivially zero


def test_attention_impl_is_validated_and_cudnn_refuses_cpu():
    from mani_jax.models import ModelConfig
    from mani_jax.models.attention_impls import cudnn_attention, full_sequence_attention

    with pytest.raises(ValueError, match="attention_impl"):
        ModelConfig(attention_impl="flash")
    fn = full_sequence_attention(ModelConfig(attention_impl="pallas", attention_interpret=True))
    assert fn.func is flash_attention and fn.keywords == {"interpret": True}
    assert full_sequence_attention(ModelConfig()) is core.attention
    assert full_sequence_attention(ModelConfig(attention_impl="cudnn")) is cudnn_attention
    if not ON_GPU:
        q = jnp.zeros((1, 8, 2, 16), jnp.bfloat16)
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            cudnn_attention(q, q, q, causal=True)


# ------------------------------------------------------------------------------------------- experiment

@pytest.mark.slow  # ~20 s: the plumbing of the benchmark; the kernels' correctness is covered above
@pytest.mark.skipif(ON_GPU, reason="the GPU run times the kernels (minutes); this is the CPU smoke path")
def test_benchmark_smoke_preset_checks_correctness_on_cpu(tmp_path):
    import json

    from experiments import flash_attention as bench

    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["--preset", "quick", "--out", str(tmp_path / "refused")])
    s = bench.main(["--preset", "smoke", "--out", str(tmp_path / "run"), "--set", "head_dims=64",
                    "--set", "causal=true", "--set", "systems=ours,xla,pallas-mha"])
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["timed"] is False and len(on_disk["results"]) == 3
    for row in s["results"]:
        assert "error" not in row, row
        assert row["max_abs_err_fwd"] < 1e-4 and row["max_rel_err_grads"] < 1e-4
