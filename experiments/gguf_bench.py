"""GGUF on the CPU: file size, time to first token and decode speed in llama.cpp, per quantization.

    python -m experiments.gguf_bench                      # chimera-700m (random init): f16, q4_0, q4_k_m
    python -m experiments.gguf_bench --preset smoke       # the 1M-parameter smoke model, seconds

Speed does not depend on the weights' values, so the model is randomly initialised (no training needed);
the vocabulary is a placeholder of the model's size. For each quantization the model is exported, loaded
by llama-cpp-python (2 threads, llama.cpp's default F16 KV cache), warmed up, then timed ``--repeats``
times from an empty context: time to first token for a ``--prompt-tokens`` prompt (prompt pass + first
sample) and decode tokens/s over ``--decode-tokens`` greedy tokens. Writes ``RUN_DIR/summary.json`` and
``RUN_DIR/gguf_bench.png``, prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mani_jax.config import apply_overrides, get_preset
from mani_jax.train.metrics import save_figure


@dataclass(frozen=True)
class BenchConfig:
    model_preset: str = "chimera-700m"
    quants: tuple[str, ...] = ("f16", "q4_0", "q4_k_m")
    prompt_tokens: int = 128
    decode_tokens: int = 32
    repeats: int = 3
    n_threads: int = 2
    seed: int = 0


PRESETS = {
    "chimera-700m": BenchConfig(),
    "smoke": BenchConfig(model_preset="smoke", prompt_tokens=64, decode_tokens=16),
}


def run(cfg: BenchConfig, out: Path, *, preset: str) -> dict:
    import jax
    from flax import nnx

    from mani_jax.export import export_gguf
    from mani_jax.export.parity import llama_cpp_greedy, open_llama
    from mani_jax.models import HybridLM, count_params, get_config

    out.mkdir(parents=True, exist_ok=True)
    model_cfg = get_config(cfg.model_preset)
    n_params = count_params(model_cfg)
    print(f"[gguf_bench] {cfg.model_preset}: {n_params:,} parameters (random init)", flush=True)
    t0 = time.perf_counter()
    model = HybridLM(model_cfg, rngs=nnx.Rngs(cfg.seed))
    init_s = time.perf_counter() - t0
    rng = np.random.default_rng(cfg.seed)
    prompt = [1] + [int(t) for t in rng.integers(8, model_cfg.vocab_size, cfg.prompt_tokens - 1)]
    rows = []
    for quant in cfg.quants:
        path = out / f"{cfg.model_preset}-{quant}.gguf"
        t0 = time.perf_counter()
        export_gguf(model, None, path, quant=quant, name=cfg.model_preset)
        export_s = time.perf_counter() - t0
        ttfts, decodes = [], []
        with open_llama(path, n_ctx=cfg.prompt_tokens + cfg.decode_tokens + 8, n_threads=cfg.n_threads,
                        logits_all=False, kv_cache_f32=False) as llm:
            llama_cpp_greedy(llm, prompt[:8], 2)  # warm-up: thread pool, graph allocation
            for _ in range(cfg.repeats):
                toks, ttft, decode_s = llama_cpp_greedy(llm, prompt, cfg.decode_tokens)
                ttfts.append(ttft)
                decodes.append((len(toks) - 1) / decode_s)
        row = {"quant": quant, "path": path.name, "size_bytes": path.stat().st_size, "export_seconds": export_s,
               "time_to_first_token_s": statistics.median(ttfts), "time_to_first_token_all_s": ttfts,
               "prompt_tokens_per_second": cfg.prompt_tokens / statistics.median(ttfts),
               "decode_tokens_per_second": statistics.median(decodes), "decode_tokens_per_second_all": decodes}
        rows.append(row)
        print(f"[gguf_bench] {quant}: {row['size_bytes'] / 2**20:.1f} MiB, TTFT {row['time_to_first_token_s']:.3f} s, "
              f"decode {row['decode_tokens_per_second']:.1f} tok/s", flush=True)
    summary = {"preset": preset, "model_preset": cfg.model_preset, "params": n_params, "init_seconds": init_s,
               "prompt_tokens": cfg.prompt_tokens, "decode_tokens": cfg.decode_tokens, "repeats": cfg.repeats,
               "n_threads": cfg.n_threads, "device": "cpu", "jax_version": jax.__version__, "results": rows}
    _plot(rows, out / "gguf_bench.png", cfg)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "summary.json")
    print(f"\n  {'quant':<8} {'MiB':>9} {'TTFT s':>8} {'prompt tok/s':>13} {'decode tok/s':>13}")
    for r in rows:
        print(f"  {r['quant']:<8} {r['size_bytes'] / 2**20:9.1f} {r['time_to_first_token_s']:8.3f} "
              f"{r['prompt_tokens_per_second']:13.1f} {r['decode_tokens_per_second']:13.1f}")
    return summary


def _plot(rows: list[dict], path: Path, cfg: BenchConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    names = [r["quant"] for r in rows]
    for ax, key, label in zip(axes, ("size_bytes", "time_to_first_token_s", "decode_tokens_per_second"),
                              ("file size (MiB)", f"time to first token, {cfg.prompt_tokens}-token prompt (s)",
                               "decode (tokens/s)")):
        vals = [r[key] / 2**20 if key == "size_bytes" else r[key] for r in rows]
        ax.bar(names, vals, color="tab:blue")
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"{cfg.model_preset} in llama.cpp on the CPU ({cfg.n_threads} threads)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.gguf_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="chimera-700m", help=f"one of {sorted(PRESETS)}")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/gguf_bench-<preset>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. quants=q4_0,q8_0 or prompt_tokens=256")
    args = p.parse_args(argv)
    cfg = apply_overrides(get_preset(PRESETS, args.preset, "benchmark preset"), args.overrides)
    return run(cfg, args.out or Path("runs") / f"gguf_bench-{args.preset}", preset=args.preset)


if __name__ == "__main__":
    main()
