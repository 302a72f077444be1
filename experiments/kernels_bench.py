"""Benchmark of the Mamba-2 SSD and paged decode-attention Pallas kernels against their ``jnp`` references
(and JAX's deprecated Pallas paged-attention kernel), all baselines in the same run.

    python -m experiments.kernels_bench                                # GPU: the full sweep
    python -m experiments.kernels_bench --preset quick                 # GPU: SSD 4k, paged batch 64 ctx 8k
    python -m experiments.kernels_bench --interpret --preset smoke     # CPU: tiny sizes in interpret mode

SSD (``kernels.ssd.ssd_chunked`` vs :func:`mani_jax.core.ssd_chunked` under ``jax.jit``): forward and
forward+backward time over seqlen 1k..16k at Chimera-700m's Mamba-2 layer sizes (48 heads of 64, d_state
128, one group, chunk 256), bf16 ``x``/``B``/``C``, float32 ``dt``/``A``/``D``, ``batch x seqlen`` = 16k
tokens. FLOPs count the chunk matmuls that the causal structure needs, per token and head
``Q (n + p) + 4 p n`` (2 per multiply-add: intra-chunk ``C B^T`` and ``(L o C B^T) X`` halved by causality,
chunk state and state output), forward+backward = 3x forward; bytes are the minimum traffic (read x, B, C,
dt once, write y). The gradients (all of x, dt, A, B, C, D) are checked against the reference at the
smallest seqlen and the outputs at every seqlen before timing.

Paged decode (``kernels.paged_attention.paged_attention``, bf16 and int8 pages, vs
:func:`mani_jax.core.paged_attention` under ``jax.jit`` and ``jax.experimental.pallas.ops.gpu.paged_attention``
when importable): time per decode step over batch 1..256 and context 1k..32k at Chimera-700m's attention
(12 query heads, 4 kv heads, D 128), page 16, random page order; achieved HBM bandwidth = bytes of K and V
read / time, against a device-to-device baseline (a jitted elementwise op over a 2 GiB buffer: read + write
bytes / time). Entries whose cache exceeds ``max_kv_gib`` are skipped.

Writes ``RUN_DIR/summary.json`` and ``RUN_DIR/kernels_bench.png`` and prints a table. Without a GPU only
``--interpret --preset smoke`` runs (Pallas interpret mode: correctness and the plumbing; its times are
not kernel timings).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.common import write_json_atomic
from mani_jax.config import apply_overrides, get_preset
from mani_jax.train.metrics import save_figure


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run."""

    ssd_seqlens: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    ssd_tokens: int = 16384  # batch * seqlen
    ssd_heads: int = 48
    ssd_head_dim: int = 64
    ssd_d_state: int = 128
    ssd_groups: int = 1
    ssd_chunk: int = 256
    paged_batches: tuple[int, ...] = (1, 8, 64, 256)
    paged_contexts: tuple[int, ...] = (1024, 8192, 32768)
    paged_q_heads: int = 12
    paged_kv_heads: int = 4
    paged_head_dim: int = 128
    page_size: int = 16
    max_kv_gib: float = 20.0  # skip paged entries whose bf16 K+V exceed this
    copy_bytes: int = 2 << 30
    systems_ssd: tuple[str, ...] = ("ours", "xla")
    systems_paged: tuple[str, ...] = ("ours", "ours-int8", "xla", "jax-pallas")
    warmup: int = 2
    repeats: int = 7
    min_time_s: float = 0.05
    seed: int = 0


PRESETS = {
    "default": BenchConfig(),
    "quick": BenchConfig(ssd_seqlens=(4096,), paged_batches=(64,), paged_contexts=(8192,)),
    # CPU, seconds: Pallas interpret mode at tiny sizes (correctness + plumbing; no meaningful timing).
    "smoke": BenchConfig(ssd_seqlens=(32,), ssd_tokens=32, ssd_heads=2, ssd_head_dim=16, ssd_d_state=16,
                         ssd_chunk=16, paged_batches=(2,), paged_contexts=(32,), paged_q_heads=4, paged_kv_heads=2,
                         paged_head_dim=16, page_size=4, copy_bytes=1 << 20,
                         warmup=0, repeats=1, min_time_s=0.0),
}

TARGETS = {"ssd_fwdbwd_speedup_4096": 3.0, "paged_fraction_of_copy_bw_b64_ctx8192": 0.70}


def _median_time(call, args, cfg: BenchConfig):
    import jax

    for _ in range(cfg.warmup):
        jax.block_until_ready(call(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(call(*args))
    n = max(1, int(cfg.min_time_s / max(time.perf_counter() - t0, 1e-6)))
    times = []
    for _ in range(cfg.repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(n):
            out = call(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def _err(got, ref) -> float:
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.max(np.abs(got - ref)) / max(1.0, np.max(np.abs(ref))))


# ----------------------------------------------------------------------------------------------- SSD

def ssd_flops(b, l, h, p, n, q, mode):
    """FLOPs of the chunk matmuls (see the module docstring): per token and head ``Q (n + p) + 4 p n``."""
    fwd = float(b * l * h) * (q * (n + p) + 4 * p * n)
    return fwd if mode == "fwd" else 3 * fwd


def ssd_rows(cfg: BenchConfig, interpret: bool, rng) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from kernels.ssd import ssd_chunked
    from mani_jax import core

    h, p, n, g, q = cfg.ssd_heads, cfg.ssd_head_dim, cfg.ssd_d_state, cfg.ssd_groups, cfg.ssd_chunk
    systems = {"ours": lambda *a, **k: ssd_chunked(*a, interpret=interpret, **k), "xla": core.ssd_chunked}
    rows = []
    for l in cfg.ssd_seqlens:
        b = max(1, cfg.ssd_tokens // l)
        bf = jnp.bfloat16
        x = jnp.asarray(rng.standard_normal((b, l, h, p)), bf)
        dt = jnp.asarray(np.log1p(np.exp(rng.standard_normal((b, l, h)) - 2.0)), jnp.float32)
        A = -jnp.asarray(rng.uniform(1.0, 16.0, (h,)), jnp.float32)
        B, C = (jnp.asarray(rng.standard_normal((b, l, g, n)) / math.sqrt(n), bf) for _ in range(2))
        D = jnp.ones((h,), jnp.float32)
        dy = jnp.asarray(rng.standard_normal((b, l, h, p)), bf)
        args = (x, dt, A, B, C, D)
        outs, grads = {}, {}
        for name in cfg.systems_ssd:
            f = systems[name]
            fwd = jax.jit(lambda x, dt, A, B, C, D, f=f: f(x, dt, A, B, C, chunk_size=q, D=D)[0])

            def fb(x, dt, A, B, C, D, dy, fwd=fwd):
                y, vjp = jax.vjp(fwd, x, dt, A, B, C, D)
                return vjp(dy)
            fwdbwd = jax.jit(fb)
            row = {"kernel": "ssd", "system": name, "seqlen": l, "batch": b, "heads": h, "head_dim": p,
                   "d_state": n, "chunk": q}
            try:
                outs[name] = fwd(*args)
                if l == min(cfg.ssd_seqlens):
                    grads[name] = fwdbwd(*args, dy)
                row["fwd_s"] = _median_time(fwd, args, cfg)
                row["fwdbwd_s"] = _median_time(fwdbwd, args + (dy,), cfg)
                row["fwd_tflops"] = ssd_flops(b, l, h, p, n, q, "fwd") / row["fwd_s"] / 1e12
                row["fwdbwd_tflops"] = ssd_flops(b, l, h, p, n, q, "fwdbwd") / row["fwdbwd_s"] / 1e12
                nbytes = x.nbytes * 2 + B.nbytes + C.nbytes + dt.nbytes
                row["fwd_gbps"] = nbytes / row["fwd_s"] / 1e9
            except Exception as e:  # recorded, the sweep goes on (e.g. the reference out of memory)
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            rows.append(row)
        if "ours" in outs and "xla" in outs:
            ours = next(r for r in rows if r["system"] == "ours" and r["seqlen"] == l)
            ours["max_rel_err_fwd"] = _err(outs["ours"], outs["xla"])
            if "ours" in grads and "xla" in grads:
                ours["max_rel_err_grads"] = max(_err(a, r) for a, r in zip(grads["ours"], grads["xla"]))
            bad = not ours["max_rel_err_fwd"] < 3e-2 or not ours.get("max_rel_err_grads", 0.0) < 6e-2
            if bad:
                ours["error"] = "output or gradients differ from the reference; timing not trusted"
            xla = next(r for r in rows if r["system"] == "xla" and r["seqlen"] == l)
            if ours.get("fwdbwd_s") and xla.get("fwdbwd_s"):
                ours["fwd_speedup_vs_xla"] = xla["fwd_s"] / ours["fwd_s"]
                ours["fwdbwd_speedup_vs_xla"] = xla["fwdbwd_s"] / ours["fwdbwd_s"]
    return rows


# --------------------------------------------------------------------------------------------- paged

def copy_bandwidth(cfg: BenchConfig) -> dict:
    """Device-to-device bandwidth of a jitted elementwise op (read + write) over ``copy_bytes``."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((cfg.copy_bytes // 2,), jnp.bfloat16)
    neg = jax.jit(lambda x: -x)
    t = _median_time(neg, (x,), cfg)
    return {"bytes": 2 * x.nbytes, "s": t, "gbps": 2 * x.nbytes / t / 1e9}


def _jax_paged_kernel(interpret: bool):
    import jax

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import paged_attention as jpa  # deprecated, may disappear
    if not interpret and jax.default_backend() != "gpu":
        raise RuntimeError("needs a GPU")
    return jpa.paged_attention


def paged_rows(cfg: BenchConfig, interpret: bool, rng) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from kernels.paged_attention import paged_attention
    from mani_jax import core
    from mani_jax.core.paged_attention import quantize_pages

    hq, hkv, d, ps = cfg.paged_q_heads, cfg.paged_kv_heads, cfg.paged_head_dim, cfg.page_size
    rows = []
    for b in cfg.paged_batches:
        for ctx in cfg.paged_contexts:
            kv_bytes = 2 * b * ctx * hkv * d * 2
            base = {"kernel": "paged", "batch": b, "context": ctx, "kv_bytes_bf16": kv_bytes}
            if kv_bytes > cfg.max_kv_gib * 2**30:
                rows += [{**base, "system": s, "skipped": f"K+V {kv_bytes / 2**30:.1f} GiB > max_kv_gib"}
                         for s in cfg.systems_paged]
                continue
            mp = ctx // ps
            n_pages = b * mp
            q = jnp.asarray(rng.standard_normal((b, hq, d)), jnp.bfloat16)
            k = jax.random.normal(jax.random.PRNGKey(b + ctx), (n_pages, ps, hkv, d), jnp.bfloat16)
            v = jax.random.normal(jax.random.PRNGKey(b + ctx + 1), (n_pages, ps, hkv, d), jnp.bfloat16)
            tables = jnp.asarray(rng.permutation(n_pages).reshape(b, mp), jnp.int32)
            lengths = jnp.full((b,), ctx, jnp.int32)
            # Reference on the first two rows only (the gather reference copies the whole cache).
            r2 = min(b, 2)
            ref = core.paged_attention(q[:r2].astype(jnp.float32), k, v, tables[:r2], lengths[:r2])
            for name in cfg.systems_paged:
                row = {**base, "system": name}
                try:
                    nbytes = kv_bytes
                    if name == "ours":
                        f = jax.jit(lambda q, k, v, t, l: paged_attention(q, k, v, t, l, interpret=interpret))
                        args = (q, k, v, tables, lengths)
                    elif name == "ours-int8":
                        (kq, ks), (vq, vs) = quantize_pages(k), quantize_pages(v)
                        f = jax.jit(lambda q, k, v, t, l, ks, vs: paged_attention(
                            q, k, v, t, l, k_scales=ks, v_scales=vs, interpret=interpret))
                        args = (q, kq, vq, tables, lengths, ks, vs)
                        nbytes = kv_bytes // 2
                    elif name == "xla":
                        f = jax.jit(core.paged_attention)
                        args = (q, k, v, tables, lengths)
                    elif name == "jax-pallas":
                        jpa = _jax_paged_kernel(interpret)
                        kt, vt = k.transpose(2, 0, 1, 3), v.transpose(2, 0, 1, 3)  # its [Hkv, P, ps, D] layout
                        ppcb = min(8, mp)
                        splits = max(1, min(16, mp // ppcb))
                        while mp % (splits * ppcb):
                            splits -= 1
                        # It applies no softmax scale: the query is pre-scaled (one tiny op, inside the timing).
                        f = jax.jit(lambda q, k, v, t, l: jpa(q * jnp.asarray(d ** -0.5, q.dtype), k, v, t, l,
                                                               pages_per_compute_block=ppcb, k_splits=splits,
                                                               interpret=interpret))
                        args = (q, kt, vt, tables, lengths)
                    else:
                        raise ValueError(f"unknown paged system {name!r}")
                    out = f(*args)
                    tol = 5e-2 if name == "ours-int8" else 2e-2
                    row["max_rel_err"] = _err(out[:r2], ref)
                    if not row["max_rel_err"] < tol:
                        raise RuntimeError(f"output differs from the reference (rel err {row['max_rel_err']:.3g})")
                    row["s"] = _median_time(f, args, cfg)
                    row["kv_bytes_read"] = nbytes
                    row["gbps"] = nbytes / row["s"] / 1e9
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                finally:  # drop this system's copies (int8 pages, transposed pages) before the next one
                    f = args = out = kq = vq = kt = vt = None
                rows.append(row)
            q = k = v = None
    return rows


# ----------------------------------------------------------------------------------------------- run

def run(cfg: BenchConfig, out: Path, *, preset: str, interpret: bool) -> dict:
    import jax

    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not (interpret and preset == "smoke"):
        raise SystemExit(f"experiments.kernels_bench: preset {preset!r} times the kernels and needs a CUDA GPU "
                         f"(jax.default_backend() is {jax.default_backend()!r}). On CPU run "
                         f"`python -m experiments.kernels_bench --interpret --preset smoke`, which checks the "
                         f"kernels in Pallas interpret mode at tiny sizes; timings need a GPU.")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.time()
    print(f"[kernels_bench] SSD: seqlen {cfg.ssd_seqlens}", flush=True)
    ssd = ssd_rows(cfg, interpret, rng)
    print(f"[kernels_bench] copy bandwidth baseline ({cfg.copy_bytes / 2**20:.0f} MiB)", flush=True)
    copy = copy_bandwidth(cfg)
    print(f"[kernels_bench] paged decode: batch {cfg.paged_batches} x context {cfg.paged_contexts}", flush=True)
    paged = paged_rows(cfg, interpret, rng)
    for r in paged:
        if r.get("gbps"):
            r["fraction_of_copy_bw"] = r["gbps"] / copy["gbps"]
    timed = on_gpu and not interpret
    summary = {"preset": preset, "interpret": interpret, "timed": timed, "config": dataclasses.asdict(cfg),
               "device": str(jax.devices()[0]), "device_kind": jax.devices()[0].device_kind,
               "jax_version": jax.__version__, "date": time.strftime("%Y-%m-%d"), "wall_s": time.time() - t0,
               "ssd": ssd, "copy": copy, "paged": paged}
    summary["targets"] = _targets(summary)
    summary["plot"] = _plot(summary, out)
    write_json_atomic(out / "summary.json", summary)
    _print_table(summary)
    return summary


def _targets(s: dict) -> dict:
    ssd = next((r for r in s["ssd"] if r["system"] == "ours" and r["seqlen"] == 4096), {})
    paged = next((r for r in s["paged"] if r["system"] == "ours" and r["batch"] == 64 and r["context"] == 8192), {})
    got = {"ssd_fwdbwd_speedup_4096": ssd.get("fwdbwd_speedup_vs_xla"),
           "paged_fraction_of_copy_bw_b64_ctx8192": paged.get("fraction_of_copy_bw")}
    return {k: {"measured": got[k] if s["timed"] else None, "target": v,
                "met": (got[k] >= v) if (s["timed"] and got[k] is not None) else None} for k, v in TARGETS.items()}


def _print_table(s: dict) -> None:
    print(f"\nkernels benchmark, {s['device']} ({s['date']}, jax {s['jax_version']}, preset {s['preset']}"
          f"{', interpret mode' if s['interpret'] else ''})")
    fmt = lambda x, w=9, p=2: f"{x:{w}.{p}f}" if isinstance(x, (int, float)) else f"{'-':>{w}}"
    hdr = f"{'SSD':<6}{'seqlen':>7}{'batch':>6}  {'fwd ms':>9}{'f+b ms':>9}{'fwd TF/s':>9}{'f+b TF/s':>9}{'f+b x':>7}  note"
    print(hdr + "\n" + "-" * len(hdr))
    for r in s["ssd"]:
        note = r.get("error") or (f"err fwd {r['max_rel_err_fwd']:.1e}" if "max_rel_err_fwd" in r else "")
        if "max_rel_err_grads" in r and not r.get("error"):
            note += f", grads {r['max_rel_err_grads']:.1e}"
        ms = lambda k: r[k] * 1e3 if k in r else None
        print(f"{r['system']:<6}{r['seqlen']:>7}{r['batch']:>6}  {fmt(ms('fwd_s'))}{fmt(ms('fwdbwd_s'))}"
              f"{fmt(r.get('fwd_tflops'))}{fmt(r.get('fwdbwd_tflops'))}{fmt(r.get('fwdbwd_speedup_vs_xla'), 7)}  {note}")
    print(f"\ncopy baseline: {s['copy']['gbps']:.1f} GB/s (read + write of {s['copy']['bytes'] / 2**20:.0f} MiB)")
    hdr = f"{'paged':<11}{'batch':>6}{'ctx':>7}  {'us':>10}{'GB/s':>9}{'of copy':>8}  note"
    print(hdr + "\n" + "-" * len(hdr))
    for r in s["paged"]:
        note = r.get("skipped") or r.get("error") or (f"err {r['max_rel_err']:.1e}" if "max_rel_err" in r else "")
        print(f"{r['system']:<11}{r['batch']:>6}{r['context']:>7}  {fmt(r['s'] * 1e6 if 's' in r else None, 10, 1)}"
              f"{fmt(r.get('gbps'), 9, 1)}{fmt(r.get('fraction_of_copy_bw'), 8)}  {note}")
    if not s["timed"]:
        print("\nInterpret mode / no GPU: correctness and plumbing only, the times are not kernel timings.")
    for k, v in s["targets"].items():
        print(f"  target {k}: measured {v['measured']}, target {v['target']}, met {v['met']}")


def _plot(s: dict, out: Path) -> str:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    for ax, key, title in ((axes[0][0], "fwd_s", "SSD forward (ms)"), (axes[0][1], "fwdbwd_s", "SSD fwd+bwd (ms)")):
        for name in s["config"]["systems_ssd"]:
            pts = [(r["seqlen"], r[key] * 1e3) for r in s["ssd"] if r["system"] == name and key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("seqlen (batch x seqlen fixed)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    ax = axes[1][0]
    for name in s["config"]["systems_paged"]:
        for b in s["config"]["paged_batches"]:
            pts = [(r["context"], r["gbps"]) for r in s["paged"] if r["system"] == name and r["batch"] == b
                   and r.get("gbps")]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{name} B={b}")
    ax.axhline(s["copy"]["gbps"], color="k", ls="--", lw=1, label="d2d copy")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context")
    ax.set_title("paged decode: K+V bytes / time (GB/s)")
    ax.legend(fontsize=6, ncol=2)
    ax = axes[1][1]
    ctx = 8192 if 8192 in s["config"]["paged_contexts"] else max(s["config"]["paged_contexts"])
    for name in s["config"]["systems_paged"]:
        pts = [(r["batch"], r["gbps"]) for r in s["paged"] if r["system"] == name and r["context"] == ctx
               and r.get("gbps")]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.axhline(s["copy"]["gbps"], color="k", ls="--", lw=1, label="d2d copy")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_title(f"paged decode GB/s at context {ctx}")
    ax.legend(fontsize=7)
    fig.suptitle(f"Pallas kernels, {s['device_kind']} ({s['date']})"
                 + ("" if s["timed"] else " - interpret mode, NOT timings"))
    fig.tight_layout()
    save_figure(fig, out / "kernels_bench.png", bbox_inches="tight")
    return "kernels_bench.png"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.kernels_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="default", help=f"one of {sorted(PRESETS)}")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/kernels_bench-<preset>)")
    p.add_argument("--interpret", action="store_true", help="run the Pallas kernels in interpret mode (CPU)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    cfg = apply_overrides(get_preset(PRESETS, args.preset, "benchmark preset"), args.overrides)
    out = args.out or Path("runs") / f"kernels_bench-{args.preset}"
    return run(cfg, out, preset=args.preset, interpret=args.interpret)


if __name__ == "__main__":
    main()
