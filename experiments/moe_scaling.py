"""Sparse MoE vs dense at matched active FLOPs, and the expert-collapse study, on Shakespeare.

    python -m experiments.moe_scaling                   # the default study, < 1 h on 2 CPU cores
    python -m experiments.moe_scaling --preset smoke    # minutes; used by the tests
    python -m experiments.moe_scaling --set steps=400 --set variants=dense,moe --set model.d_model=192

Every variant is a Mixtral-style decoder (all-attention blocks, :class:`mani_jax.models.HybridLM`) trained
with the same tokenizer, the same data order (same seed -> same batches), the same optimiser and the same
number of tokens. The dense baseline's SwiGLU FFN has width ``d_ff``; each MoE layer has ``n_experts``
SwiGLU experts of width ``d_ff_expert = d_ff / top_k`` and runs ``top_k`` of them per token, so the active
FFN FLOPs per token match the dense model's; the router adds ``d_model * n_experts`` multiply-adds per
layer. FLOPs are counted by :func:`mani_jax.models.flops.train_flops_per_token` (PaLM convention: 3x the
forward matmul FLOPs, active experts only, dispatch not counted).

Variants (``variants``):

* ``dense``                 -- the matched-FLOP dense baseline.
* ``moe``                   -- load-balancing (alpha ``aux_coef``) and router z-loss (``z_coef``): the MoE.
* ``moe_no_balance``        -- neither loss.
* ``moe_lb_only``           -- load-balancing loss only.
* ``moe_z_only``            -- router z-loss only.
* ``moe_bad_init``          -- a deliberately bad router init (all-zero router weights: every logit ties,
  ``top_k`` breaks ties by index, so every token starts on experts 0..k-1) and no balancing loss.
* ``moe_bad_init_balanced`` -- the same bad init with both losses: does balancing recover it?

Outputs in ``RUN_DIR`` (default ``runs/moe_scaling-<preset>``): ``results.json`` (the summary table, per
variant curves, throughput), ``loss_vs_tokens.png``, ``loss_vs_flops.png``, ``loss_vs_wallclock.png``,
``expert_load_<variant>.png`` (per-layer heatmaps of expert load over training), ``routing_entropy.png``,
``dead_experts.png``, ``throughput.png``, and each variant's ``<variant>/metrics.jsonl`` (per-layer expert
load every ``log_every`` steps). Losses are nats/token on held-out plays.
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

from experiments.common import default_cache_dir, prepare_corpus, unigram_loss, write_json_atomic
from mani_jax.config import apply_overrides, get_preset
from mani_jax.train.metrics import save_figure
from mani_jax.train.trainer import TrainConfig

VARIANTS: dict[str, dict] = {
    # name: (is_moe, use load-balancing loss, use z-loss, zero router init)
    "dense": dict(moe=False, lb=False, z=False, bad_init=False),
    "moe": dict(moe=True, lb=True, z=True, bad_init=False),
    "moe_no_balance": dict(moe=True, lb=False, z=False, bad_init=False),
    "moe_lb_only": dict(moe=True, lb=True, z=False, bad_init=False),
    "moe_z_only": dict(moe=True, lb=False, z=True, bad_init=False),
    "moe_bad_init": dict(moe=True, lb=False, z=False, bad_init=True),
    "moe_bad_init_balanced": dict(moe=True, lb=True, z=True, bad_init=True),
}

# Throughput rows: (label, model-config overrides on top of the MoE config; None = the dense model).
DISPATCH_PATHS: dict[str, dict | None] = {
    "dense": None,
    "dropless (blocked grouped matmul)": dict(capacity_factor=None, dropless_impl="blocked"),
    "dropless (ragged_dot)": dict(capacity_factor=None, dropless_impl="ragged_dot"),
    "capacity 1.25 (einsum)": dict(capacity_factor=1.25, moe_dispatch="einsum"),
    "capacity 1.25 (gather)": dict(capacity_factor=1.25, moe_dispatch="gather"),
}


@dataclass(frozen=True)
class MoEStudyConfig:
    """The study. Model fields are shared by every variant; ``train`` is the optimisation of each run.

    ``d_ff_expert = d_ff // top_k`` (matched active FFN FLOPs) unless set. ``dropless_impl`` is the MoE
    runs' dispatch (``"blocked"`` is the fast one on CPU; the throughput table measures all paths).
    ``eval_batches`` limits the interim evaluations (every ``train.eval_every`` steps) to the first N
    validation batches; the final evaluation covers the whole held-out split.
    """

    corpus: str = "shakespeare"
    vocab_size: int = 2048
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    d_ff: int = 512
    n_experts: int = 8
    top_k: int = 2
    d_ff_expert: int = 0
    dropless_impl: str = "blocked"
    aux_coef: float = 0.01
    z_coef: float = 0.001
    variants: tuple[str, ...] = tuple(VARIANTS)
    eval_batches: int = 8
    throughput_steps: int = 8
    train: TrainConfig = TrainConfig()

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"variants: unknown {unknown}; expected names from {list(VARIANTS)}")
        if not self.variants:
            raise ValueError("variants: expected at least one variant")
        if self.d_ff_expert == 0 and self.d_ff % self.top_k:
            raise ValueError(f"d_ff={self.d_ff} is not divisible by top_k={self.top_k}; set d_ff_expert")

    def model_config(self, variant: str):
        """The :class:`~mani_jax.models.ModelConfig` of one variant."""
        from mani_jax.models import ModelConfig

        v = VARIANTS[variant]
        common = dict(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                      layer_types=("attention",) * self.n_layers, n_heads=self.n_heads,
                      n_kv_heads=self.n_kv_heads, head_dim=self.head_dim, d_ff=self.d_ff,
                      max_seq_len=self.train.seq_len, tie_embeddings=False)
        if not v["moe"]:
            return ModelConfig(**common)
        return ModelConfig(**common, n_experts=self.n_experts, top_k=self.top_k,
                           d_ff_expert=self.d_ff_expert or self.d_ff // self.top_k,
                           dropless_impl=self.dropless_impl,
                           router_aux_loss_coef=self.aux_coef if v["lb"] else 0.0,
                           router_z_loss_coef=self.z_coef if v["z"] else 0.0)


PRESETS: dict[str, MoEStudyConfig] = {
    "smoke": MoEStudyConfig(
        vocab_size=1024, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=128, n_experts=4,
        variants=("dense", "moe", "moe_no_balance", "moe_bad_init"), eval_batches=2, throughput_steps=2,
        train=TrainConfig(steps=24, batch_size=8, seq_len=64, learning_rate=3e-3, warmup_steps=4,
                          eval_every=8, log_every=4, progress=False)),
    # 7 runs x 300 steps x 16 x 256 = 1.23M tokens each (~0.7 epoch of the training plays); sized for
    # < 1 h on 2 CPU cores (measured wall time in docs/moe.md).
    "default": MoEStudyConfig(
        train=TrainConfig(steps=300, batch_size=16, seq_len=256, learning_rate=3e-3, warmup_steps=30,
                          eval_every=25, log_every=10)),
}


def zero_router(model) -> None:
    """The deliberately bad router init: set every MoE layer's router weights of ``model`` to zero (in place).

    All logits tie at 0, so ``top_k`` (ties broken by index) sends every token to experts ``0..k-1``."""
    import jax.numpy as jnp
    for layer in model.layers:
        layer.moe.router.kernel.set_value(jnp.zeros_like(layer.moe.router.kernel[...]))


def _routing_stats(load: np.ndarray) -> dict:
    """``load [layers, experts]`` (fractions of assignments) -> per-layer normalised entropy, max/mean, dead."""
    n = load.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(load > 0, load * np.log(np.where(load > 0, load, 1.0)), 0.0)
    return {"entropy": (-plogp.sum(-1) / math.log(n)).tolist(), "max_over_mean": (n * load.max(-1)).tolist(),
            "dead_experts": (load == 0).sum(-1).astype(int).tolist()}


def reach(xs: list[float], losses: list[float], target: float) -> float | None:
    """First ``x`` at which the piecewise-linear curve ``losses(xs)`` is <= ``target`` (None if never)."""
    for i, (x, l) in enumerate(zip(xs, losses)):
        if l <= target:
            if i == 0:
                return x
            x0, l0 = xs[i - 1], losses[i - 1]
            return x0 + (x - x0) * (l0 - target) / (l0 - l) if l0 != l else x
    return None


def measure_throughput(model_cfg, tcfg: TrainConfig, batch: dict, steps: int) -> dict:
    """Tokens/s of the jitted train step of ``model_cfg`` on one fixed batch: compile, one warm-up step,
    then the median of ``steps`` timed steps (each blocked until done)."""
    import jax
    from flax import nnx

    from mani_jax.models import HybridLM
    from mani_jax.train.optim import make_optimizer, make_schedule
    from mani_jax.train.trainer import make_train_step

    model = HybridLM(model_cfg, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(tcfg.optim_config(), model)
    graphdef, state = nnx.split((model, optimizer))
    step = make_train_step(graphdef, make_schedule(tcfg.optim_config()), tcfg.compute_dtype)
    t0 = time.perf_counter()
    for _ in range(2):
        state, m = step(state, batch)
        jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    n_tok = int(np.prod(batch["tokens"].shape))
    med = statistics.median(times)
    return {"tokens_per_second": n_tok / med, "step_seconds_median": med, "step_seconds_min": min(times),
            "compile_and_warmup_seconds": compile_s, "steps_timed": steps}


def run(cfg: MoEStudyConfig, out: Path, *, preset: str, cache_dir: Path | None = None) -> dict:
    import jax
    from flax import nnx

    from mani_jax.data import make_eval_batches, make_train_iterator
    from mani_jax.models import HybridLM, count_params
    from mani_jax.models.flops import train_flops_per_token
    from mani_jax.train import evaluate, train
    from mani_jax.train.metrics import read_metrics

    t_start = time.perf_counter()
    cache_dir = Path(cache_dir or default_cache_dir())
    out.mkdir(parents=True, exist_ok=True)
    tcfg = cfg.train
    corpus, tokenizer, train_docs, val_docs = prepare_corpus(cfg.corpus, cfg.vocab_size, out, cache_dir,
                                                             seed=tcfg.seed, tag="moe_scaling")
    unigram = unigram_loss(train_docs, val_docs, cfg.vocab_size)
    val_batches = make_eval_batches(val_docs, seq_len=tcfg.seq_len, batch_size=tcfg.batch_size)
    eval_subset = val_batches[:cfg.eval_batches] if cfg.eval_batches else val_batches

    runs: dict[str, dict] = {}
    for i, name in enumerate(cfg.variants):
        mcfg = cfg.model_config(name)
        run_dir = out / name
        if (run_dir / "metrics.jsonl").exists():
            (run_dir / "metrics.jsonl").unlink()
        model = HybridLM(mcfg, rngs=nnx.Rngs(tcfg.seed))
        if VARIANTS[name]["bad_init"]:
            zero_router(model)
        # Same seed -> same shuffle -> every variant sees the same batches in the same order.
        train_iter = make_train_iterator(train_docs, seq_len=tcfg.seq_len, batch_size=tcfg.batch_size,
                                         seed=tcfg.seed)
        n_total, n_active = count_params(mcfg), count_params(mcfg, active=True)
        flops_tok = train_flops_per_token(mcfg, tcfg.seq_len)
        print(f"[moe_scaling] ({i + 1}/{len(cfg.variants)}) {name}: {n_total:,} params ({n_active:,} active), "
              f"{flops_tok / 1e6:.2f} MFLOP/token (train), {tcfg.steps} steps of {tcfg.batch_size}x{tcfg.seq_len}",
              flush=True)
        result = train(model, tcfg, train_iter, out_dir=run_dir,
                       eval_fn=lambda m: evaluate(m, eval_subset, tcfg.compute_dtype))
        val_loss = evaluate(model, val_batches, tcfg.compute_dtype)
        records = read_metrics(run_dir / "metrics.jsonl")
        evals = [r for r in records if "eval_loss" in r]
        loads = [(r["step"], np.asarray(r["expert_load"])) for r in records if "expert_load" in r]
        routing = None
        if loads:
            final = _routing_stats(loads[-1][1])
            routing = {
                "steps": [s for s, _ in loads],
                "expert_load": [l.tolist() for _, l in loads],
                "entropy_mean": [float(np.mean(_routing_stats(l)["entropy"])) for _, l in loads],
                "entropy_min": [float(np.min(_routing_stats(l)["entropy"])) for _, l in loads],
                "dead_experts": [int(np.sum(_routing_stats(l)["dead_experts"])) for _, l in loads],
                "final": final,
                "load_balancing_loss": [r["load_balancing_loss"] for r in records if "load_balancing_loss" in r],
                "router_z_loss": [r["router_z_loss"] for r in records if "router_z_loss" in r],
            }
        runs[name] = {
            "model_config": dataclasses.asdict(mcfg),
            "params": n_total, "active_params": n_active, "train_flops_per_token": flops_tok,
            "train_tokens": result["train_tokens"], "tokens_per_second": result["tokens_per_second"],
            "train_seconds": result["wall_seconds"], "compile_seconds": result["compile_seconds"],
            "val_loss": val_loss, "final_train_loss": result["final_loss_avg"],
            "curve": {"tokens": [r["tokens_seen"] for r in evals], "seconds": [r["train_seconds"] for r in evals],
                      "flops": [r["tokens_seen"] * flops_tok for r in evals],
                      "eval_loss": [r["eval_loss"] for r in evals]},
            "routing": routing,
        }
        print(f"[moe_scaling] {name}: val loss {val_loss:.4f}, {result['tokens_per_second'] or 0:,.0f} tok/s, "
              f"{result['wall_seconds']:.0f} s" + (f", final routing entropy (mean over layers) "
                                                   f"{np.mean(routing['final']['entropy']):.3f}, dead experts "
                                                   f"{sum(routing['final']['dead_experts'])}" if routing else ""),
              flush=True)
        jax.clear_caches()

    # Throughput of the dense model and of every MoE dispatch path, same batch, same machine, back to back.
    print("[moe_scaling] throughput of the train step per dispatch path", flush=True)
    batch = {k: np.asarray(v) for k, v in next(make_train_iterator(
        train_docs, seq_len=tcfg.seq_len, batch_size=tcfg.batch_size, seed=tcfg.seed)).items()}
    moe_cfg = cfg.model_config("moe")
    throughput = {}
    for label, ov in DISPATCH_PATHS.items():
        mcfg = cfg.model_config("dense") if ov is None else dataclasses.replace(moe_cfg, **ov)
        throughput[label] = measure_throughput(mcfg, tcfg, batch, cfg.throughput_steps)
        print(f"  {label:<36} {throughput[label]['tokens_per_second']:10,.0f} tok/s", flush=True)

    comparison = _compare(runs)
    summary = {
        "preset": preset, "corpus": cfg.corpus, "unigram_val_loss": unigram,
        "val_tokens": sum(len(d) - 1 for d in val_docs),
        "flops_convention": "PaLM: train = 3 x forward matmul FLOPs; MoE counts top_k experts + router; "
                            "dispatch not counted (mani_jax.models.flops)",
        "runs": runs, "comparison": comparison, "throughput": throughput,
        "device": str(jax.devices()[0]), "jax_version": jax.__version__,
        "config": dataclasses.asdict(cfg), "wall_seconds": time.perf_counter() - t_start,
    }
    summary["plots"] = _plots(summary, out)
    write_json_atomic(out / "results.json", summary)
    _print_table(summary)
    return summary


def _compare(runs: dict[str, dict]) -> dict:
    """How much sooner each MoE variant reaches the dense model's final eval loss, in tokens / FLOPs / seconds.

    The target is the dense run's last interim eval loss (same eval subset as the curves); the MoE's
    crossing point is linearly interpolated between its eval points. ``None`` = never reached.
    """
    if "dense" not in runs:
        return {}
    d = runs["dense"]["curve"]
    if not d["eval_loss"]:
        return {}
    target = d["eval_loss"][-1]
    out = {"target_eval_loss": target, "variants": {}}
    for name, r in runs.items():
        if name == "dense":
            continue
        c = r["curve"]
        row = {"final_eval_loss": c["eval_loss"][-1] if c["eval_loss"] else None,
               "val_loss_minus_dense": r["val_loss"] - runs["dense"]["val_loss"]}
        for axis in ("tokens", "flops", "seconds"):
            x = reach(c[axis], c["eval_loss"], target)
            row[f"{axis}_to_dense_loss"] = x
            row[f"speedup_{axis}"] = (d[axis][-1] / x) if x else None
        out["variants"][name] = row
    return out


def _plots(s: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        save_figure(fig, out / name, bbox_inches="tight")
        written.append(name)

    runs = s["runs"]
    for axis, label, fname in (("tokens", "training tokens", "loss_vs_tokens.png"),
                               ("flops", "training FLOPs (active, PaLM convention)", "loss_vs_flops.png"),
                               ("seconds", "training wall-clock (s, this machine)", "loss_vs_wallclock.png")):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for name, r in runs.items():
            ax.plot(r["curve"][axis], r["curve"]["eval_loss"], "o-" if name in ("dense", "moe") else "-",
                    ms=3, lw=2.0 if name in ("dense", "moe") else 1.0, label=name)
        ax.axhline(s["unigram_val_loss"], color="gray", ls=":", lw=1, label="unigram")
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"dense vs top-k MoE at matched active FLOPs ({s['preset']})")
        lo = min(min(r["curve"]["eval_loss"]) for r in runs.values() if r["curve"]["eval_loss"])
        ax.set_ylim(lo - 0.1, s["unigram_val_loss"] + 0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, fname)

    moe_runs = {n: r for n, r in runs.items() if r["routing"]}
    for name, r in moe_runs.items():
        load = np.asarray(r["routing"]["expert_load"])  # [logs, layers, experts]
        n_layers, n_exp = load.shape[1], load.shape[2]
        fig, axes = plt.subplots(n_layers, 1, figsize=(8, 1.3 * n_layers + 0.8), sharex=True, squeeze=False)
        steps = r["routing"]["steps"]
        for li in range(n_layers):
            ax = axes[li, 0]
            im = ax.imshow(load[:, li, :].T, aspect="auto", origin="lower", cmap="viridis", vmin=0,
                           vmax=max(2.0 / n_exp, float(load.max())), interpolation="nearest",
                           extent=(steps[0], steps[-1], -0.5, n_exp - 0.5))
            ax.set_ylabel(f"layer {li}\nexpert")
        axes[-1, 0].set_xlabel("step")
        fig.colorbar(im, ax=axes[:, 0].tolist(), label="fraction of assignments")
        fig.suptitle(f"expert load over training: {name} (uniform = {1 / n_exp:.3f})")
        save(fig, f"expert_load_{name}.png")

    for key, ylabel, fname in (("entropy_mean", "normalised routing entropy (mean over layers)",
                                "routing_entropy.png"),
                               ("dead_experts", "dead experts (sum over layers, per logged batch)",
                                "dead_experts.png")):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for name, r in moe_runs.items():
            ax.plot(r["routing"]["steps"], r["routing"][key], label=name, lw=1.3)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, fname)

    fig, ax = plt.subplots(figsize=(7.5, 3.5))
    labels = list(s["throughput"])
    vals = [s["throughput"][k]["tokens_per_second"] for k in labels]
    ax.barh(labels, vals, color=["gray"] + ["C0"] * (len(labels) - 1))
    ax.set_xlabel("train-step tokens/s (median)")
    ax.invert_yaxis()
    ax.set_title(f"dispatch paths vs dense ({s['device']})")
    save(fig, "throughput.png")
    return written


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _print_table(s: dict) -> None:
    print(f"\n  {'variant':<24} {'params':>10} {'active':>10} {'MFLOP/tok':>10} {'tok/s':>8} {'val loss':>9} "
          f"{'entropy':>8} {'min ent':>8} {'dead':>5} {'x tokens':>9} {'x wall':>7}")
    cmp = s["comparison"].get("variants", {})
    for name, r in s["runs"].items():
        fin = (r["routing"] or {}).get("final")
        c = cmp.get(name, {})
        print(f"  {name:<24} {r['params']:>10,} {r['active_params']:>10,} {r['train_flops_per_token'] / 1e6:>10.2f} "
              f"{_fmt(r['tokens_per_second'], ',.0f'):>8} {r['val_loss']:>9.4f} "
              f"{_fmt(np.mean(fin['entropy']) if fin else None, '.3f'):>8} "
              f"{_fmt(np.min(fin['entropy']) if fin else None, '.3f'):>8} "
              f"{_fmt(sum(fin['dead_experts']) if fin else None, 'd'):>5} "
              f"{_fmt(c.get('speedup_tokens'), '.2f'):>9} {_fmt(c.get('speedup_seconds'), '.2f'):>7}")
    print(f"\n  unigram val loss {s['unigram_val_loss']:.4f}; 'x tokens' / 'x wall' = dense tokens (seconds) to its "
          f"final eval loss {s['comparison'].get('target_eval_loss', float('nan')):.4f} / the variant's")
    print("\n  train-step throughput (same batch, back to back)")
    for label, t in s["throughput"].items():
        print(f"  {label:<36} {t['tokens_per_second']:10,.0f} tok/s")
    print(f"\n  wall time {s['wall_seconds']:.0f} s; plots: {', '.join(s['plots'])}")


def _split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """``key=value`` overrides: study fields (``model.`` prefix optional for the model fields) vs TrainConfig."""
    own = {f.name for f in dataclasses.fields(MoEStudyConfig)} - {"train"}
    exp, train = [], []
    for it in items:
        key = it.split("=", 1)[0].strip().removeprefix("model.")
        (exp if key in own else train).append(it.strip().removeprefix("model."))
    return exp, train


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.moe_scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="default", help=f"one of {sorted(PRESETS)} (default: default)")
    p.add_argument("--steps", type=int, default=None, help="override the number of training steps of every run")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/moe_scaling-<preset>)")
    p.add_argument("--corpus", default=None, help="'shakespeare' (default), a directory of .txt files, or a .jsonl")
    p.add_argument("--cache-dir", type=Path, default=None, help="downloads and token caches (default "
                   "$MANI_JAX_CACHE or ~/.cache/mani_jax)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study field (d_model=192, variants=dense,moe, aux_coef=0.1) or a "
                        "TrainConfig field (learning_rate=1e-3)")
    args = p.parse_args(argv)
    cfg = get_preset(PRESETS, args.preset, "experiment preset")
    exp_ov, train_ov = _split_overrides(args.overrides)
    if args.steps is not None:
        train_ov.append(f"steps={args.steps}")
    if args.corpus is not None:
        exp_ov.append(f"corpus={args.corpus}")
    cfg = apply_overrides(cfg, exp_ov)
    cfg = dataclasses.replace(cfg, train=apply_overrides(cfg.train, train_ov))
    out = args.out or Path("runs") / f"moe_scaling-{args.preset}"
    return run(cfg, out, preset=args.preset, cache_dir=args.cache_dir)


if __name__ == "__main__":
    main()
