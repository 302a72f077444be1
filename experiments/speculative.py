"""Speculative decoding on this CPU: a trained draft/target pair, prompt lookup, and the cost model.

    python -m experiments.chimera --preset smoke --steps 300 --set model.vocab_size=2048 \
        --set model.max_seq_len=256 --set gguf_quants= --out runs/draft
    python -m experiments.speculative --target runs/chimera-tiny --draft runs/draft
    python -m experiments.speculative --preset smoke        # random small models; seconds; used by the tests

For every held-out prompt (a passage cut from the held-out plays) it decodes ``max_new_tokens`` tokens with
the target alone (:func:`mani_jax.inference.generate`), with the draft proposing ``gamma`` tokens per round
for each gamma, and with prompt lookup, greedy and sampled; every system runs once untimed first (compiles).
It measures the acceptance rate ``a``, tokens per target call, tokens/s and the speed-up over target-only,
and the cost ratio ``c`` = (draft decode step time) / (target decode step time), from which Leviathan et
al.'s expected speed-up ``(1 - a^(g+1)) / ((1 - a)(g c + 1))`` is computed for comparison. An
input-grounded workload (the prompt contains a passage and then starts repeating it) shows what prompt
lookup can do when the continuation is in the context. The engine rows decode all prompts together
(continuous batching) without a draft, with the draft and with prompt lookup. Part (b)
(:func:`mission_scale_costs`) times Qwen2.5-0.5B- and 3B-shaped random models on this CPU for the cost ratio
``c`` and the verify-pass cost, and predicts the speed-up over a grid of acceptance rates. Writes
``results.json`` and ``speculative.png``.
Greedy outputs are checked token for token against target-only decoding.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.common import default_cache_dir, load_run, prepare_corpus, write_json_atomic
from mani_jax.config import apply_overrides, get_preset
from mani_jax.train.metrics import save_figure


@dataclass(frozen=True)
class SpecBenchConfig:
    n_prompts: int = 6
    prompt_tokens: int = 64
    max_new_tokens: int = 64
    gammas: tuple[int, ...] = (2, 4, 6)
    temperature: float = 0.8
    n_gram: int = 3
    seed: int = 0
    engine_gamma: int = 4  # the engine rows (continuous batching over all prompts at once)
    engine_temperatures: tuple[float, ...] = (0.0, 0.8)
    mission_scale: bool = True  # part (b): Qwen2.5-0.5B / 3B-shaped random models, cost ratio on this CPU
    mission_steps: int = 5


PRESETS = {
    "smoke": SpecBenchConfig(n_prompts=2, prompt_tokens=16, max_new_tokens=12, gammas=(2,), engine_gamma=2,
                             engine_temperatures=(0.0,), mission_scale=False),
    "default": SpecBenchConfig(),
}

#: config.json fields of Qwen/Qwen2.5-0.5B and Qwen/Qwen2.5-3B (the mission's draft / verifier pair).
QWEN25 = {
    "0.5B": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 1000000.0,
             "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
    "3B": {"model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
           "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 1000000.0,
           "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
}


def _verify_time(model, n_tokens: int, context: int = 128, n: int = 5) -> float:
    """Median seconds of one jitted cached forward of ``n_tokens`` tokens after ``context`` cached ones
    (what a verification pass of gamma + 1 tokens costs)."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    g, s = nnx.split(model)

    @functools.partial(jax.jit, donate_argnums=1)
    def fwd(state, cache, tokens):
        return nnx.merge(g, state).prefill(tokens, cache)

    times = []
    for i in range(n + 1):
        cache = model.init_cache(1, context + n_tokens)
        _, cache = fwd(s, cache, jnp.zeros((1, context), jnp.int32)) if context else (None, cache)
        t0 = time.perf_counter()
        logits, cache = fwd(s, cache, jnp.zeros((1, n_tokens), jnp.int32))
        jax.block_until_ready(logits)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _random_model(cfg, seed: int = 0):
    """A model with random weights built one parameter at a time (``nnx`` init would materialise float32
    temporaries for a 3B model); the values do not change the compute cost."""
    import jax.numpy as jnp

    from mani_jax.models.hybrid import abstract_params, assemble_model

    rng = np.random.default_rng(seed)
    abstract, flat = abstract_params(cfg)
    for var in flat.values():
        arr = rng.standard_normal(var.shape, dtype=np.float32)
        arr *= 0.02
        var.set_value(jnp.asarray(arr, var.dtype))
        del arr
    return assemble_model(abstract, flat)


def mission_scale_costs(cfg: SpecBenchConfig, gammas=(1, 2, 4, 8), accept_rates=(0.3, 0.5, 0.7, 0.9)) -> dict:
    """Part (b): the cost side at the mission's scale. Qwen2.5-0.5B- and 3B-shaped models with random bf16
    weights (compute cost does not depend on the values) are timed on this CPU: one decode step of each
    (``c`` = draft step / target step), and the target's cached forward over gamma + 1 tokens (the verify
    pass, which on a CPU is not free as the formula assumes). Predicted speed-ups: Leviathan's
    ``(1 - a^(g+1)) / ((1 - a)(g c + 1))`` and the same expected tokens over the measured round cost
    ``g * t_draft + t_verify(g + 1)``, for a grid of acceptance rates."""
    import gc

    import jax
    from flax import nnx

    from mani_jax.models import count_params
    from mani_jax.models.hf import config_from_hf

    out = {"models": {}, "step_seconds": {}, "verify_seconds": {}}
    for name, hf in QWEN25.items():
        mcfg = dataclasses.replace(config_from_hf(hf, max_seq_len=256), param_dtype="bfloat16")
        print(f"  building a random Qwen2.5-{name}-shaped model ({count_params(mcfg) / 1e9:.2f}B params, bf16)",
              flush=True)
        model = _random_model(mcfg)
        out["models"][name] = {"params": count_params(mcfg), "d_model": mcfg.d_model, "n_layers": mcfg.n_layers}
        out["step_seconds"][name] = _step_time(model, n=cfg.mission_steps)
        print(f"    decode step {out['step_seconds'][name] * 1e3:.0f} ms", flush=True)
        if name == "3B":
            for g in gammas:
                out["verify_seconds"][g] = _verify_time(model, g + 1, n=max(2, cfg.mission_steps // 2))
                print(f"    verify pass of {g + 1} tokens {out['verify_seconds'][g] * 1e3:.0f} ms", flush=True)
        del model
        gc.collect()
        jax.clear_caches()
    t_d, t_t = out["step_seconds"]["0.5B"], out["step_seconds"]["3B"]
    c = t_d / t_t
    out["cost_ratio_c"] = c
    out["predicted"] = []
    for a in accept_rates:
        for g in gammas:
            tokens = (1 - a ** (g + 1)) / (1 - a)
            out["predicted"].append({"acceptance_rate": a, "gamma": g, "formula_speedup": expected_speedup(a, g, c),
                                     "measured_cost_speedup": tokens * t_t / (g * t_d + out["verify_seconds"][g])})
    best = max(out["predicted"], key=lambda r: r["measured_cost_speedup"])
    print(f"  c = {c:.3f}; best predicted with measured costs: {best['measured_cost_speedup']:.2f}x at "
          f"a={best['acceptance_rate']}, g={best['gamma']}", flush=True)
    return out


def _step_time(model, n: int = 20) -> float:
    """Median seconds of one jitted decode step (batch 1, cache of max_seq_len)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mani_jax.inference.speculative import _decode_logits
    g, s = nnx.split(model)
    cache = model.init_cache(1, model.config.max_seq_len)
    tok = jnp.zeros((1,), jnp.int32)
    for _ in range(3):
        logits, cache = _decode_logits(g, s, tok, cache)
    jax.block_until_ready(logits)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        logits, cache = _decode_logits(g, s, tok, cache)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def expected_speedup(a: float, gamma: int, c: float) -> float:
    """Leviathan et al. 2023, eq. 1 / Thm. 3.8: expected tokens per round over its cost in target calls."""
    if a >= 1.0:
        return (gamma + 1) / (gamma * c + 1)
    return (1 - a ** (gamma + 1)) / ((1 - a) * (gamma * c + 1))


def run(cfg: SpecBenchConfig, out: Path, *, preset: str, target_dir: Path | None, draft_dir: Path | None,
        cache_dir: Path | None = None) -> dict:
    import jax
    from flax import nnx

    from mani_jax.inference import generate
    from mani_jax.inference.speculative import speculative_generate
    from mani_jax.models import HybridLM, count_params, get_config

    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir or default_cache_dir())
    if target_dir is not None:
        target, tokenizer = load_run(target_dir)
        draft = load_run(draft_dir)[0] if draft_dir is not None else None
    else:  # random weights: the smoke test of the pipeline (acceptance is meaningless here)
        target = HybridLM(get_config("smoke"), rngs=nnx.Rngs(0))
        draft = HybridLM(get_config("smoke", {"n_layers": 2}), rngs=nnx.Rngs(1))
        tokenizer = None
    vocab = target.config.vocab_size
    corpus_tok = prepare_corpus("shakespeare", vocab, out, cache_dir, tag="speculative")
    tokenizer = tokenizer or corpus_tok[1]
    val_docs = corpus_tok[3]
    text = np.concatenate(val_docs)
    rng = np.random.default_rng(cfg.seed)
    n, m = cfg.prompt_tokens, cfg.max_new_tokens
    starts = rng.integers(0, len(text) - 2 * n, cfg.n_prompts)
    prompts = [[tokenizer.bos_id] + [int(t) for t in text[s:s + n - 1]] for s in starts]
    # Input-grounded: a passage, a blank line, then its first quarter again (the rest is in the context).
    grounded = [p + [int(t) for t in text[s:s + n // 4]] for p, s in zip(prompts, starts)]

    def timed(fn, prompt_set):
        for p in prompt_set:
            fn(p)  # untimed: compile every shape
        t0 = time.perf_counter()
        outs = [fn(p) for p in prompt_set]
        return outs, time.perf_counter() - t0

    results = []
    c = _step_time(draft) / _step_time(target) if draft is not None else None
    for temp in (0.0, cfg.temperature):
        sp = dict(temperature=temp, top_k=0, top_p=1.0)
        for wname, ps in (("held-out", prompts), ("input-grounded", grounded)):
            base, t_base = timed(lambda p: generate(target, p, m, seed=1, **sp), ps)
            n_tok = sum(len(o) for o in base)
            results.append({"workload": wname, "temperature": temp, "system": "target only", "gamma": 0,
                            "tokens_per_second": n_tok / t_base, "speedup": 1.0, "acceptance_rate": None,
                            "tokens_per_target_call": 1.0, "greedy_equal": True})
            systems = [("prompt lookup", None, 4)] + ([("draft", draft, g) for g in cfg.gammas] if draft else [])
            for name, dm, g in systems:
                res, t = timed(lambda p: speculative_generate(target, p, m, draft=dm, gamma=g, n_gram=cfg.n_gram,
                                                              seed=1, **sp), ps)
                toks = [r[0] for r in res]
                drafted = sum(r[1]["drafted"] for r in res)
                calls = sum(r[1]["target_calls"] for r in res)
                a = sum(r[1]["accepted"] for r in res) / drafted if drafted else 0.0
                row = {"workload": wname, "temperature": temp, "system": name, "gamma": g,
                       "tokens_per_second": sum(len(x) for x in toks) / t, "acceptance_rate": a,
                       "tokens_per_target_call": sum(len(x) for x in toks) / calls,
                       "greedy_equal": toks == base if temp == 0 else None}
                row["speedup"] = row["tokens_per_second"] / (n_tok / t_base)
                if name == "draft":
                    row["predicted_speedup"] = expected_speedup(a, g, c)
                results.append(row)
                print(f"  {wname:<15} T={temp:<4} {name:<14} g={g} a={a:.3f} tok/call="
                      f"{row['tokens_per_target_call']:.2f} speed-up {row['speedup']:.2f}x"
                      + (f" (predicted {row['predicted_speedup']:.2f}x)" if "predicted_speedup" in row else "")
                      + (f" greedy equal: {row['greedy_equal']}" if temp == 0 else ""), flush=True)
    # The engine: every prompt at once (continuous batching), target only vs draft vs prompt lookup.
    from mani_jax.inference.engine import Engine, SamplingParams

    for temp in cfg.engine_temperatures:
        base_tps = None
        for name, d in (("engine", None), ("engine + draft", draft), ("engine + prompt lookup", "ngram")):
            if name == "engine + draft" and draft is None:
                continue
            eng = Engine(target, max_batch=len(prompts), page_size=16, prefill_budget=64, draft=d,
                         gamma=cfg.engine_gamma, max_seq_len=n + m + 16)
            sps = [SamplingParams(temperature=temp, seed=i, max_new_tokens=m) for i in range(len(prompts))]
            eng.generate(prompts, sps)  # untimed: compile the remaining programs
            eng.reset()
            t0 = time.perf_counter()
            outs = eng.generate(prompts, sps)
            tps = sum(len(o) for o in outs) / (time.perf_counter() - t0)
            base_tps = base_tps or tps
            row = {"workload": "held-out", "temperature": temp, "system": name,
                   "gamma": cfg.engine_gamma if d is not None else 0, "tokens_per_second": tps,
                   "speedup": tps / base_tps, "acceptance_rate": eng.acceptance_rate if d is not None else None,
                   "batch": len(prompts)}
            if temp == 0:
                row["greedy_equal"] = outs == [list(map(int, r)) for r in
                                               [generate(target, p, m, temperature=0.0) for p in prompts]]
            results.append(row)
            print(f"  held-out        T={temp:<4} {name:<22} batch {len(prompts)} {tps:7.1f} tok/s "
                  f"speed-up {row['speedup']:.2f}x" + (f" a={row['acceptance_rate']:.3f}" if d is not None else "")
                  + (f" greedy equal: {row['greedy_equal']}" if temp == 0 else ""), flush=True)
    mission = mission_scale_costs(cfg) if cfg.mission_scale else None
    summary = {"preset": preset, "config": dataclasses.asdict(cfg), "target": str(target_dir), "mission_scale": mission,
               "draft": str(draft_dir), "target_params": count_params(target.config),
               "draft_params": count_params(draft.config) if draft else None,
               "cost_ratio_c": c, "results": results, "device": str(jax.devices()[0]),
               "jax_version": jax.__version__}
    summary["plot"] = _plot(summary, out)
    write_json_atomic(out / "results.json", summary)
    return summary


def _plot(s, out: Path) -> str:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = [r for r in s["results"] if r["system"] not in ("target only", "engine")]
    fig, ax = plt.subplots(figsize=(10, 4))
    labels = [f"{r['workload']}\nT={r['temperature']} {r['system']} g={r['gamma']}" for r in rows]
    ax.bar(range(len(rows)), [r["speedup"] for r in rows])
    ax.axhline(1.0, color="gray", ls=":")
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("tokens/s over target-only")
    ax.set_title(f"speculative decoding on {s['device']} (c = {s['cost_ratio_c'] or float('nan'):.2f})")
    save_figure(fig, out / "speculative.png", bbox_inches="tight")
    return "speculative.png"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.speculative", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="default", help=f"one of {sorted(PRESETS)}")
    p.add_argument("--target", type=Path, default=None, help="chimera run directory of the target")
    p.add_argument("--draft", type=Path, default=None, help="chimera run directory of the draft (same tokenizer)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    cfg = apply_overrides(get_preset(PRESETS, args.preset, "benchmark preset"), args.overrides)
    if args.draft is not None and args.target is None:
        p.error("--draft needs --target")
    if args.preset != "smoke" and args.target is None:
        p.error("--target RUN_DIR is required (a trained chimera run); --preset smoke uses random models")
    out = args.out or Path("runs") / f"speculative-{args.preset}"
    return run(cfg, out, preset=args.preset, target_dir=args.target, draft_dir=args.draft, cache_dir=args.cache_dir)


if __name__ == "__main__":
    main()
