"""Flash-attention benchmark: TFLOP/s of forward, backward and forward+backward, and memory against seqlen,
for our Pallas kernel and every attention a JAX (or PyTorch) user has today, all in the same run.

    python -m experiments.flash_attention                      # GPU: seqlen 512..16384, D 64/128, (non)causal
    python -m experiments.flash_attention --preset quick       # GPU: D 128, seqlen 1024/4096/8192
    python -m experiments.flash_attention --preset smoke       # CPU: interpret-mode correctness sweep only

Systems (each skipped with its reason where it does not apply):

* ``ours`` / ``ours-64x64``: :func:`kernels.flash_attention.flash_attention` (Pallas Triton lowering) with
  the per-head-dim block table / the 64x64 FlashAttention-2 baseline tiles;
* ``xla``: :func:`mani_jax.core.attention` under ``jax.jit`` (the framework's own attention);
* ``jax-dpa-xla`` / ``jax-dpa-cudnn``: ``jax.nn.dot_product_attention(implementation=...)``;
* ``pallas-mha``: JAX's Pallas Triton ``ops.gpu.attention.mha`` (fused Triton backward);
* ``pallas-mgpu``: JAX's Mosaic GPU ``ops.gpu.attention_mgpu.attention`` (Hopper; its backward is
  non-causal only);
* ``torch-sdpa-flash`` / ``torch-sdpa-math``: PyTorch ``scaled_dot_product_attention`` with the flash / math
  backend, when ``torch`` with CUDA is importable.

Shapes: bf16, ``batch x seqlen = tokens`` (16k) and ``heads x head_dim = hidden`` (2048), as in the
FlashAttention-2 paper's benchmark, so every seqlen fills the chip. FLOPs: ``4 B H T S D`` forward (halved
when causal), backward 2.5x forward (FlashAttention-2 convention). Before timing, every entry's forward
output is checked against the float32 reference on 256 query rows (first and last 128; the reference gets
their positions explicitly), and the gradients of every (system, head dim, causal) against the reference's
at the smallest seqlen. Timing: jitted calls, ``warmup`` untimed calls, then ``repeats`` measurements of
``n`` back-to-back calls on inputs rotated among ``rotate`` distinct sets (so L2 does not hold them) with one
``block_until_ready`` at the end; the median per call is reported. Memory: bytes of XLA temporaries of the
compiled forward+backward (``memory_analysis().temp_size_in_bytes``; for torch ``max_memory_allocated``
above the inputs), against seqlen at one batch row, 16 heads, D 128.

Writes ``RUN_DIR/summary.json`` and ``RUN_DIR/flash_attention.png`` and prints a table. On a machine
without a GPU only ``--preset smoke`` runs (the kernels in Pallas interpret mode, correctness only).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.common import write_json_atomic
from mani_jax.config import apply_overrides, get_preset
from mani_jax.train.metrics import save_figure


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run (lengths in tokens)."""

    seqlens: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
    head_dims: tuple[int, ...] = (64, 128)
    causal: tuple[bool, ...] = (False, True)
    tokens: int = 16384  # batch * seqlen
    hidden: int = 2048  # heads * head_dim
    dtype: str = "bfloat16"
    systems: tuple[str, ...] = ("ours", "ours-64x64", "xla", "jax-dpa-xla", "jax-dpa-cudnn", "pallas-mha",
                                "pallas-mgpu", "torch-sdpa-flash", "torch-sdpa-math")
    warmup: int = 3
    repeats: int = 7
    min_time_s: float = 0.05  # each measurement spans at least this long (n calls back to back)
    rotate: int = 3
    memory_seqlens: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    interpret: bool = False  # smoke: run the Pallas kernels in interpret mode, correctness only
    seed: int = 0


PRESETS = {
    "default": BenchConfig(),
    "quick": BenchConfig(seqlens=(1024, 4096, 8192), head_dims=(128,), memory_seqlens=(1024, 4096, 8192)),
    # CPU, minutes: interpret-mode correctness of ours (and JAX's Pallas mha) at tiny shapes; no timing.
    "smoke": BenchConfig(seqlens=(128,), head_dims=(64, 128), tokens=128, hidden=256, dtype="float32",
                         systems=("ours", "ours-64x64", "xla", "jax-dpa-xla", "pallas-mha"), warmup=0, repeats=0,
                         rotate=1, memory_seqlens=(), interpret=True),
}

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 tensor-core peak (SXM); for the % column


class Unsupported(Exception):
    """A system does not apply to this shape / machine (recorded with the reason, not an error)."""


def attention_flops(b, h, t, s, d, causal, mode):
    fwd = 4.0 * b * h * t * s * d * (0.5 if causal else 1.0)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwdbwd": 3.5 * fwd}[mode]


# --------------------------------------------------------------------------------------------- systems

def _jax_system(name: str, cfg: BenchConfig, d: int, causal: bool):
    """``f(q, k, v) -> out`` for a JAX system, layout [B, T, H, D]; raises Unsupported."""
    import jax
    import jax.numpy as jnp

    from kernels.flash_attention import BlockSizes, flash_attention
    from mani_jax import core

    on_gpu = jax.default_backend() == "gpu"
    scale = 1.0 / math.sqrt(d)
    if name == "ours":
        return lambda q, k, v: flash_attention(q, k, v, causal=causal, interpret=cfg.interpret)
    if name == "ours-64x64":
        return lambda q, k, v: flash_attention(q, k, v, causal=causal, block_sizes=BlockSizes.baseline(),
                                               interpret=cfg.interpret)
    if name == "xla":
        return lambda q, k, v: core.attention(q, k, v, causal=causal)
    if name in ("jax-dpa-xla", "jax-dpa-cudnn"):
        impl = name.split("-")[-1]
        if impl == "cudnn" and not on_gpu:
            raise Unsupported("cuDNN needs a CUDA GPU")
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
    if name == "pallas-mha":
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental.pallas.ops.gpu import attention as mha_mod
        if not (on_gpu or cfg.interpret):
            raise Unsupported("needs a GPU (or interpret mode)")
        return lambda q, k, v: mha_mod.mha(q, k, v, None, sm_scale=scale, causal=causal, interpret=cfg.interpret)
    if name == "pallas-mgpu":
        if not on_gpu:
            raise Unsupported("Mosaic GPU needs a Hopper GPU")
        if "H100" not in jax.devices()[0].device_kind and "H200" not in jax.devices()[0].device_kind:
            raise Unsupported(f"Mosaic GPU attention is Hopper-only; device is {jax.devices()[0].device_kind}")
        if d % 64:
            raise Unsupported("head_dim must be a multiple of 64")
        from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu
        tc = mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal,
                               block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)

        def f(q, k, v):
            return mgpu.attention(q, k, v, tc)
        return f
    raise Unsupported(f"not a JAX system: {name}")


def _torch_system(name: str, causal: bool):
    """``(f(q, k, v) -> out, torch)`` with torch tensors [B, H, T, D]; raises Unsupported."""
    try:
        import torch
    except ImportError:
        raise Unsupported("torch is not installed") from None
    if not torch.cuda.is_available():
        raise Unsupported("torch has no CUDA device")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.FLASH_ATTENTION if name == "torch-sdpa-flash" else SDPBackend.MATH

    def f(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return f, torch


# ------------------------------------------------------------------------------------------ measurement

def _median_time(call, inputs, cfg: BenchConfig, block):
    """Median seconds per call: warmup, then ``repeats`` x (n back-to-back calls, one sync)."""
    for i in range(cfg.warmup):
        block(call(*inputs[i % len(inputs)]))
    t0 = time.perf_counter()
    block(call(*inputs[0]))
    one = max(time.perf_counter() - t0, 1e-6)
    n = max(1, int(cfg.min_time_s / one))
    times = []
    for _ in range(cfg.repeats):
        t0 = time.perf_counter()
        out = None
        for i in range(n):
            out = call(*inputs[i % len(inputs)])
        block(out)
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def _reference_rows(q, k, v, causal, rows):
    """Float32 reference output on the query rows ``rows`` (positions passed explicitly)."""
    import jax.numpy as jnp

    from mani_jax import core

    b, t = q.shape[:2]
    s = k.shape[1]
    qpos = jnp.broadcast_to(jnp.asarray(rows, jnp.int32) + (s - t), (b, len(rows)))
    return core.attention(q[:, rows].astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                          causal=causal, q_positions=qpos)


def _grad_fn(f):
    """Jitted ``(q, k, v, do) -> (dq, dk, dv)``: the forward and backward of ``f``."""
    import jax

    def g(q, k, v, do):
        out, vjp = jax.vjp(f, q, k, v)
        return vjp(do.astype(out.dtype))

    return jax.jit(g)


def run_jax_entry(name, cfg, d, causal, t, rng, *, check_grads: bool):
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(cfg.dtype)
    h = cfg.hidden // d
    b = max(1, cfg.tokens // t)
    f = _jax_system(name, cfg, d, causal)
    inputs = [tuple(jnp.asarray(rng.standard_normal((b, t, h, d)), dtype) for _ in range(3))
              for _ in range(max(1, cfg.rotate))]
    fwd = jax.jit(f)
    q, k, v = inputs[0]
    row = {"system": name, "seqlen": t, "head_dim": d, "causal": causal, "batch": b, "heads": h}
    # Correctness of this entry before timing: 256 query rows against the float32 reference.
    rows = np.unique(np.concatenate([np.arange(min(128, t)), np.arange(max(0, t - 128), t)]))
    out = np.asarray(fwd(q, k, v).astype(jnp.float32))[:, rows]
    ref = np.asarray(_reference_rows(q, k, v, causal, rows))
    row["max_abs_err_fwd"] = float(np.max(np.abs(out - ref)))
    tol = 2e-2 if dtype != jnp.float32 else 1e-4
    if not np.isfinite(out).all() or row["max_abs_err_fwd"] > tol:
        raise RuntimeError(f"{name}: forward output wrong (max abs err {row['max_abs_err_fwd']:.3g})")
    g = _grad_fn(f)
    if check_grads:
        do = jnp.asarray(rng.standard_normal(q.shape), dtype)
        from mani_jax import core
        gref = _grad_fn(lambda q, k, v: core.attention(q, k, v, causal=causal))
        f32 = lambda x: x.astype(jnp.float32)
        got = g(q, k, v, do)
        want = gref(f32(q), f32(k), f32(v), f32(do))
        err = max(float(jnp.max(jnp.abs(f32(a) - b_))) / max(1.0, float(jnp.max(jnp.abs(b_))))
                  for a, b_ in zip(got, want))
        row["max_rel_err_grads"] = err
        if not err < (6e-2 if dtype != jnp.float32 else 1e-4):
            raise RuntimeError(f"{name}: gradients wrong (max scaled err {err:.3g})")
    if cfg.repeats == 0:
        return row
    dos = [jnp.asarray(rng.standard_normal(q.shape), dtype) for _ in inputs]
    block = jax.block_until_ready
    row["fwd_s"] = _median_time(fwd, inputs, cfg, block)
    try:
        row["fwdbwd_s"] = _median_time(g, [x + (do,) for x, do in zip(inputs, dos)], cfg, block)
    except Exception as e:  # e.g. attention_mgpu has no causal backward
        row["bwd_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return row


def run_torch_entry(name, cfg, d, causal, t, rng):
    f, torch = _torch_system(name, causal)
    dtype = getattr(torch, cfg.dtype)
    h = cfg.hidden // d
    b = max(1, cfg.tokens // t)
    mk = lambda: torch.tensor(rng.standard_normal((b, h, t, d)), dtype=dtype, device="cuda")
    inputs = [tuple(mk().requires_grad_() for _ in range(3)) for _ in range(max(1, cfg.rotate))]
    row = {"system": name, "seqlen": t, "head_dim": d, "causal": causal, "batch": b, "heads": h}
    import jax.numpy as jnp
    q, k, v = inputs[0]
    rows = np.unique(np.concatenate([np.arange(min(128, t)), np.arange(max(0, t - 128), t)]))
    with torch.no_grad():
        out = f(q, k, v).float().cpu().numpy().transpose(0, 2, 1, 3)[:, rows]
    to_j = lambda x: jnp.asarray(x.detach().float().cpu().numpy().transpose(0, 2, 1, 3))
    ref = np.asarray(_reference_rows(to_j(q), to_j(k), to_j(v), causal, rows))
    row["max_abs_err_fwd"] = float(np.max(np.abs(out - ref)))
    if not np.isfinite(out).all() or row["max_abs_err_fwd"] > 2e-2:
        raise RuntimeError(f"{name}: forward output wrong (max abs err {row['max_abs_err_fwd']:.3g})")
    sync = lambda _: torch.cuda.synchronize()

    def fwd(q, k, v):
        with torch.no_grad():
            return f(q, k, v)

    do = mk()

    def fwdbwd(q, k, v):
        out = f(q, k, v)
        return torch.autograd.grad(out, (q, k, v), do)

    row["fwd_s"] = _median_time(fwd, inputs, cfg, sync)
    row["fwdbwd_s"] = _median_time(fwdbwd, inputs, cfg, sync)
    return row


def _finish_row(row, device_kind):
    args = (row["batch"], row["heads"], row["seqlen"], row["seqlen"], row["head_dim"], row["causal"])
    if "fwd_s" in row:
        row["fwd_tflops"] = attention_flops(*args, "fwd") / row["fwd_s"] / 1e12
    if "fwdbwd_s" in row:
        row["fwdbwd_tflops"] = attention_flops(*args, "fwdbwd") / row["fwdbwd_s"] / 1e12
        row["bwd_s"] = row["fwdbwd_s"] - row["fwd_s"]
        row["bwd_tflops"] = attention_flops(*args, "bwd") / row["bwd_s"] / 1e12 if row["bwd_s"] > 0 else None
    peak = next((p for k, p in PEAK_BF16_TFLOPS.items() if k in device_kind), None)
    if peak and row.get("fwd_tflops"):
        row["fwd_pct_peak"] = 100 * row["fwd_tflops"] / peak
    return row


def memory_rows(cfg: BenchConfig, rng) -> list[dict]:
    """Bytes of temporaries of the compiled forward+backward against seqlen (B=1, H=16, D=128)."""
    import jax
    import jax.numpy as jnp

    rows = []
    d, h = 128, 16
    for name in cfg.systems:
        for t in cfg.memory_seqlens:
            row = {"system": name, "seqlen": t, "head_dim": d, "heads": h}
            try:
                if name.startswith("torch"):
                    f, torch = _torch_system(name, False)
                    x = [torch.randn(1, h, t, d, dtype=getattr(torch, cfg.dtype), device="cuda", requires_grad=True)
                         for _ in range(3)]
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    out = f(*x)
                    torch.autograd.grad(out, x, torch.ones_like(out))
                    torch.cuda.synchronize()
                    row["temp_bytes"] = int(torch.cuda.max_memory_allocated() - base)
                else:
                    f = _jax_system(name, cfg, d, False)
                    g = _grad_fn(f)
                    spec = jax.ShapeDtypeStruct((1, t, h, d), jnp.dtype(cfg.dtype))
                    mem = g.lower(spec, spec, spec, spec).compile().memory_analysis()
                    row["temp_bytes"] = int(mem.temp_size_in_bytes)
            except Unsupported as e:
                row["skipped"] = str(e)
            except Exception as e:  # record, keep going (e.g. the XLA reference running out of memory)
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            print(f"  memory {name:<18} T={t:<6} " + (f"{row['temp_bytes'] / 2**20:10.1f} MiB" if "temp_bytes" in row
                                                      else row.get("skipped", row.get("error", ""))), flush=True)
    return rows


# ------------------------------------------------------------------------------------------------- run

def run(cfg: BenchConfig, out: Path, *, preset: str) -> dict:
    import jax

    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not cfg.interpret:
        raise SystemExit(f"experiments.flash_attention: preset {preset!r} times kernels and needs a CUDA GPU "
                         f"(jax.default_backend() is {jax.default_backend()!r}). On CPU run --preset smoke, "
                         f"which checks the kernels in Pallas interpret mode; timings need a GPU.")
    out.mkdir(parents=True, exist_ok=True)
    device_kind = jax.devices()[0].device_kind
    rng = np.random.default_rng(cfg.seed)
    results = []
    entries = [(d, c, t, s) for d in cfg.head_dims for c in cfg.causal for t in cfg.seqlens for s in cfg.systems]
    try:
        from tqdm import tqdm
        it = tqdm(entries, desc="flash_attention", unit="entry")
    except ImportError:
        it = entries
    for d, causal, t, name in it:
        first = t == min(cfg.seqlens)
        try:
            if name.startswith("torch"):
                row = run_torch_entry(name, cfg, d, causal, t, rng)
            else:
                row = run_jax_entry(name, cfg, d, causal, t, rng, check_grads=first)
            row = _finish_row(row, device_kind)
        except Unsupported as e:
            row = {"system": name, "seqlen": t, "head_dim": d, "causal": causal, "skipped": str(e)}
        except Exception as e:  # a wrong result or a failure is recorded, never timed
            row = {"system": name, "seqlen": t, "head_dim": d, "causal": causal,
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        results.append(row)
    memory = memory_rows(cfg, rng) if on_gpu else []

    summary = {"preset": preset, "config": dataclasses.asdict(cfg), "device": str(jax.devices()[0]),
               "device_kind": device_kind, "jax_version": jax.__version__,
               "date": time.strftime("%Y-%m-%d"), "results": results, "memory": memory,
               "timed": cfg.repeats > 0}
    summary["targets"] = _targets(results) if cfg.repeats else {}
    if cfg.repeats:
        summary["plot"] = _plot(summary, out)
    write_json_atomic(out / "summary.json", summary)
    _print_table(summary)
    return summary


def _lookup(results, system, t, d, causal, key):
    for r in results:
        if (r["system"], r["seqlen"], r["head_dim"], r["causal"]) == (system, t, d, causal):
            return r.get(key)
    return None


def _targets(results) -> dict:
    """The issue's targets (H100, bf16, D=128): measured values and ratios (None where not measured)."""
    f = lambda s, t, k, c=False: _lookup(results, s, t, 128, c, k)
    ratio = lambda a, b: (a / b) if (a and b) else None
    return {
        "fwd_tflops_8192_d128": f("ours", 8192, "fwd_tflops"),
        "bwd_tflops_8192_d128": f("ours", 8192, "bwd_tflops"),
        "target_fwd_tflops": 600, "target_bwd_tflops": 450,
        "fwdbwd_speedup_vs_pallas_mha_8192": ratio(f("ours", 8192, "fwdbwd_tflops"),
                                                   f("pallas-mha", 8192, "fwdbwd_tflops")),
        "fwdbwd_speedup_vs_xla_4096": ratio(f("ours", 4096, "fwdbwd_tflops"), f("xla", 4096, "fwdbwd_tflops")),
        "fwdbwd_speedup_vs_xla_4096_causal": ratio(f("ours", 4096, "fwdbwd_tflops", True),
                                                   f("xla", 4096, "fwdbwd_tflops", True)),
        "fwd_ratio_vs_cudnn_8192": ratio(f("ours", 8192, "fwd_tflops"), f("jax-dpa-cudnn", 8192, "fwd_tflops")),
    }


def _print_table(s: dict) -> None:
    print(f"\nflash attention benchmark, {s['device']} ({s['date']}, jax {s['jax_version']}, preset {s['preset']})")
    hdr = f"{'system':<18}{'D':>5}{'causal':>7}{'seqlen':>8}  {'fwd TF/s':>9}{'bwd TF/s':>9}{'f+b TF/s':>9}  note"
    print(hdr + "\n" + "-" * len(hdr))
    fmt = lambda x: f"{x:9.1f}" if isinstance(x, (int, float)) else f"{'-':>9}"
    for r in s["results"]:
        note = r.get("skipped") or r.get("error") or r.get("bwd_error") or (
            f"err fwd {r['max_abs_err_fwd']:.1e}" + (f", grads {r['max_rel_err_grads']:.1e}"
                                                     if "max_rel_err_grads" in r else ""))
        print(f"{r['system']:<18}{r['head_dim']:>5}{str(r['causal']):>7}{r['seqlen']:>8}  {fmt(r.get('fwd_tflops'))}"
              f"{fmt(r.get('bwd_tflops'))}{fmt(r.get('fwdbwd_tflops'))}  {note}")
    if not s["timed"]:
        print("\nCorrectness only (interpret mode / no GPU): timings need a GPU.")
    for k, v in s["targets"].items():
        print(f"  {k}: {v if not isinstance(v, float) else round(v, 3)}")


def _plot(s: dict, out: Path) -> str:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cfg = s["config"]
    combos = [(d, c) for d in cfg["head_dims"] for c in cfg["causal"]]
    fig, axes = plt.subplots(len(combos) + 1, 2, figsize=(13, 3.6 * (len(combos) + 1)), squeeze=False)
    for row_axes, (d, c) in zip(axes, combos):
        for ax, key in zip(row_axes, ("fwd_tflops", "bwd_tflops")):
            for name in cfg["systems"]:
                pts = [(r["seqlen"], r[key]) for r in s["results"] if r["system"] == name and r["head_dim"] == d
                       and r["causal"] == c and r.get(key)]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{key.split('_')[0]} TFLOP/s, D={d}, {'causal' if c else 'non-causal'}")
            ax.set_xlabel("seqlen")
            ax.legend(fontsize=7)
    ax = axes[-1][0]
    for name in cfg["systems"]:
        pts = [(r["seqlen"], r["temp_bytes"] / 2**20) for r in s["memory"] if r["system"] == name and "temp_bytes" in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title("fwd+bwd temporaries (MiB), B=1, H=16, D=128")
    ax.set_xlabel("seqlen")
    ax.legend(fontsize=7)
    axes[-1][1].axis("off")
    fig.suptitle(f"flash attention, {s['device_kind']} ({s['date']})")
    fig.tight_layout()
    save_figure(fig, out / "flash_attention.png", bbox_inches="tight")
    return "flash_attention.png"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.flash_attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="default", help=f"one of {sorted(PRESETS)}")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/flash_attention-<preset>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    cfg = apply_overrides(get_preset(PRESETS, args.preset, "benchmark preset"), args.overrides)
    out = args.out or Path("runs") / f"flash_attention-{args.preset}"
    return run(cfg, out, preset=args.preset)


if __name__ == "__main__":
    main()
