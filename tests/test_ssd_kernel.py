"""kernels.ssd against mani_jax.core.ssd_chunked, in Pallas interpret mode on CPU (compiled on a GPU).

Outputs of a Pallas call start as NaN in interpret mode, so a tile the kernels never write fails the
comparisons. Shapes are tiny and awkward (seq not a multiple of the chunk, head dim and state size padded,
n_groups > 1, several tiles per chunk); everything runs as one jitted vjp per case to keep the file fast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.ssd import ssd_chunked
from mani_jax import core

ON_GPU = jax.default_backend() == "gpu"


def make_inputs(rng, b, l, h, p, g, n, *, segments=False, dtype=jnp.float32):
    x = rng.standard_normal((b, l, h, p))
    dt = np.log1p(np.exp(rng.standard_normal((b, l, h)) - 1.0))  # softplus: > 0
    A = -rng.uniform(0.5, 2.0, (h,))
    B, C = rng.standard_normal((b, l, g, n)), rng.standard_normal((b, l, g, n))
    D = rng.standard_normal((h,))
    s0 = rng.standard_normal((b, h, p, n))
    seg = np.sort(rng.integers(0, 3, (b, l)), axis=1).astype(np.int32) if segments else None
    cast = lambda a, dt_=dtype: jnp.asarray(a, dt_)
    return (cast(x), cast(dt, jnp.float32), cast(A, jnp.float32), cast(B), cast(C), cast(D, jnp.float32),
            cast(s0, jnp.float32)), (None if seg is None else jnp.asarray(seg))


def value_and_grads(fn, args, seg, **kw):
    """``(y, final_state, grads of x, dt, A, B, C, D, initial_state)`` for a loss touching y and the state."""

    def loss(x, dt, A, B, C, D, s0):
        y, s = fn(x, dt, A, B, C, D=D, initial_state=s0, segment_ids=seg, **kw)
        y32 = y.astype(jnp.float32)
        return jnp.sum(y32 * jnp.cos(y32)) + jnp.sum(s * jnp.sin(s)), (y, s)

    (_, (y, s)), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True))(*args)
    return y, s, grads


def assert_close(got, ref, tol, name):
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    err = np.max(np.abs(got - ref)) / max(1.0, np.max(np.abs(ref)))
    assert err < tol, f"{name}: relative error {err}"


@pytest.mark.parametrize("case", [
    # seq 37 with chunk 32 (two tiles of 16 per chunk), p 8 / n 6 padded to 16, 2 groups of 2 heads,
    # packed segments, initial state, D.
    dict(b=2, l=37, h=4, p=8, g=2, n=6, chunk=32, block_t=16, segments=True),
    # chunk 8 (the kernels round it up to 16), one group, no segments, bf16 inputs.
    dict(b=1, l=21, h=2, p=16, g=1, n=16, chunk=8, block_t=64, segments=False, dtype=jnp.bfloat16),
], ids=["f32-segments-groups", "bf16-chunk8"])
def test_matches_reference_values_and_gradients(case):
    case = dict(case)
    dtype = case.pop("dtype", jnp.float32)
    chunk, block_t, segments = case.pop("chunk"), case.pop("block_t"), case.pop("segments")
    args, seg = make_inputs(np.random.default_rng(0), **case, segments=segments, dtype=dtype)
    y, s, g = value_and_grads(ssd_chunked, args, seg, chunk_size=chunk, block_t=block_t, interpret=True)
    # The reference in float32 on the same (possibly bf16-rounded) inputs.
    ref_args = tuple(a.astype(jnp.float32) for a in args)
    yr, sr, gr = value_and_grads(core.ssd_chunked, ref_args, seg, chunk_size=chunk)
    assert y.dtype == dtype and s.dtype == jnp.float32 and y.shape == args[0].shape
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    assert_close(y, yr, tol, "y")
    assert_close(s, sr, tol, "final_state")
    for name, a, r, primal in zip(("dx", "ddt", "dA", "dB", "dC", "dD", "dinitial_state"), g, gr, args):
        assert a.shape == r.shape and a.dtype == primal.dtype
        assert_close(a, r, tol if dtype == jnp.float32 else 5e-2, name)
        assert np.all(np.isfinite(np.asarray(a, np.float32))), name


def test_state_handoff_between_calls():
    """Prefill in two calls, the first call's final state handed to the second, equals one call of the
    reference (what the engine's chunked prefill relies on); no D, no segments."""
    args, _ = make_inputs(np.random.default_rng(1), 1, 40, 2, 16, 1, 16)
    x, dt, A, B, C = args[:5]
    f = jax.jit(lambda x, dt, B, C, s0: ssd_chunked(x, dt, A, B, C, chunk_size=16, initial_state=s0,
                                                    interpret=True))
    yr, sr = core.ssd_chunked(x, dt, A, B, C, chunk_size=16)
    y1, s1 = f(x[:, :20], dt[:, :20], B[:, :20], C[:, :20], jnp.zeros_like(sr))
    y2, s2 = f(x[:, 20:], dt[:, 20:], B[:, 20:], C[:, 20:], s1)
    assert_close(jnp.concatenate([y1, y2], axis=1), yr, 1e-5, "y in two calls")
    assert_close(s2, sr, 1e-5, "state in two calls")


def test_bad_arguments_raise_clear_errors():
    args, _ = make_inputs(np.random.default_rng(2), 1, 8, 2, 4, 1, 4)
    x, dt, A, B, C = args[:5]
    with pytest.raises(ValueError, match="block_t"):
        ssd_chunked(x, dt, A, B, C, chunk_size=8, block_t=24)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_chunked(x, dt, A, B, C, chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        ssd_chunked(x, dt, A, B, C, chunk_size=8, backend="mosaic")
    with pytest.raises(ValueError, match="dt"):
        ssd_chunked(x, dt[:, :3], A, B, C, chunk_size=8)
    with pytest.raises(ValueError, match="initial_state"):
        ssd_chunked(x, dt, A, B, C, chunk_size=8, initial_state=jnp.zeros((1, 2, 4, 3)))
    with pytest.raises(ValueError, match="segment_ids"):
        ssd_chunked(x, dt, A, B, C, chunk_size=8, segment_ids=jnp.zeros((1, 8), jnp.float32))
    with pytest.raises(ValueError, match="x: expected float"):
        ssd_chunked(x.astype(jnp.int32), dt, A, B, C, chunk_size=8)


def test_lowers_to_triton_ir_for_h100_without_a_gpu():
    """Ahead-of-time lowering for an abstract H100 at Chimera-700m layer sizes (p 64, n 128, chunk 256,
    bf16, segments): all five kernels pass the Pallas Triton lowering. Compiling the IR needs a GPU."""
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    b, l, h, p, g, n = 1, 300, 4, 64, 1, 128
    S = jax.ShapeDtypeStruct

    def loss(x, dt, A, B, C, D, s0, seg):
        y, s = ssd_chunked(x, dt, A, B, C, chunk_size=256, D=D, initial_state=s0, segment_ids=seg)
        return y.astype(jnp.float32).sum() + s.sum()

    shapes = (S((b, l, h, p), jnp.bfloat16), S((b, l, h), jnp.float32), S((h,), jnp.float32),
              S((b, l, g, n), jnp.bfloat16), S((b, l, g, n), jnp.bfloat16), S((h,), jnp.float32),
              S((b, h, p, n), jnp.float32), S((b, l), jnp.int32))
    with jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(jax.grad(loss, argnums=tuple(range(7)))).trace(*shapes).lower(
            lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 5


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_compiled_gpu_matches_reference():
    args, seg = make_inputs(np.random.default_rng(3), 2, 1000, 8, 64, 2, 128, segments=True,
                            dtype=jnp.bfloat16)
    y, s, g = value_and_grads(ssd_chunked, args, seg, chunk_size=256)
    yr, sr, gr = value_and_grads(core.ssd_chunked, tuple(a.astype(jnp.float32) for a in args), seg,
                                 chunk_size=256)
    assert_close(y, yr, 3e-2, "y")
    assert_close(s, sr, 3e-2, "state")
    for name, a, r in zip(("dx", "ddt", "dA", "dB", "dC", "dD", "ds0"), g, gr):
        assert_close(a, r, 5e-2, name)


# ------------------------------------------------------------------------------------------------- models

def test_ssd_impl_is_validated_and_selects_the_kernel():
    from mani_jax.models import ModelConfig
    from mani_jax.models.attention_impls import chunked_ssd

    with pytest.raises(ValueError, match="ssd_impl"):
        ModelConfig(ssd_impl="triton")
    assert chunked_ssd(ModelConfig()) is core.ssd_chunked
    fn = chunked_ssd(ModelConfig(ssd_impl="pallas", ssd_interpret=True))
    assert fn.func is ssd_chunked and fn.keywords == {"interpret": True}


@pytest.mark.slow  # ~10-30 s on 2 shared cores: compiling two models; the kernel is covered above
def test_hybrid_lm_trains_through_the_ssd_kernel():
    """HybridLM with ssd_impl="pallas" (interpret mode): same loss and parameter gradients as "xla" on
    packed sequences (segment ids; n_groups 2; seq 23 not a multiple of the chunk)."""
    from flax import nnx

    from mani_jax.models import HybridLM, ModelConfig

    base = dict(vocab_size=37, d_model=32, n_layers=1, layer_types=("mamba",), n_heads=2, n_kv_heads=1,
                head_dim=16, d_ff=32, mamba_n_heads=4, mamba_head_dim=16, d_state=8, n_groups=2,
                chunk_size=16, max_seq_len=32, initializer_range=0.3)
    rng = np.random.default_rng(7)
    tokens = jnp.asarray(rng.integers(0, 37, (2, 24)), jnp.int32)
    seg = jnp.asarray(np.sort(rng.integers(0, 2, (2, 24)), axis=1), jnp.int32)

    def loss_and_grads(cfg):
        model = HybridLM(cfg, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)

        def loss_fn(params):
            logits = nnx.merge(graphdef, params)(tokens[:, :-1], segment_ids=seg[:, :-1])
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
        return float(loss), jax.tree.leaves(grads)

    loss_x, g_x = loss_and_grads(ModelConfig(**base))
    loss_p, g_p = loss_and_grads(ModelConfig(**base, ssd_impl="pallas", ssd_interpret=True))
    assert abs(loss_x - loss_p) < 1e-5 * max(1.0, abs(loss_x))
    assert len(g_x) == len(g_p)
    for a, b in zip(g_x, g_p):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-4)
    assert max(float(jnp.abs(a).max()) for a in g_x) > 1e-3
