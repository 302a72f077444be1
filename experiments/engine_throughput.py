"""Engine throughput and latency on this CPU: one request at a time vs continuous batching vs prefix caching
vs llama.cpp, on real prompts from the held-out Shakespeare plays.

    python -m experiments.engine_throughput                       # the `tiny` Chimera, 16 concurrent requests
    python -m experiments.engine_throughput --preset smoke        # seconds; used by the tests
    python -m experiments.engine_throughput --checkpoint runs/chimera-tiny   # a trained run's weights

Two workloads, ``n_requests`` requests all arriving at t = 0, greedy, ``max_new_tokens`` each, no stop token
(so every system generates the same number of tokens):

* **mixed**: prompts of mixed lengths cut from the held-out plays;
* **shared prefix**: one long passage (``prefix_tokens``) followed by a distinct short question per request,
  after one earlier request with the same passage (a reused system prompt).

Systems, all in the same run: (a) the plain cached decode loop (:func:`mani_jax.inference.generate`), one
request after another; (b) the :class:`~mani_jax.inference.engine.Engine` without and (c) with prefix
caching; (d) llama-cpp-python on the model's F16 GGUF, one request after another (its own prompt cache
reuses the previous request's matching prefix). Every system runs the workload once untimed first, so
compilation is not timed. Metrics: generated tokens/s (all generated tokens / wall time of the workload),
time to first token and inter-token latency (median and p90 over requests / token gaps), measured from the
workload start. Writes ``results.json`` and ``engine_throughput.png`` in ``RUN_DIR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.common import default_cache_dir, load_run, prepare_corpus, write_json_atomic
from mani_jax.config import apply_overrides, get_preset
from mani_jax.train.metrics import save_figure


@dataclass(frozen=True)
class EngineBenchConfig:
    """One benchmark run. ``model_preset``: a :data:`mani_jax.models.PRESETS` name (random weights unless
    ``--checkpoint`` gives a trained run directory)."""

    model_preset: str = "tiny"
    n_requests: int = 16
    max_batch: int = 16
    min_prompt: int = 16
    max_prompt: int = 160
    max_new_tokens: int = 48
    prefix_tokens: int = 160
    suffix_tokens: int = 12
    page_size: int = 16
    prefill_budget: int = 128
    llama_cpp: bool = True
    seed: int = 0


PRESETS = {
    "smoke": EngineBenchConfig(model_preset="smoke", n_requests=4, max_batch=4, min_prompt=8, max_prompt=40,
                               max_new_tokens=8, prefix_tokens=48, suffix_tokens=6, page_size=8, prefill_budget=32),
    "default": EngineBenchConfig(),
}


def _stats(values: list[float]) -> dict:
    if not values:
        return {"median": None, "p90": None}
    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90))}


def _summarise(name: str, t0: float, first: list[float], times: list[list[float]], wall: float) -> dict:
    n_tok = sum(len(t) for t in times)
    gaps = [b - a for t in times for a, b in zip(t, t[1:])]
    return {"system": name, "generated_tokens": n_tok, "wall_seconds": wall, "tokens_per_second": n_tok / wall,
            "ttft_s": _stats([f - t0 for f in first]), "itl_s": _stats(gaps)}


def run_plain(model, prompts, n_new, cache_len) -> tuple[list[list[int]], dict]:
    from mani_jax.inference import generate

    t0 = time.perf_counter()
    outs, first, times = [], [], []
    for p in prompts:
        ts: list[float] = []
        outs.append(generate(model, p, n_new, temperature=0.0, cache_len=cache_len,
                             on_token=lambda _: ts.append(time.perf_counter())))
        first.append(ts[0])
        times.append(ts)
    return outs, _summarise("plain loop, one at a time", t0, first, times, time.perf_counter() - t0)


def run_engine(model, prompts, n_new, cfg: EngineBenchConfig, prefix_caching: bool, warm_prompts=()):
    from mani_jax.inference.engine import Engine, SamplingParams

    eng = Engine(model, max_batch=cfg.max_batch, page_size=cfg.page_size, prefill_budget=cfg.prefill_budget,
                 prefix_caching=prefix_caching, max_seq_len=model.config.max_seq_len)
    sp = SamplingParams(max_new_tokens=n_new)
    eng.warmup()  # compile every prefill chunk length, decode and sampling program
    eng.generate(prompts, sp)  # an untimed pass as for the other systems
    eng.reset()  # empty caches and prefix cache, compiled programs kept
    if warm_prompts:
        eng.generate(warm_prompts, sp)
    hits_before = eng.pool.stats["hit_tokens"]
    queried_before = eng.pool.stats["query_tokens"]
    t0 = time.perf_counter()
    ids = [eng.add_request(p, sp) for p in prompts]
    for r in (eng.requests[i] for i in ids):
        r.arrival_time = t0
    eng.run()
    wall = time.perf_counter() - t0
    reqs = [eng.requests[i] for i in ids]
    name = "engine + prefix cache" if prefix_caching else "engine"
    res = _summarise(name, t0, [r.first_token_time for r in reqs], [r.token_times for r in reqs], wall)
    q = eng.pool.stats["query_tokens"] - queried_before
    res["prefix_hit_rate"] = (eng.pool.stats["hit_tokens"] - hits_before) / q if q else 0.0
    res["n_programs"] = eng.n_programs
    res["steps"] = eng.n_steps
    return [r.tokens for r in reqs], res


def run_llama_cpp(gguf_path, prompts, n_new, n_ctx) -> tuple[list[list[int]], dict]:
    from mani_jax.export.parity import open_llama

    with open_llama(gguf_path, n_ctx=n_ctx, logits_all=False, kv_cache_f32=False) as llm:
        def one(p, ts):
            out = []
            for tok in llm.generate(p, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
                out.append(int(tok))
                ts.append(time.perf_counter())
                if len(out) >= n_new:
                    break
            return out

        for p in prompts:
            one(p, [])  # untimed pass, as for the other systems
        t0 = time.perf_counter()
        outs, first, times = [], [], []
        for p in prompts:
            ts: list[float] = []
            outs.append(one(p, ts))
            first.append(ts[0])
            times.append(ts)
        return outs, _summarise("llama.cpp F16, one at a time", t0, first, times, time.perf_counter() - t0)


def run(cfg: EngineBenchConfig, out: Path, *, preset: str, checkpoint: Path | None = None,
        cache_dir: Path | None = None) -> dict:
    import jax
    from flax import nnx

    from mani_jax.models import HybridLM, get_config

    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir or default_cache_dir())
    if checkpoint is not None:
        model, tokenizer = load_run(checkpoint)
        model_cfg = model.config
        _, _, _, val_docs = prepare_corpus("shakespeare", model_cfg.vocab_size, out, cache_dir, tag="engine_bench")
    else:
        model_cfg = get_config(cfg.model_preset)
        model = HybridLM(model_cfg, rngs=nnx.Rngs(cfg.seed))
        _, tokenizer, _, val_docs = prepare_corpus("shakespeare", model_cfg.vocab_size, out, cache_dir,
                                                   tag="engine_bench")
    rng = np.random.default_rng(cfg.seed)
    text = np.concatenate(val_docs)
    n_new = cfg.max_new_tokens
    limit = model_cfg.max_seq_len - n_new

    def cut(n):
        s = int(rng.integers(0, len(text) - n))
        return [tokenizer.bos_id] + [int(t) for t in text[s:s + n - 1]]

    mixed = [cut(int(rng.integers(cfg.min_prompt, min(cfg.max_prompt, limit) + 1))) for _ in range(cfg.n_requests)]
    prefix = cut(min(cfg.prefix_tokens, limit - cfg.suffix_tokens))
    shared = [prefix + [int(t) for t in text[s:s + cfg.suffix_tokens]]
              for s in rng.integers(0, len(text) - cfg.suffix_tokens, cfg.n_requests)]
    warm = [prefix + [int(t) for t in text[:cfg.suffix_tokens]]]
    print(f"[engine_bench] {cfg.model_preset}: layers {''.join(t[0].upper() for t in model_cfg.layer_types)}, "
          f"{cfg.n_requests} requests x {n_new} new tokens, max_batch {cfg.max_batch}", flush=True)

    results = {"mixed": [], "shared_prefix": []}
    outputs = {}
    for wname, prompts in (("mixed", mixed), ("shared_prefix", shared)):
        print(f"[engine_bench] workload {wname}", flush=True)
        run_plain(model, prompts, n_new, model_cfg.max_seq_len)  # untimed: compiles each prompt length
        o_plain, r = run_plain(model, prompts, n_new, model_cfg.max_seq_len)
        results[wname].append(r)
        o_eng, r = run_engine(model, prompts, n_new, cfg, prefix_caching=False)
        results[wname].append(r)
        o_pc, r = run_engine(model, prompts, n_new, cfg, prefix_caching=True,
                             warm_prompts=warm if wname == "shared_prefix" else ())
        results[wname].append(r)
        outputs[wname] = {"plain_equals_engine": o_plain == o_eng, "plain_equals_prefix_cache": o_plain == o_pc}
        for row in results[wname]:
            print(f"  {row['system']:<30} {row['tokens_per_second']:9.1f} tok/s  TTFT median "
                  f"{row['ttft_s']['median']:.3f} s  ITL median {row['itl_s']['median'] * 1e3:.1f} ms", flush=True)

    if cfg.llama_cpp:
        from mani_jax.export import export_gguf
        gguf = out / f"{cfg.model_preset}-f16.gguf"
        export_gguf(model, tokenizer, gguf, quant="f16", name=f"engine-bench-{cfg.model_preset}")
        for wname, prompts in (("mixed", mixed), ("shared_prefix", shared)):
            o_ll, r = run_llama_cpp(gguf, prompts, n_new, model_cfg.max_seq_len)
            results[wname].append(r)
            print(f"  [{wname}] {r['system']:<30} {r['tokens_per_second']:9.1f} tok/s  TTFT median "
                  f"{r['ttft_s']['median']:.3f} s", flush=True)

    def speed(w, a, b):
        rows = {r["system"]: r for r in results[w]}
        return rows[a]["tokens_per_second"] / rows[b]["tokens_per_second"]

    def ttft(w, a, b):
        rows = {r["system"]: r for r in results[w]}
        return rows[b]["ttft_s"]["median"] / rows[a]["ttft_s"]["median"]

    summary = {
        "preset": preset, "config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(model_cfg),
        "checkpoint": str(checkpoint) if checkpoint else None, "results": results, "outputs_agree": outputs,
        "engine_speedup_vs_plain": speed("mixed", "engine", "plain loop, one at a time"),
        "prefix_cache_ttft_reduction": ttft("shared_prefix", "engine + prefix cache", "engine"),
        "device": str(jax.devices()[0]), "jax_version": jax.__version__,
    }
    summary["plot"] = _plot(summary, out)
    write_json_atomic(out / "results.json", summary)
    print(f"\n  engine vs one-at-a-time (mixed): {summary['engine_speedup_vs_plain']:.2f}x tokens/s; prefix cache "
          f"cuts median TTFT {summary['prefix_cache_ttft_reduction']:.2f}x (shared prefix); outputs agree: {outputs}")
    return summary


def _plot(s: dict, out: Path) -> str:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, label) in zip(axes, (("tokens_per_second", "generated tokens/s"), ("ttft", "median TTFT (s)"),
                                       ("itl", "median inter-token latency (ms)"))):
        for i, w in enumerate(("mixed", "shared_prefix")):
            rows = s["results"][w]
            vals = [r["tokens_per_second"] if key == "tokens_per_second" else
                    r["ttft_s"]["median"] if key == "ttft" else r["itl_s"]["median"] * 1e3 for r in rows]
            x = np.arange(len(rows)) + 0.4 * i
            ax.bar(x, vals, width=0.4, label=w)
            ax.set_xticks(np.arange(len(rows)) + 0.2, [r["system"] for r in rows], rotation=25, ha="right", fontsize=8)
        ax.set_title(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"engine benchmark ({s['config']['model_preset']}, {s['config']['n_requests']} requests, {s['device']})")
    save_figure(fig, out / "engine_throughput.png", bbox_inches="tight")
    return "engine_throughput.png"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.engine_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="default", help=f"one of {sorted(PRESETS)}")
    p.add_argument("--checkpoint", type=Path, default=None, help="a chimera run directory to load weights from")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/engine_throughput-<preset>)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    cfg = apply_overrides(get_preset(PRESETS, args.preset, "benchmark preset"), args.overrides)
    out = args.out or Path("runs") / f"engine_throughput-{args.preset}"
    return run(cfg, out, preset=args.preset, checkpoint=args.checkpoint, cache_dir=args.cache_dir)


if __name__ == "__main__":
    main()
