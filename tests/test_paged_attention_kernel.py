"""kernels.paged_attention against mani_jax.core.paged_attention, in Pallas interpret mode on CPU (compiled
on a GPU), and the engine's greedy output with the kernel selected.

Cases cover an empty slot (length 0: zeros, not NaN), length 1, a partial last page, full pages, GQA (and a
group size padded to 16), several splits and several page blocks per split, a sliding window, garbage
block-table entries past a sequence's pages, bf16, a head dim that is not a power of two, and int8 pages
with per-(page, kv head) scales.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.paged_attention import paged_attention
from mani_jax import core
from mani_jax.core.paged_attention import quantize_pages

ON_GPU = jax.default_backend() == "gpu"


def make_cache(rng, b, hq, hkv, d, page_size, n_pages, max_pages, lengths, dtype=jnp.float32):
    q = jnp.asarray(rng.standard_normal((b, hq, d)), dtype)
    k = jnp.asarray(rng.standard_normal((n_pages, page_size, hkv, d)), dtype)
    v = jnp.asarray(rng.standard_normal((n_pages, page_size, hkv, d)), dtype)
    tables = rng.permutation(n_pages)[:b * max_pages].reshape(b, max_pages).astype(np.int32)
    for i, n in enumerate(lengths):  # entries past the sequence's pages are garbage (even out of range)
        tables[i, -(-n // page_size):] = n_pages + 7
    return q, k, v, jnp.asarray(tables), jnp.asarray(lengths, jnp.int32)


def assert_close(got, ref, tol, name="out"):
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(got)), name
    err = np.max(np.abs(got - ref)) / max(1.0, np.max(np.abs(ref)))
    assert err < tol, f"{name}: relative error {err}"


LENGTHS = [0, 1, 4, 17, 32]  # empty slot, one token, one full page, a partial last page, all pages full


@pytest.mark.parametrize("case", [
    # GQA 4/2, page 4, blocks of 4 pages (16 tokens), 2 splits of 8 pages: lengths cross block and split edges.
    dict(hq=4, hkv=2, d=16, pages_per_block=4, n_splits=2),
    # the same with a sliding window of 6 (blocks before the window are skipped).
    dict(hq=4, hkv=2, d=16, pages_per_block=4, n_splits=2, sliding_window=6),
    # bf16 cache with float32 queries, group of 3 (padded to 16 rows), head dim 24 (padded to 32), default
    # block / split sizes.
    dict(hq=6, hkv=2, d=24, dtype=jnp.bfloat16, q_float32=True),
], ids=["gqa-splits", "window", "bf16-padded"])
def test_matches_reference(case):
    case = dict(case)
    dtype = case.pop("dtype", jnp.float32)
    window = case.pop("sliding_window", None)
    hq, hkv, d = case.pop("hq"), case.pop("hkv"), case.pop("d")
    q, k, v, tables, lengths = make_cache(np.random.default_rng(0), 5, hq, hkv, d, 4, 48, 8, LENGTHS, dtype)
    if case.pop("q_float32", False):  # float32 queries over a bf16 cache (q is cast to the pages' dtype)
        q = q.astype(jnp.float32)
    out = paged_attention(q, k, v, tables, lengths, sliding_window=window, interpret=True, **case)
    ref = core.paged_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), tables,
                               lengths, sliding_window=window)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, 1e-5 if dtype == jnp.float32 else 2e-2)
    assert np.all(np.asarray(out[0]) == 0)  # the empty slot


def test_int8_pages_match_the_int8_reference():
    q, k, v, tables, lengths = make_cache(np.random.default_rng(1), 5, 4, 1, 16, 4, 48, 8, LENGTHS)
    (kq, ks), (vq, vs) = quantize_pages(k), quantize_pages(v)
    assert kq.dtype == jnp.int8 and ks.shape == (48, 1)
    out = paged_attention(q, kq, vq, tables, lengths, k_scales=ks, v_scales=vs, pages_per_block=4,
                          n_splits=2, interpret=True)
    ref = core.paged_attention(q, kq, vq, tables, lengths, k_scales=ks, v_scales=vs)
    assert_close(out, ref, 1e-5)
    # And int8 is close to the float cache it quantizes (absmax/127 per page and head).
    assert_close(out, core.paged_attention(q, k, v, tables, lengths), 5e-2)


def test_bad_arguments_raise_clear_errors():
    q, k, v, tables, lengths = make_cache(np.random.default_rng(2), 2, 4, 2, 16, 4, 8, 2, [3, 5])
    with pytest.raises(ValueError, match="q: expected"):
        paged_attention(q[:, None], k, v, tables, lengths)
    with pytest.raises(ValueError, match="n_heads"):
        paged_attention(q[:, :3], k, v, tables, lengths)
    with pytest.raises(ValueError, match="page_size"):
        paged_attention(q, k[:, :3], v[:, :3], tables, lengths)
    with pytest.raises(ValueError, match="scales"):
        paged_attention(q, k.astype(jnp.int8), v.astype(jnp.int8), tables, lengths)
    with pytest.raises(ValueError, match="one float dtype"):
        paged_attention(q, k.astype(jnp.bfloat16), v, tables, lengths)
    with pytest.raises(ValueError, match="lengths"):
        paged_attention(q, k, v, tables, lengths[:1])
    with pytest.raises(ValueError, match="pages_per_block"):
        paged_attention(q, k, v, tables, lengths, pages_per_block=2)  # 2 * 4 tokens < 16
    with pytest.raises(ValueError, match="sliding_window"):
        paged_attention(q, k, v, tables, lengths, sliding_window=0)
    with pytest.raises(ValueError, match="k_scales"):
        core.paged_attention(q, k.astype(jnp.int8), v.astype(jnp.int8), tables, lengths,
                             k_scales=jnp.ones((8, 3)), v_scales=jnp.ones((8, 2)))


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "int8"])
def test_lowers_to_triton_ir_for_h100_without_a_gpu(quantized):
    """Ahead-of-time lowering for an abstract H100 (Chimera-700m attention: 12 q heads, 4 kv heads, D 128,
    page 16): the kernel passes the Pallas Triton lowering. Compiling the IR needs a GPU."""
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    S = jax.ShapeDtypeStruct
    b, hq, hkv, d, ps, n_pages, mp = 8, 12, 4, 128, 16, 600, 64
    kv_dtype = jnp.int8 if quantized else jnp.bfloat16

    def f(q, k, v, t, l, ks, vs):
        scales = dict(k_scales=ks, v_scales=vs) if quantized else {}
        return paged_attention(q, k, v, t, l, sliding_window=1000, **scales)

    shapes = (S((b, hq, d), jnp.bfloat16), S((n_pages, ps, hkv, d), kv_dtype), S((n_pages, ps, hkv, d), kv_dtype),
              S((b, mp), jnp.int32), S((b,), jnp.int32), S((n_pages, hkv), jnp.float32),
              S((n_pages, hkv), jnp.float32))
    with jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 1


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_compiled_gpu_matches_reference():
    rng = np.random.default_rng(3)
    lengths = [0, 1, 15, 16, 17, 1000, 4095, 2048]
    q, k, v, tables, lens = make_cache(rng, 8, 12, 4, 128, 16, 2048, 256, lengths, jnp.bfloat16)
    ref = core.paged_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), tables, lens)
    assert_close(paged_attention(q, k, v, tables, lens), ref, 2e-2)
    (kq, ks), (vq, vs) = quantize_pages(k), quantize_pages(v)
    ref8 = core.paged_attention(q.astype(jnp.float32), kq, vq, tables, lens, k_scales=ks, v_scales=vs)
    assert_close(paged_attention(q, kq, vq, tables, lens, k_scales=ks, v_scales=vs), ref8, 2e-2)


# ---------------------------------------------------------------------------------------- models, engine

def test_paged_attention_impl_is_validated_and_selects_the_kernel():
    from mani_jax.models import ModelConfig
    from mani_jax.models.attention_impls import paged_decode_attention

    with pytest.raises(ValueError, match="paged_attention_impl"):
        ModelConfig(paged_attention_impl="cudnn")
    assert paged_decode_attention(ModelConfig()) is core.paged_attention
    fn = paged_decode_attention(ModelConfig(paged_attention_impl="pallas", attention_interpret=True))
    assert fn.func is paged_attention and fn.keywords == {"interpret": True}


@pytest.mark.slow  # ~10-30 s on 2 shared cores: compiling two models; the kernel is covered above
def test_engine_greedy_output_is_identical_with_the_kernel():
    """The engine's decode steps read the paged cache through the kernel (interpret mode): greedy tokens
    equal those with the reference (decode batches with an empty slot; lengths crossing page edges)."""
    from flax import nnx

    from mani_jax.inference.engine import Engine, SamplingParams
    from mani_jax.models import HybridLM, ModelConfig

    base = ModelConfig(vocab_size=97, d_model=32, n_layers=1, layer_types=("attention",), n_heads=4,
                       n_kv_heads=2, head_dim=16, d_ff=48, max_seq_len=32, initializer_range=0.3)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, 97, 8)] for _ in range(2)]  # one prefill program
    outs = []
    for impl in ("xla", "pallas"):
        cfg = dataclasses.replace(base, paged_attention_impl=impl, attention_interpret=True)
        # max_batch 3 with 2 requests: the decode batch always holds an empty slot (length 0).
        eng = Engine(HybridLM(cfg, rngs=nnx.Rngs(0)), max_batch=3, page_size=4, prefill_budget=8)
        outs.append(eng.generate(prompts, SamplingParams(max_new_tokens=6)))
    assert outs[0] == outs[1]
    assert all(len(o) == 6 for o in outs[0]) and outs[0][0] != outs[0][1]


# ------------------------------------------------------------------------------------------- experiment

@pytest.mark.slow  # ~10-20 s on 2 shared cores: interpret-mode compiles of both kernels and both references
@pytest.mark.skipif(ON_GPU, reason="the GPU run times the kernels (minutes); this is the CPU smoke path")
def test_kernels_bench_refuses_cpu_and_smokes_in_interpret_mode(tmp_path):
    import json

    from experiments import kernels_bench as bench

    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["--preset", "quick", "--out", str(tmp_path / "refused")])
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["--preset", "smoke", "--out", str(tmp_path / "refused")])  # smoke without --interpret
    s = bench.main(["--interpret", "--preset", "smoke", "--out", str(tmp_path / "run")])
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["timed"] is False and (tmp_path / "run" / "kernels_bench.png").exists()
    assert {r["system"] for r in s["ssd"]} == {"ours", "xla"} and {r["system"] for r in s["paged"]} == {
        "ours", "ours-int8", "xla", "jax-pallas"}  # JAX's deprecated kernel runs in interpret mode too
    for r in s["ssd"] + s["paged"]:
        assert "error" not in r, r
    ours = next(r for r in s["ssd"] if r["system"] == "ours")
    assert ours["max_rel_err_fwd"] < 3e-2 and ours["max_rel_err_grads"] < 6e-2
    assert all(v["measured"] is None for v in s["targets"].values())  # no timings claimed without a GPU
