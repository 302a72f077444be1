"""Chimera: tokenizer -> data -> pretraining -> evaluation -> sampling, on the complete works of Shakespeare.

    python -m experiments.chimera                      # the `tiny` preset, ~20 min on 2 CPU cores
    python -m experiments.chimera --preset smoke       # < 3 min, used by the tests
    python -m experiments.chimera --out runs/x --resume --set model.d_state=16 --set learning_rate=1e-3

Writes ``RUN_DIR/summary.json`` (preset, params, train_tokens, tokens_per_second, val_loss,
unigram_val_loss, mfu, samples, ...), ``metrics.jsonl``, ``loss_curve.png``, ``tokenizer.model``,
``model_config.json`` and orbax checkpoints, then prints a table. Losses are nats per token on the
held-out plays (whole plays never seen in training), over exactly the same target tokens for the model
and for the unigram baseline (a unigram model fit on the training targets with add-one smoothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

from experiments.common import default_cache_dir, prepare_corpus, unigram_loss, write_json_atomic
from mani_jax.config import apply_overrides, get_preset
from mani_jax.train.trainer import TrainConfig


@dataclass(frozen=True)
class ChimeraConfig:
    """One run of the experiment: what to train on and how to sample; ``train`` holds the optimisation.

    ``model_preset`` names a :data:`mani_jax.models.PRESETS` entry. ``eval_batches`` limits the interim
    evaluations (every ``train.eval_every`` steps) to the first N validation batches; the final
    evaluation always covers the whole held-out split.
    """

    model_preset: str = "tiny"
    corpus: str = "shakespeare"
    eval_batches: int = 0
    n_samples: int = 3
    sample_tokens: int = 64
    sample_temperature: float = 0.8
    sample_top_k: int = 40
    gguf_quants: tuple[str, ...] = ("f16", "q8_0", "q4_0")  # empty = skip the export stage
    gguf_greedy_tokens: int = 64
    gguf_passage_tokens: int = 128
    train: TrainConfig = TrainConfig()


PRESETS: dict[str, ChimeraConfig] = {
    "smoke": ChimeraConfig(
        model_preset="smoke", n_samples=2, sample_tokens=24,
        train=TrainConfig(steps=120, batch_size=8, seq_len=128, learning_rate=3e-3, warmup_steps=10,
                          checkpoint_every=60, log_every=10)),
    # 250 x 16 x 256 = 1.02M tokens (0.58 epoch); sized for <= 20 min on 2 cores at ~1,000 tokens/s.
    "tiny": ChimeraConfig(
        model_preset="tiny", eval_batches=8,
        train=TrainConfig(steps=250, batch_size=16, seq_len=256, learning_rate=2e-3, warmup_steps=25,
                          eval_every=50, checkpoint_every=50, log_every=10)),
}

SAMPLE_PROMPTS = ["ROMEO.\n", "To be, or not to be", "KING HENRY.\nNow, lords,"]


def _split_overrides(items: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Route ``key=value`` overrides: ``model.*`` to the model config, experiment fields to
    :class:`ChimeraConfig`, everything else to :class:`~mani_jax.train.TrainConfig`."""
    own = {f.name for f in dataclasses.fields(ChimeraConfig)} - {"train"}
    model, exp, train = [], [], []
    for it in items:
        key = it.split("=", 1)[0].strip()
        if key.startswith("model."):
            model.append(it.removeprefix("model."))
        elif key in own:
            exp.append(it)
        else:
            train.append(it)
    return model, exp, train


def run(cfg: ChimeraConfig, out: Path, *, preset: str, model_overrides: list[str] = (), resume: bool = False,
        cache_dir: Path | None = None) -> dict:
    import jax
    from flax import nnx

    from mani_jax.data import make_eval_batches, make_train_iterator
    from mani_jax.inference import generate
    from mani_jax.models import HybridLM, count_params, get_config
    from mani_jax.models.flops import forward_flops_per_token, measure_matmul_flops, train_flops_per_token
    from mani_jax.train import evaluate, train

    t_start = time.perf_counter()
    cache_dir = Path(cache_dir or default_cache_dir())
    out.mkdir(parents=True, exist_ok=True)
    if not resume and (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise ValueError(f"--out {out}: holds checkpoints of an earlier run; pass --resume or pick a new RUN_DIR")
    model_cfg = get_config(cfg.model_preset, list(model_overrides))
    tcfg = cfg.train
    if tcfg.seq_len > model_cfg.max_seq_len:
        model_cfg = dataclasses.replace(model_cfg, max_seq_len=tcfg.seq_len)

    # 1. Corpus and tokenizer (trained on the training split; cached by corpus hash and vocab size).
    corpus, tokenizer, train_docs, val_docs = prepare_corpus(cfg.corpus, model_cfg.vocab_size, out, cache_dir,
                                                             seed=tcfg.seed, reuse_run_tokenizer=resume,
                                                             tag="chimera")
    n_train_tokens = sum(len(d) for d in train_docs)
    unigram = unigram_loss(train_docs, val_docs, tokenizer.vocab_size)

    # 2. Model, data iterator, training.
    write_json_atomic(out / "model_config.json", dataclasses.asdict(model_cfg))
    model = HybridLM(model_cfg, rngs=nnx.Rngs(tcfg.seed))
    n_params = count_params(model_cfg)
    train_iter = make_train_iterator(train_docs, seq_len=tcfg.seq_len, batch_size=tcfg.batch_size, seed=tcfg.seed)
    val_batches = make_eval_batches(val_docs, seq_len=tcfg.seq_len, batch_size=tcfg.batch_size)
    eval_subset = val_batches[:cfg.eval_batches] if cfg.eval_batches else val_batches
    print(f"[chimera] model {cfg.model_preset}: {n_params:,} parameters, layers {''.join(t[0].upper() for t in model_cfg.layer_types)} "
          f"(M = Mamba-2, A = attention); {tcfg.steps} steps of {tcfg.batch_size}x{tcfg.seq_len} tokens", flush=True)
    peak_before = measure_matmul_flops()
    result = train(model, tcfg, train_iter, out_dir=out, resume=resume,
                   eval_fn=(lambda m: evaluate(m, eval_subset, tcfg.compute_dtype)) if tcfg.eval_every else None)
    peak_after = measure_matmul_flops()
    peak = max(peak_before, peak_after)

    # 3. Evaluation on the whole held-out split.
    val_loss = evaluate(model, val_batches, tcfg.compute_dtype)
    flops_tok = train_flops_per_token(model_cfg, tcfg.seq_len)
    tps = result.get("tokens_per_second")
    mfu = (flops_tok * tps / peak) if tps else None

    # 4. Samples.
    samples = []
    for i, prompt in enumerate(SAMPLE_PROMPTS[:cfg.n_samples]):
        ids = tokenizer.encode(prompt, add_bos=True)
        new = generate(model, ids, cfg.sample_tokens, temperature=cfg.sample_temperature, top_k=cfg.sample_top_k,
                       seed=tcfg.seed + i, stop_ids=[tokenizer.eos_id])
        samples.append({"prompt": prompt, "completion": tokenizer.decode([t for t in new if t != tokenizer.eos_id])})

    # 5. Export to GGUF, run each file in llama.cpp, compare with JAX on a held-out passage.
    gguf_results = export_stage(cfg, model, tokenizer, val_docs, out, preset) if cfg.gguf_quants else []

    n_val_targets = sum(len(d) - 1 for d in val_docs)
    val_bits_per_char = val_loss * n_val_targets / corpus.num_chars("validation") / math.log(2)
    summary = {
        "preset": preset,
        "model_preset": cfg.model_preset,
        "params": n_params,
        "layer_types": list(model_cfg.layer_types),
        "vocab_size": model_cfg.vocab_size,
        "steps": result["final_step"],
        "train_tokens": result["train_tokens"],
        "corpus_train_tokens": n_train_tokens,
        "tokens_per_second": tps,
        "val_loss": val_loss,
        "unigram_val_loss": unigram,
        "val_loss_margin_below_unigram": unigram - val_loss,
        "val_bits_per_char": val_bits_per_char,
        "final_train_loss": result.get("final_loss_avg"),
        "train_flops_per_token": flops_tok,
        "forward_flops_per_token": forward_flops_per_token(model_cfg, tcfg.seq_len),
        "matmul_peak_flops": peak,
        "matmul_peak_flops_before_after": [peak_before, peak_after],
        "achieved_flops": flops_tok * tps if tps else None,
        "mfu": mfu,
        "compile_seconds": result.get("compile_seconds"),
        "train_seconds": result.get("wall_seconds"),
        "wall_seconds": time.perf_counter() - t_start,
        "device": str(jax.devices()[0]),
        "jax_version": jax.__version__,
        "config": dataclasses.asdict(cfg),
        "model_config": dataclasses.asdict(model_cfg),
        "samples": samples,
        "gguf": gguf_results,
        "metrics_path": "metrics.jsonl",
        "plot": "loss_curve.png",
    }
    write_json_atomic(out / "summary.json", summary)
    _print_table(summary)
    return summary


def export_stage(cfg: ChimeraConfig, model, tokenizer, val_docs, out: Path, preset: str) -> list[dict]:
    """Export ``model`` at each of ``cfg.gguf_quants``, load each file in llama.cpp and compare with JAX.

    The passage is the start of the first held-out play (BOS included), at most ``gguf_passage_tokens``
    tokens and short enough that ``gguf_greedy_tokens`` greedy tokens still fit in ``max_seq_len``.
    """
    from mani_jax.export import compare_with_llama_cpp, export_gguf

    n_greedy = cfg.gguf_greedy_tokens
    n_passage = min(cfg.gguf_passage_tokens, model.config.max_seq_len - n_greedy, len(val_docs[0]))
    if n_passage < 2:
        raise ValueError(f"gguf_greedy_tokens={n_greedy} leaves no room for a passage in max_seq_len="
                         f"{model.config.max_seq_len}")
    passage = [int(t) for t in val_docs[0][:n_passage]]
    results = []
    for quant in cfg.gguf_quants:
        path = out / f"chimera-{preset}-{quant}.gguf"
        print(f"[chimera] exporting {path.name} and running it in llama.cpp", flush=True)
        export_gguf(model, tokenizer, path, quant=quant, name=f"chimera-{preset}")
        stats = compare_with_llama_cpp(model, path, passage, n_greedy=n_greedy)
        results.append({
            "path": path.name, "quant": quant, "size_bytes": path.stat().st_size,
            **{k: stats[k] for k in ("max_rel_logit_diff", "top1_agreement", "mean_kl", "greedy_match_tokens",
                                     "prompt_tokens_per_second", "decode_tokens_per_second",
                                     "time_to_first_token_s")},
            "n_greedy": n_greedy, "passage_tokens": n_passage,
            "llama_cpp_continuation": tokenizer.decode([t for t in stats["llama_greedy_tokens"]
                                                        if t != tokenizer.eos_id]),
        })
    return results


def _print_table(s: dict) -> None:
    rows = [
        ("preset", s["preset"]), ("params", f"{s['params']:,}"), ("train tokens", f"{s['train_tokens']:,}"),
        ("tokens/s", f"{s['tokens_per_second']:.0f}" if s["tokens_per_second"] else "-"),
        ("val loss (nats/token)", f"{s['val_loss']:.4f}"), ("unigram val loss", f"{s['unigram_val_loss']:.4f}"),
        ("margin below unigram", f"{s['val_loss_margin_below_unigram']:.4f}"),
        ("val bits/char", f"{s['val_bits_per_char']:.4f}"),
        ("MFU (vs f32 matmul peak)", f"{100 * s['mfu']:.1f}% of {s['matmul_peak_flops'] / 1e9:.0f} GFLOP/s"
         if s["mfu"] else "-"),
        ("wall time", f"{s['wall_seconds']:.0f} s"),
    ]
    w = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"  {k:<{w}}  {v}" for k, v in rows))
    if s.get("gguf"):
        print("\n  GGUF in llama.cpp (vs JAX on a held-out passage)")
        print(f"  {'file':<26} {'MiB':>7} {'rel max dlogit':>15} {'top-1':>7} {'KL':>9} {'greedy':>7} "
              f"{'TTFT s':>7} {'decode tok/s':>13}")
        for g in s["gguf"]:
            print(f"  {g['path']:<26} {g['size_bytes'] / 2**20:7.2f} {g['max_rel_logit_diff']:15.2e} "
                  f"{g['top1_agreement']:7.3f} {g['mean_kl']:9.2e} {g['greedy_match_tokens']:>3}/{g['n_greedy']:<3} "
                  f"{g['time_to_first_token_s']:7.3f} {g['decode_tokens_per_second']:13.1f}")
        g = s["gguf"][-1]
        print(f"\n--- llama.cpp ({g['quant']}) continues the held-out passage:\n{g['llama_cpp_continuation']}")
    for smp in s["samples"]:
        print(f"\n--- {smp['prompt']!r}\n{smp['prompt']}{smp['completion']}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.chimera", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help=f"one of {sorted(PRESETS)} (default tiny)")
    p.add_argument("--steps", type=int, default=None, help="override the preset's number of training steps")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/chimera-<preset>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--corpus", default=None, help="'shakespeare' (default), a directory of .txt files, or a .jsonl")
    p.add_argument("--cache-dir", type=Path, default=None, help="downloads and token caches (default "
                   "$MANI_JAX_CACHE or ~/.cache/mani_jax)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run field (e.g. learning_rate=1e-3) or a model field (model.d_state=16)")
    args = p.parse_args(argv)
    cfg = get_preset(PRESETS, args.preset, "experiment preset")
    model_ov, exp_ov, train_ov = _split_overrides(args.overrides)
    if args.steps is not None:
        train_ov.append(f"steps={args.steps}")
    if args.corpus is not None:
        exp_ov.append(f"corpus={args.corpus}")
    cfg = apply_overrides(cfg, exp_ov)
    cfg = dataclasses.replace(cfg, train=apply_overrides(cfg.train, train_ov))
    out = args.out or Path("runs") / f"chimera-{args.preset}"
    return run(cfg, out, preset=args.preset, model_overrides=model_ov, resume=args.resume, cache_dir=args.cache_dir)


if __name__ == "__main__":
    main()
