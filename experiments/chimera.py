"""Chimera: tokenizer -> pretraining on Shakespeare -> reasoning SFT -> DPO -> GGUF chat model in llama.cpp.

    python -m experiments.chimera                      # the `tiny` preset, all stages
    python -m experiments.chimera --preset smoke       # a few minutes, used by the tests
    python -m experiments.chimera --stages pretrain    # only pretraining (and its base few-shot evaluation)
    python -m experiments.chimera --out runs/x --stages dpo,export   # continue a run from its SFT checkpoint
    python -m experiments.chimera --out runs/x --resume --set model.d_state=16 --set learning_rate=1e-3
    python -m experiments.chimera --set sft.steps=600 --set dpo.learning_rate=2e-6 --set dpo_beta=0.1

Stages (``--stages``, default all, run in this order, each from the previous stage's checkpoint):

- ``pretrain``: a SentencePiece tokenizer trained on the Shakespeare training split plus a sample of generated
  reasoning problems (so digits, ``Answer:``, the chat tokens and the Hindi split have pieces), the model
  pretrained on Shakespeare (``RUN_DIR/checkpoints``), held-out loss and samples, and the base model's few-shot
  exact match on the held-out reasoning problems.
- ``sft``: supervised fine-tuning on generated arithmetic word problems in the chat format, loss on the
  assistant tokens only, conversations packed with segment ids (``RUN_DIR/sft``); greedy held-out exact match.
- ``dpo``: preference pairs sampled on-policy from the SFT model with the engine (chosen = verified correct,
  rejected = wrong), DPO (Rafailov et al. 2023) against the frozen SFT model (``RUN_DIR/dpo``); held-out exact
  match, its paired difference to SFT (bootstrap CI, McNemar), reward margins and KL to the reference.
- ``export``: the last trained model to GGUF (``tokenizer.chat_template`` = :data:`mani_jax.chat.CHAT_TEMPLATE`)
  at each of ``gguf_quants``, logits compared with JAX on a held-out passage, and the held-out problems answered
  by llama.cpp through ``create_chat_completion`` (greedy) with the agreement to the JAX replies.

A stage that runs replaces its own outputs and drops the summary entries of the stages after it (they no longer
follow from it). ``--resume`` continues *pretraining* from its latest checkpoint.

Writes ``RUN_DIR/summary.json`` (preset, params, train_tokens, tokens_per_second, val_loss, unigram_val_loss,
mfu, samples, ``accuracy`` per stage by difficulty, ``sft``, ``dpo``, ``chat_export``, ``gguf``, ...),
``metrics.jsonl``, ``loss_curve.png``, ``accuracy_by_difficulty.png``, ``evals/<stage>.jsonl`` (every held-out
reply), ``tokenizer.model``, ``model_config.json`` and orbax checkpoints, then prints a table. Losses are nats per
token on the held-out plays (whole plays never seen in training), over exactly the same target tokens for the
model and for the unigram baseline (a unigram model fit on the training targets with add-one smoothing).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from experiments.common import default_cache_dir, unigram_loss, write_json_atomic
from mani_jax.config import apply_overrides, get_preset
from mani_jax.train.trainer import TrainConfig

STAGES: tuple[str, ...] = ("pretrain", "sft", "dpo", "export")
#: Where each trained stage keeps its checkpoints and logs, relative to RUN_DIR.
STAGE_DIRS = {"pretrain": ".", "sft": "sft", "dpo": "dpo"}
#: Seeds of the generated problem sets (offsets from the run's seed): tokenizer sample, SFT data, DPO prompts,
#: KL prompts, few-shot exemplars. All are training-split problems (never a held-out signature).
_SEED_TOKENIZER, _SEED_SFT, _SEED_DPO, _SEED_KL, _SEED_SHOTS = 101, 202, 303, 404, 505


@dataclass(frozen=True)
class ChimeraConfig:
    """One run of the experiment: data, stage sizes and sampling; ``train`` / ``sft`` / ``dpo`` hold the
    optimisation of pretraining, supervised fine-tuning and DPO (``--set sft.steps=...``).

    ``model_preset`` names a :data:`mani_jax.models.PRESETS` entry. ``eval_batches`` limits the interim
    evaluations (every ``train.eval_every`` steps) to the first N validation batches; the final
    evaluation always covers the whole held-out split.

    Reasoning fields: ``tokenizer_problems`` generated problems are added to the tokenizer's training text (0 =
    Shakespeare only). The held-out set is ``heldout_problems(eval_per_difficulty, steps=reasoning_steps,
    digits=reasoning_digits)`` (English arithmetic; difficulty = steps, each problem's operand size drawn from
    ``reasoning_digits``); SFT trains on ``sft_problems`` training-split problems of the same steps and digits.
    ``few_shot`` exemplars (1-2 step problems) prompt the base model, fewer when the prompt would not fit
    ``max_seq_len``. Replies are decoded greedily up to ``max_new_tokens``. DPO samples ``dpo_samples`` replies
    at ``dpo_temperature`` for each of ``dpo_problems`` training problems with ``dpo_problem_steps`` steps (the
    harder ones, where the SFT model is sometimes right and sometimes wrong) and keeps up to
    ``dpo_pairs_per_problem`` (correct, wrong) pairs per problem; ``dpo_beta`` is DPO's beta. DPO runs
    ``dpo_epochs`` passes over the pairs (at most ``dpo.steps`` steps; 0 = exactly ``dpo.steps``). The KL to the
    reference is measured on ``kl_problems`` replies sampled from the DPO policy. ``dpo_gold_fallback`` pairs the
    reference solution (chosen) with a wrong sample for problems whose samples are all wrong (off-policy; only
    the smoke preset, whose SFT model is never right, uses it). The held-out problems run in llama.cpp from the
    ``chat_gguf_quant`` export (empty = skip).
    """

    model_preset: str = "tiny"
    corpus: str = "shakespeare"
    eval_batches: int = 0
    n_samples: int = 3
    sample_tokens: int = 64
    sample_temperature: float = 0.8
    sample_top_k: int = 40
    gguf_quants: tuple[str, ...] = ("f16", "q8_0", "q4_0")  # empty = no GGUF files in the export stage
    gguf_greedy_tokens: int = 64
    gguf_passage_tokens: int = 128
    train: TrainConfig = TrainConfig()
    # reasoning data and evaluation
    tokenizer_problems: int = 4000
    reasoning_steps: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    reasoning_digits: tuple[int, ...] = (1,)
    eval_per_difficulty: int = 100
    few_shot: int = 3
    max_new_tokens: int = 96
    eval_batch: int = 32
    # supervised fine-tuning
    sft_problems: int = 20000
    sft: TrainConfig = TrainConfig(steps=1600, batch_size=4, seq_len=256, learning_rate=1.5e-3, warmup_steps=50,
                                   weight_decay=0.0, log_every=25, eval_every=400)
    # DPO
    dpo_problems: int = 512
    dpo_problem_steps: tuple[int, ...] = (3, 4, 5, 6)
    dpo_samples: int = 4
    dpo_temperature: float = 1.0
    dpo_pairs_per_problem: int = 2
    dpo_beta: float = 0.1
    dpo_epochs: float = 2.0
    dpo_gold_fallback: bool = False
    dpo: TrainConfig = TrainConfig(steps=200, batch_size=8, seq_len=256, learning_rate=5e-5, warmup_steps=5,
                                   weight_decay=0.0, log_every=5)
    kl_problems: int = 64
    chat_gguf_quant: str = "f16"


PRESETS: dict[str, ChimeraConfig] = {
    "smoke": ChimeraConfig(
        model_preset="smoke", n_samples=2, sample_tokens=24,
        train=TrainConfig(steps=120, batch_size=8, seq_len=128, learning_rate=3e-3, warmup_steps=10,
                          checkpoint_every=60, log_every=10),
        tokenizer_problems=1000, reasoning_steps=(1, 2), reasoning_digits=(1,), eval_per_difficulty=4, few_shot=1,
        max_new_tokens=40, eval_batch=8, sft_problems=400,
        sft=TrainConfig(steps=30, batch_size=8, seq_len=128, learning_rate=3e-3, warmup_steps=5, weight_decay=0.0,
                        log_every=10),
        dpo_problems=8, dpo_problem_steps=(1, 2), dpo_samples=2, dpo_temperature=1.5, dpo_epochs=0.0,
        dpo_gold_fallback=True,
        dpo=TrainConfig(steps=4, batch_size=2, seq_len=128, learning_rate=1e-4, warmup_steps=1, weight_decay=0.0,
                        log_every=2),
        kl_problems=2),
    # Pretraining: 250 x 16 x 256 = 1.02M tokens (0.58 epoch); sized for <= 20 min on 2 cores at ~1,000 tokens/s.
    "tiny": ChimeraConfig(
        model_preset="tiny", eval_batches=8,
        train=TrainConfig(steps=250, batch_size=16, seq_len=256, learning_rate=2e-3, warmup_steps=25,
                          eval_every=50, checkpoint_every=50, log_every=10)),
}

SAMPLE_PROMPTS = ["ROMEO.\n", "To be, or not to be", "KING HENRY.\nNow, lords,"]


def _split_overrides(items: list[str]) -> tuple[list[str], list[str], list[str], dict[str, list[str]]]:
    """Route ``key=value`` overrides: ``model.*`` to the model config, ``sft.*`` / ``dpo.*`` to those stages'
    :class:`~mani_jax.train.TrainConfig`, experiment fields to :class:`ChimeraConfig`, everything else to the
    pretraining :class:`~mani_jax.train.TrainConfig`."""
    own = {f.name for f in dataclasses.fields(ChimeraConfig)} - {"train", "sft", "dpo"}
    model, exp, train, stage = [], [], [], {"sft": [], "dpo": []}
    for it in items:
        key = it.split("=", 1)[0].strip()
        if key.startswith("model."):
            model.append(it.removeprefix("model."))
        elif key.split(".", 1)[0] in stage and "." in key:
            stage[key.split(".", 1)[0]].append(it.split(".", 1)[1])
        elif key in own:
            exp.append(it)
        else:
            train.append(it)
    return model, exp, train, stage


def parse_stages(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"pretrain,sft"`` -> ``("pretrain", "sft")`` in :data:`STAGES` order.

    Raises:
      ValueError: an unknown or repeated stage name, or no stage.
    """
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    bad = [s for s in names if s not in STAGES]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"--stages: expected a comma-separated subset of {','.join(STAGES)}, got {text!r}")
    return tuple(s for s in STAGES if s in names)


# ------------------------------------------------------------------------------------------------ tokenizer
def prepare_data(cfg: ChimeraConfig, vocab_size: int, out: Path, cache_dir: Path, *, seed: int,
                 reuse_run_tokenizer: bool):
    """The corpus, the run's tokenizer and the tokenized splits.

    The tokenizer is a SentencePiece BPE trained on the corpus's training split plus ``cfg.tokenizer_problems``
    generated reasoning problems (:func:`experiments.posttrain.tokenizer_texts`: English and Hindi arithmetic
    and Countdown, ASCII and Devanagari numerals), cached under ``cache_dir/tokenizers`` by corpus hash,
    vocabulary size and a hash of the problem texts, and copied to ``out/tokenizer.model``.
    ``reuse_run_tokenizer``: load ``out/tokenizer.model`` when it exists (a resumed or continued run).

    Returns:
      ``(corpus, tokenizer, train_docs, val_docs)``.

    Raises:
      ValueError: the tokenizer's vocabulary differs from ``vocab_size``.
    """
    from experiments.posttrain import tokenizer_texts
    from mani_jax.data import load_corpus, tokenize_corpus
    from mani_jax.tokenizer import Tokenizer, train_tokenizer

    print(f"[chimera] corpus {cfg.corpus!r} (cache {cache_dir})", flush=True)
    corpus = load_corpus(cfg.corpus, cache_dir)
    tok_path = out / "tokenizer.model"
    if reuse_run_tokenizer and tok_path.exists():
        tokenizer = Tokenizer.load(tok_path)
    else:
        extra = tokenizer_texts(cfg.tokenizer_problems, seed=seed + _SEED_TOKENIZER) if cfg.tokenizer_problems else []
        name = f"{corpus.content_hash()[:16]}-v{vocab_size}"
        if extra:  # the same name as experiments.common.prepare_corpus without problems
            name += "-r" + hashlib.sha256("\n\n".join(extra).encode("utf-8")).hexdigest()[:12]
        cached = cache_dir / "tokenizers" / name
        if not cached.with_suffix(".model").exists():
            print(f"[chimera] training a {vocab_size}-token SentencePiece BPE tokenizer on the training split"
                  f"{f' and {len(extra)} generated problems' if extra else ''}", flush=True)
            cached.parent.mkdir(parents=True, exist_ok=True)
            train_tokenizer([*(d.text for d in corpus.train), *extra], vocab_size, cached, seed=seed)
        shutil.copyfile(cached.with_suffix(".model"), tok_path.with_suffix(".tmp"))
        tok_path.with_suffix(".tmp").replace(tok_path)
        tokenizer = Tokenizer.load(tok_path)
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model expects {vocab_size}")
    train_docs, val_docs = tokenize_corpus(corpus, tokenizer, cache_dir)
    print(f"[chimera] {len(train_docs)} training docs ({sum(len(d) for d in train_docs):,} tokens), "
          f"{len(val_docs)} validation docs ({sum(len(d) for d in val_docs):,} tokens)", flush=True)
    return corpus, tokenizer, train_docs, val_docs


# -------------------------------------------------------------------------------------------------- the run
def run(cfg: ChimeraConfig, out: Path, *, preset: str, stages: tuple[str, ...] | str = STAGES,
        model_overrides: list[str] = (), resume: bool = False, cache_dir: Path | None = None) -> dict:
    """Run ``stages`` of the experiment into ``out`` and return the updated summary (also written to
    ``out/summary.json``).

    Raises:
      ValueError: bad stage names; ``out`` holds pretraining checkpoints but neither ``resume`` nor a later
        stage alone was asked for; a later stage's input checkpoint is missing.
    """
    from mani_jax.models import get_config

    stages = parse_stages(stages)
    t_start = time.perf_counter()
    cache_dir = Path(cache_dir or default_cache_dir())
    out.mkdir(parents=True, exist_ok=True)
    if "pretrain" in stages:
        if not resume and (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
            raise ValueError(f"--out {out}: holds checkpoints of an earlier run; pass --resume or pick a new RUN_DIR")
        model_cfg = get_config(cfg.model_preset, list(model_overrides))
        # Longest sequence any stage feeds the model (max_seq_len has no parameters: it only bounds inputs).
        need = max(cfg.train.seq_len, cfg.sft.seq_len, cfg.dpo.seq_len)
        if need > model_cfg.max_seq_len:
            model_cfg = dataclasses.replace(model_cfg, max_seq_len=need)
        summary = {}
    else:
        if model_overrides:
            raise ValueError("model.* overrides apply only when the pretrain stage runs")
        summary, model_cfg = _read_summary(out), None
        if summary.get("preset") != preset:
            raise ValueError(f"--preset {preset}: {out} was pretrained with --preset {summary.get('preset')}; pass "
                             "that preset (change stage settings with --set)")
    summary.setdefault("accuracy", {})
    summary["stage_seconds"] = dict(summary.get("stage_seconds", {}))
    state: dict = {}  # what one stage hands the next in this process: model, tokenizer, engine, ...
    with _compilation_cache(cache_dir / "jax_compile"):
        _run_stages(cfg, out, preset, stages, model_cfg, resume, cache_dir, summary, state)

    import jax

    summary.update({"preset": preset, "stages_run": list(stages), "wall_seconds": time.perf_counter() - t_start,
                    "total_stage_seconds": float(sum(summary["stage_seconds"].values())),
                    "device": str(jax.devices()[0]), "jax_version": jax.__version__})
    write_json_atomic(out / "summary.json", summary)
    _print_table(summary)
    return summary


@contextlib.contextmanager
def _compilation_cache(path: Path):
    """JAX's persistent compilation cache in ``path`` for the duration of the run (unless the user configured
    one): every inference engine builds its own jitted programs, and the cache turns the second and later
    engines' compilations (same shapes, weights are arguments) into loads (about 35 s -> 7 s each on 2 cores)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    if jax.config.jax_compilation_cache_dir:
        yield
        return
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    path.mkdir(parents=True, exist_ok=True)
    for k, v in zip(keys, (str(path), 0.0, 1)):
        jax.config.update(k, v)
    compilation_cache.reset_cache()  # JAX decides once per process whether to use a cache: decide again
    try:
        yield
    finally:
        for k, v in old.items():
            jax.config.update(k, v)
        compilation_cache.reset_cache()


def _run_stages(cfg, out, preset, stages, model_cfg, resume, cache_dir, summary, state) -> None:
    for stage in stages:
        t0 = time.perf_counter()
        _forget_after(summary, stage)
        if stage == "pretrain":
            summary.update(pretrain_stage(cfg, out, preset, model_cfg, resume, cache_dir, state))
        elif stage == "sft":
            summary["sft"] = sft_stage(cfg, out, summary, cache_dir, state)
        elif stage == "dpo":
            summary["dpo"] = dpo_stage(cfg, out, summary, cache_dir, state)
        else:
            summary.update(export_all_stage(cfg, out, preset, summary, cache_dir, state))
        summary["stage_seconds"][stage] = time.perf_counter() - t0
        summary["stages_completed"] = [s for s in STAGES if s in summary["stage_seconds"]]
        write_json_atomic(out / "summary.json", summary)  # after every stage: a crash keeps what finished
        _plot_accuracy(summary, out)


#: Summary keys each stage writes (dropped when an earlier stage runs again).
_STAGE_KEYS = {"pretrain": (), "sft": ("sft",), "dpo": ("dpo",), "export": ("gguf", "chat_export")}
_STAGE_ACCURACY = {"pretrain": "base_few_shot", "sft": "sft", "dpo": "dpo", "export": "llama_cpp"}


def _forget_after(summary: dict, stage: str) -> None:
    """Drop the summary entries of ``stage`` and of every stage after it (they are about to be recomputed or
    no longer follow from the new result)."""
    for s in STAGES[STAGES.index(stage):]:
        for k in _STAGE_KEYS[s]:
            summary.pop(k, None)
        summary["accuracy"].pop(_STAGE_ACCURACY[s], None)
        summary["stage_seconds"].pop(s, None)


def _read_summary(out: Path) -> dict:
    path = out / "summary.json"
    if not path.is_file():
        raise ValueError(f"--out {out}: no summary.json; run the earlier stages first (e.g. --stages pretrain)")
    return json.loads(path.read_text())


def _latest_stage(summary: dict, before: str) -> str:
    """The last trained stage before ``before`` whose results are in the summary."""
    done = [s for s in ("pretrain", "sft", "dpo") if s in summary.get("stage_seconds", {})]
    done = [s for s in done if STAGES.index(s) < STAGES.index(before)]
    if not done:
        raise ValueError(f"stage {before!r}: no earlier stage has finished in this run directory")
    return done[-1]


def _load_model(out: Path, stage: str, summary: dict, state: dict):
    """The model at the end of ``stage`` (from ``state`` when this process just trained it, else from its
    checkpoint) and the run's tokenizer."""
    from flax import nnx

    from mani_jax.models import HybridLM, config_from_dict
    from mani_jax.tokenizer import Tokenizer
    from mani_jax.train import restore_checkpoint

    if state.get("stage") == stage:
        return state["model"], state["tokenizer"]
    if stage not in summary.get("stage_seconds", {}):
        raise ValueError(f"the {stage} stage has not finished in {out} (or an earlier stage ran again since): "
                         f"run --stages {stage} first")
    ckpt = out / STAGE_DIRS[stage] / "checkpoints"
    if not ckpt.is_dir():
        raise ValueError(f"stage {stage!r}: no checkpoint in {ckpt}; run that stage first")
    model = HybridLM(config_from_dict(json.loads((out / "model_config.json").read_text())), rngs=nnx.Rngs(0))
    restore_checkpoint(ckpt, model)
    print(f"[chimera] loaded the {stage} model from {ckpt}", flush=True)
    return model, Tokenizer.load(out / "tokenizer.model")


def _heldout(cfg: ChimeraConfig):
    """The held-out evaluation set: ``eval_per_difficulty`` problems per step count, or all there are.

    Small cells have fewer held-out problems than asked for (one step with one-digit operands: 10 exist, since
    a tenth of a space of ~160 signatures is held out); for those the largest count
    :func:`~mani_jax.data.reasoning.heldout_problems` can supply is found by bisection (the set for ``n`` extends
    the set for ``n - 1``, so the result is a deterministic prefix)."""
    return list(_heldout_cached(cfg.eval_per_difficulty, tuple(cfg.reasoning_steps), tuple(cfg.reasoning_digits)))


@functools.lru_cache(maxsize=8)
def _heldout_cached(n: int, steps: tuple[int, ...], digits: tuple[int, ...]) -> tuple:
    from mani_jax.data.reasoning import heldout_problems

    out = []
    for s in steps:
        try:
            out += heldout_problems(n, steps=(s,), digits=digits)
            continue
        except ValueError:
            pass
        lo, hi = 0, n  # lo problems are available, hi are not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            try:
                heldout_problems(mid, steps=(s,), digits=digits)
                lo = mid
            except ValueError:
                hi = mid
        if lo:
            out += heldout_problems(lo, steps=(s,), digits=digits)
    return tuple(out)


def _write_evals(out: Path, name: str, problems, result: dict) -> None:
    """``out/evals/<name>.jsonl``: one record per held-out problem (question, answer, reply, correctness)."""
    d = out / "evals"
    d.mkdir(exist_ok=True)
    tmp = d / f"{name}.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i, p in enumerate(problems):
            f.write(json.dumps({"signature": p.signature, "steps": p.steps, "digits": p.digits,
                                "question": p.question, "answer": p.answer,
                                "reply": result["completions"][i], "correct": result["correct"][i],
                                "reply_tokens": result["lengths"][i], "ended": result["ended"][i]},
                               ensure_ascii=False) + "\n")
    tmp.replace(d / f"{name}.jsonl")


def _read_evals(out: Path, name: str, problems) -> list[bool]:
    """Per-problem correctness of an earlier stage's evaluation, in ``problems`` order.

    Raises:
      ValueError: the file is missing or was written for another held-out set.
    """
    path = out / "evals" / f"{name}.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: missing; run the {name} stage first")
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if [r["signature"] for r in recs] != [p.signature for p in problems]:
        raise ValueError(f"{path}: was written for a different held-out set (change of reasoning_* or "
                         "eval_per_difficulty); re-run that stage")
    return [bool(r["correct"]) for r in recs]


def _chat_accuracy(cfg, engine, tokenizer, problems, out: Path, name: str) -> tuple[dict, dict]:
    from experiments.posttrain import accuracy_table, chat_eval

    res = chat_eval(engine, tokenizer, problems, max_new_tokens=cfg.max_new_tokens)
    _write_evals(out, name, problems, res)
    table = accuracy_table(problems, res["correct"], res["lengths"])
    table.update({"ended_fraction": float(sum(res["ended"]) / max(len(problems), 1)), "seconds": res["seconds"]})
    print(f"[chimera] {name}: held-out exact match {table['accuracy']:.1%} (n={table['n']}; by steps "
          + ", ".join(f"{k}: {v['accuracy']:.0%}" for k, v in table["by_steps"].items())
          + f"), mean reply {table['mean_length']:.1f} tokens, {res['seconds']:.0f} s", flush=True)
    return table, res


# ------------------------------------------------------------------------------------------------ pretrain
def pretrain_stage(cfg: ChimeraConfig, out: Path, preset: str, model_cfg, resume: bool, cache_dir: Path,
                   state: dict) -> dict:
    """Tokenizer, pretraining, held-out loss, samples and the base model's few-shot reasoning accuracy.
    Returns the summary's pretraining keys (including ``accuracy.base_few_shot``)."""
    import jax
    from flax import nnx

    from experiments.posttrain import accuracy_table, engine_for, few_shot_eval
    from mani_jax.data import make_eval_batches, make_train_iterator
    from mani_jax.chat import encode_prompt
    from mani_jax.data.reasoning import generate_problems
    from mani_jax.inference import generate
    from mani_jax.models import HybridLM, count_params
    from mani_jax.models.flops import forward_flops_per_token, measure_matmul_flops, train_flops_per_token
    from mani_jax.train import evaluate, train

    t_start = time.perf_counter()
    tcfg = cfg.train
    # 1. Corpus and tokenizer (trained on the training split and generated problems; cached).
    corpus, tokenizer, train_docs, val_docs = prepare_data(cfg, model_cfg.vocab_size, out, cache_dir,
                                                           seed=tcfg.seed, reuse_run_tokenizer=resume)
    n_train_tokens = sum(len(d) for d in train_docs)
    unigram = unigram_loss(train_docs, val_docs, tokenizer.vocab_size)
    # max_seq_len has no parameters (it bounds inputs): make room for the longest held-out chat + its reply.
    problems = _heldout(cfg)
    need = max(max(len(encode_prompt(tokenizer, p.messages(with_solution=False))), _few_shot_len(tokenizer, p, []))
               for p in problems) + cfg.max_new_tokens
    if need > model_cfg.max_seq_len:
        model_cfg = dataclasses.replace(model_cfg, max_seq_len=need)

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

    # 5. The base model's few-shot exact match on the held-out reasoning problems.
    shots = generate_problems(cfg.few_shot, steps=(1, 2), digits=(1,), seed=tcfg.seed + _SEED_SHOTS) \
        if cfg.few_shot else []
    n_new = min(cfg.max_new_tokens, 64)
    engine = engine_for(model, cfg.eval_batch)
    # As many exemplars as fit: the prompt + reply must stay within max_seq_len.
    fits = max((k for k in range(len(shots), -1, -1)
                if all(_few_shot_len(tokenizer, p, shots[:k]) + n_new <= model_cfg.max_seq_len for p in problems)),
               default=0)
    res = few_shot_eval(engine, tokenizer, problems, shots[:fits], max_new_tokens=n_new)
    _write_evals(out, "base_few_shot", problems, res)
    few = accuracy_table(problems, res["correct"], res["lengths"])
    few.update({"shots": fits, "seconds": res["seconds"]})
    print(f"[chimera] base model, {fits}-shot: held-out exact match {few['accuracy']:.1%} (n={few['n']})", flush=True)
    state.update(stage="pretrain", model=model, tokenizer=tokenizer, val_docs=val_docs)

    n_val_targets = sum(len(d) - 1 for d in val_docs)
    val_bits_per_char = val_loss * n_val_targets / corpus.num_chars("validation") / math.log(2)
    return {
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
        "pretrain_seconds": time.perf_counter() - t_start,
        "config": _config_dict(cfg),
        "model_config": dataclasses.asdict(model_cfg),
        "samples": samples,
        "accuracy": {"base_few_shot": few},
        "heldout": {"family": "arithmetic", "lang": "en", "steps": list(cfg.reasoning_steps),
                    "digits": list(cfg.reasoning_digits), "per_difficulty_asked": cfg.eval_per_difficulty,
                    "n": len(problems), "per_difficulty": {str(s): sum(p.steps == s for p in problems)
                                                           for s in cfg.reasoning_steps}},
        "tokenizer_problems": cfg.tokenizer_problems,
        "metrics_path": "metrics.jsonl",
        "plot": "loss_curve.png",
    }


def _few_shot_len(tokenizer, problem, shots) -> int:
    from mani_jax.data.reasoning import few_shot_prompt

    return len(tokenizer.encode(few_shot_prompt(problem, shots))) + 1


def _config_dict(cfg: ChimeraConfig) -> dict:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------------- SFT
def sft_stage(cfg: ChimeraConfig, out: Path, summary: dict, cache_dir: Path, state: dict) -> dict:
    """Supervised fine-tuning from the pretrained checkpoint: generated arithmetic chats, loss on the assistant
    tokens only (``target_masks``), packed with segment ids; held-out loss on the assistant tokens and greedy
    held-out exact match. Writes ``RUN_DIR/sft`` (checkpoint, metrics, loss curve)."""
    from experiments.posttrain import engine_for
    from mani_jax.data import make_eval_batches, make_train_iterator, tokenize_chats
    from mani_jax.data.reasoning import generate_problems
    from mani_jax.train import evaluate, train

    model, tokenizer = _load_model(out, "pretrain", summary, state)
    tc = cfg.sft
    sft_dir = out / STAGE_DIRS["sft"]
    if sft_dir.exists():
        shutil.rmtree(sft_dir)
    problems = _heldout(cfg)
    train_problems = generate_problems(cfg.sft_problems, steps=cfg.reasoning_steps, digits=cfg.reasoning_digits,
                                       seed=tc.seed + _SEED_SFT)
    docs, masks = tokenize_chats(tokenizer, [p.messages() for p in train_problems], max_tokens=tc.seq_len + 1,
                                 overflow="drop")
    val_docs, val_masks = tokenize_chats(tokenizer, [p.messages() for p in problems], max_tokens=tc.seq_len + 1,
                                         overflow="drop")
    n_targets = int(sum(int(m[1:].sum()) for m in masks))
    print(f"[chimera] SFT: {len(docs)} chats ({sum(len(d) for d in docs):,} tokens, {n_targets:,} assistant "
          f"targets); {tc.steps} steps of {tc.batch_size}x{tc.seq_len} tokens", flush=True)
    train_iter = make_train_iterator(docs, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=tc.seed,
                                     target_masks=masks)
    val_batches = make_eval_batches(val_docs, seq_len=tc.seq_len, batch_size=tc.batch_size, target_masks=val_masks)
    tc = dataclasses.replace(tc, checkpoint_every=tc.checkpoint_every or tc.steps)
    loss_before = evaluate(model, val_batches, tc.compute_dtype)
    result = train(model, tc, train_iter, out_dir=sft_dir,
                   eval_fn=lambda m: evaluate(m, val_batches, tc.compute_dtype))
    table, _ = _chat_accuracy(cfg, engine := engine_for(model, cfg.eval_batch), tokenizer, problems, out, "sft")
    summary["accuracy"]["sft"] = table
    state.update(stage="sft", model=model, tokenizer=tokenizer, engine=engine)
    return {
        "train_problems": cfg.sft_problems, "chats": len(docs), "chat_tokens": int(sum(len(d) for d in docs)),
        "assistant_targets": n_targets, "steps": result["final_step"], "train_tokens": result["train_tokens"],
        "epochs": result["train_tokens"] / max(sum(len(d) for d in docs), 1),
        "tokens_per_second": result["tokens_per_second"], "train_seconds": result["wall_seconds"],
        "final_train_loss": result["final_loss_avg"], "heldout_assistant_loss_before": loss_before,
        "heldout_assistant_loss": result["final_eval_loss"], "config": dataclasses.asdict(tc),
        "metrics_path": "sft/metrics.jsonl", "plot": "sft/loss_curve.png",
    }


# ----------------------------------------------------------------------------------------------------- DPO
def dpo_stage(cfg: ChimeraConfig, out: Path, summary: dict, cache_dir: Path, state: dict) -> dict:
    """DPO from the SFT checkpoint: on-policy pairs sampled with the engine, the frozen SFT model as reference,
    ``dpo_beta``; held-out exact match, paired difference to SFT and KL to the reference. Writes
    ``RUN_DIR/dpo`` (checkpoint, metrics, ``dpo_curve.png``)."""
    from flax import nnx

    from experiments.posttrain import engine_for, paired_difference, policy_kl, sample_preference_pairs
    from mani_jax.data.reasoning import generate_problems
    from mani_jax.train import Checkpointer
    from mani_jax.train.preference import reference_logprobs, train_dpo

    ref, tokenizer = _load_model(out, "sft", summary, state)
    engine = state.get("engine") if state.get("stage") == "sft" else None
    engine = engine or engine_for(ref, cfg.eval_batch)
    dpo_dir = out / STAGE_DIRS["dpo"]
    if dpo_dir.exists():
        shutil.rmtree(dpo_dir)
    problems = _heldout(cfg)
    sft_correct = _read_evals(out, "sft", problems)
    tc = cfg.dpo

    # 1. On-policy pairs from the SFT model.
    prompts = generate_problems(cfg.dpo_problems, steps=cfg.dpo_problem_steps, digits=cfg.reasoning_digits,
                                seed=tc.seed + _SEED_DPO)
    pairs, pair_stats = sample_preference_pairs(
        engine, tokenizer, prompts, n_samples=cfg.dpo_samples, temperature=cfg.dpo_temperature,
        max_new_tokens=cfg.max_new_tokens, seed=tc.seed + _SEED_DPO, max_pairs_per_problem=cfg.dpo_pairs_per_problem,
        gold_fallback=cfg.dpo_gold_fallback)
    print(f"[chimera] DPO: {pair_stats['samples']} samples at T={cfg.dpo_temperature} on {len(prompts)} problems "
          f"({pair_stats['sample_accuracy']:.0%} correct; {pair_stats['mixed']} problems mixed, "
          f"{pair_stats['all_correct']} all correct, {pair_stats['all_wrong']} all wrong) -> {len(pairs)} pairs "
          f"({pair_stats['gold_pairs']} with the reference solution as chosen) in {pair_stats['seconds']:.0f} s",
          flush=True)
    if len(pairs) < tc.batch_size:
        raise ValueError(f"DPO: only {len(pairs)} preference pairs (fewer than dpo.batch_size={tc.batch_size}); "
                         "raise dpo_problems / dpo_samples or dpo_temperature")
    seq_len = -(-max(p.length for p in pairs) // 16) * 16  # rows hold length - 1 <= seq_len tokens
    steps = tc.steps
    if cfg.dpo_epochs > 0:  # a number of passes over the pairs, whatever their count (capped by dpo.steps)
        steps = min(tc.steps, max(tc.warmup_steps + 1, math.ceil(cfg.dpo_epochs * len(pairs) / tc.batch_size)))
    tc = dataclasses.replace(tc, seq_len=min(seq_len, ref.config.max_seq_len), steps=steps)
    ref_c, ref_r = reference_logprobs(ref, pairs, tc.seq_len, batch_size=tc.batch_size, pad_id=tokenizer.pad_id)

    # 2. DPO on a copy of the SFT model (own buffers: the step donates them).
    policy = nnx.clone(ref, arrays=True)
    result = train_dpo(policy, pairs, ref_c, ref_r, tc, out_dir=dpo_dir, beta=cfg.dpo_beta, pad_id=tokenizer.pad_id)
    ckpt = Checkpointer(dpo_dir / "checkpoints")
    try:
        ckpt.save(tc.steps, policy, extra={"pairs": len(pairs)})
    finally:
        ckpt.close()
    fin = result["final"]
    print(f"[chimera] DPO: {tc.steps} steps ({result['epochs']:.1f} epochs over the pairs) in "
          f"{result['wall_seconds']:.0f} s; loss {result['first']['loss']:.3f} -> {fin['loss']:.3f}, reward margin "
          f"{fin['reward_margin']:.3f}, reward accuracy {fin['reward_accuracy']:.2f}", flush=True)

    # 3. Held-out accuracy, paired difference to SFT, KL to the reference.
    dpo_engine = engine_for(policy, cfg.eval_batch)
    table, res = _chat_accuracy(cfg, dpo_engine, tokenizer, problems, out, "dpo")
    summary["accuracy"]["dpo"] = table
    diff = paired_difference(sft_correct, res["correct"], seed=tc.seed)
    print(f"[chimera] DPO - SFT: {diff['difference']:+.1%} (95% CI {diff['ci_low']:+.1%} .. {diff['ci_high']:+.1%}, "
          f"McNemar p = {diff['mcnemar_p']:.3g}; {diff['b_only']} fixed, {diff['a_only']} broken)", flush=True)
    kl_problems = generate_problems(cfg.kl_problems, steps=cfg.reasoning_steps, digits=cfg.reasoning_digits,
                                    seed=tc.seed + _SEED_KL)
    kl = policy_kl(policy, ref, dpo_engine, tokenizer, kl_problems, max_new_tokens=cfg.max_new_tokens,
                   seed=tc.seed + _SEED_KL, batch_size=tc.batch_size)
    print(f"[chimera] KL(DPO || SFT) = {kl['kl_mean']:.4f} +- {kl['kl_sem']:.4f} nats per reply "
          f"({kl['kl_per_token']:.5f} per token, n={kl['n']})", flush=True)
    state.update(stage="dpo", model=policy, tokenizer=tokenizer, engine=dpo_engine)
    return {
        "beta": cfg.dpo_beta, "pairs": pair_stats, "steps": tc.steps, "epochs": result["epochs"],
        "seq_len": tc.seq_len, "train_seconds": result["wall_seconds"],
        "loss_first": result["first"]["loss"], "loss_final": fin["loss"],
        "reward_margin": fin["reward_margin"], "reward_accuracy": fin["reward_accuracy"],
        "rewards_chosen": fin["rewards_chosen"], "rewards_rejected": fin["rewards_rejected"],
        "logratio_chosen": fin["logratio_chosen"], "logratio_rejected": fin["logratio_rejected"],
        "kl_to_reference": kl, "vs_sft": diff, "config": dataclasses.asdict(tc),
        "metrics_path": "dpo/metrics.jsonl", "plot": "dpo/dpo_curve.png",
    }


# -------------------------------------------------------------------------------------------------- export
def export_all_stage(cfg: ChimeraConfig, out: Path, preset: str, summary: dict, cache_dir: Path,
                     state: dict) -> dict:
    """Export the last trained model (DPO, else SFT, else the base model) at each of ``gguf_quants`` and compare
    with JAX on a held-out passage; for a chat model also answer the held-out problems in llama.cpp through
    ``create_chat_completion`` from the ``chat_gguf_quant`` file. Returns the summary keys ``gguf`` and
    ``chat_export`` (and sets ``accuracy.llama_cpp``)."""
    from experiments.posttrain import accuracy_table, llama_cpp_chat_eval, paired_difference

    source = _latest_stage(summary, "export")
    model, tokenizer = _load_model(out, source, summary, state)
    if not cfg.gguf_quants:
        return {"gguf": [], "chat_export": None}
    val_docs = state.get("val_docs")
    if val_docs is None:
        from mani_jax.data import load_corpus, tokenize_corpus

        val_docs = tokenize_corpus(load_corpus(cfg.corpus, cache_dir), tokenizer, cache_dir)[1]
    gguf_results = export_stage(cfg, model, tokenizer, val_docs, out, preset, tag=source)
    chat = None
    if source in ("sft", "dpo") and cfg.chat_gguf_quant:
        g = next((g for g in gguf_results if g["quant"] == cfg.chat_gguf_quant), None)
        if g is None:
            raise ValueError(f"chat_gguf_quant={cfg.chat_gguf_quant!r} is not one of gguf_quants={cfg.gguf_quants}")
        problems = _heldout(cfg)
        print(f"[chimera] llama.cpp: {len(problems)} held-out problems through create_chat_completion "
              f"({g['path']}, greedy)", flush=True)
        res = llama_cpp_chat_eval(out / g["path"], problems, max_tokens=cfg.max_new_tokens,
                                  n_ctx=model.config.max_seq_len)
        _write_evals(out, "llama_cpp", problems, res)
        table = accuracy_table(problems, res["correct"], res["lengths"])
        table.update({"seconds": res["seconds"], "quant": cfg.chat_gguf_quant, "model_stage": source})
        summary["accuracy"]["llama_cpp"] = table
        jax_recs = [json.loads(line) for line in (out / "evals" / f"{source}.jsonl").read_text(
            encoding="utf-8").splitlines() if line.strip()]
        if [r["signature"] for r in jax_recs] != [p.signature for p in problems]:
            raise ValueError(f"evals/{source}.jsonl was written for a different held-out set; re-run {source}")
        jax_correct = [bool(r["correct"]) for r in jax_recs]
        same_text = sum(r["reply"] == t for r, t in zip(jax_recs, res["completions"]))
        same_verdict = sum(a == b for a, b in zip(jax_correct, res["correct"]))
        diff = paired_difference(jax_correct, res["correct"], seed=cfg.train.seed)
        chat = {"path": g["path"], "quant": g["quant"], "model_stage": source, "chat_format": res["chat_format"],
                "jax_accuracy": float(sum(jax_correct) / len(problems)), "llama_cpp_accuracy": table["accuracy"],
                "identical_replies": same_text / len(problems), "same_verdict": same_verdict / len(problems),
                "llama_cpp_minus_jax": diff, "seconds": res["seconds"]}
        print(f"[chimera] llama.cpp ({g['quant']}): exact match {table['accuracy']:.1%} vs JAX "
              f"{chat['jax_accuracy']:.1%}; identical replies {chat['identical_replies']:.1%}, same verdict "
              f"{chat['same_verdict']:.1%}; {res['seconds']:.0f} s", flush=True)
    return {"gguf": gguf_results, "chat_export": chat}


def export_stage(cfg: ChimeraConfig, model, tokenizer, val_docs, out: Path, preset: str, tag: str = "pretrain"
                 ) -> list[dict]:
    """Export ``model`` at each of ``cfg.gguf_quants`` (with :data:`mani_jax.chat.CHAT_TEMPLATE` as
    ``tokenizer.chat_template``), load each file in llama.cpp and compare with JAX.

    The passage is the start of the first held-out play (BOS included), at most ``gguf_passage_tokens``
    tokens and short enough that ``gguf_greedy_tokens`` greedy tokens still fit in ``max_seq_len``.
    """
    from mani_jax.chat import CHAT_TEMPLATE
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
        print(f"[chimera] exporting the {tag} model to {path.name} and running it in llama.cpp", flush=True)
        export_gguf(model, tokenizer, path, quant=quant, name=f"chimera-{preset}-{tag}", chat_template=CHAT_TEMPLATE)
        stats = compare_with_llama_cpp(model, path, passage, n_greedy=n_greedy)
        results.append({
            "path": path.name, "quant": quant, "size_bytes": path.stat().st_size, "model_stage": tag,
            **{k: stats[k] for k in ("max_rel_logit_diff", "top1_agreement", "mean_kl", "greedy_match_tokens",
                                     "prompt_tokens_per_second", "decode_tokens_per_second",
                                     "time_to_first_token_s")},
            "n_greedy": n_greedy, "passage_tokens": n_passage,
            "llama_cpp_continuation": tokenizer.decode([t for t in stats["llama_greedy_tokens"]
                                                        if t != tokenizer.eos_id]),
        })
    return results


def _plot_accuracy(summary: dict, out: Path) -> None:
    from experiments.posttrain import plot_accuracy

    names = {"base_few_shot": "base (few-shot)", "sft": "SFT", "dpo": "DPO", "llama_cpp": "llama.cpp"}
    stages = {names[k]: summary["accuracy"][k] for k in names if k in summary.get("accuracy", {})}
    if stages:
        plot_accuracy(stages, out / "accuracy_by_difficulty.png")
        summary["accuracy_plot"] = "accuracy_by_difficulty.png"


def _print_table(s: dict) -> None:
    rows = []
    if "params" in s:
        rows += [
            ("preset", s["preset"]), ("params", f"{s['params']:,}"), ("train tokens", f"{s['train_tokens']:,}"),
            ("tokens/s", f"{s['tokens_per_second']:.0f}" if s["tokens_per_second"] else "-"),
            ("val loss (nats/token)", f"{s['val_loss']:.4f}"), ("unigram val loss", f"{s['unigram_val_loss']:.4f}"),
            ("margin below unigram", f"{s['val_loss_margin_below_unigram']:.4f}"),
            ("val bits/char", f"{s['val_bits_per_char']:.4f}"),
            ("MFU (vs f32 matmul peak)", f"{100 * s['mfu']:.1f}% of {s['matmul_peak_flops'] / 1e9:.0f} GFLOP/s"
             if s["mfu"] else "-"),
        ]
    rows += [(f"{k} seconds", f"{v:.0f}") for k, v in s.get("stage_seconds", {}).items()]
    rows.append(("wall time", f"{s['wall_seconds']:.0f} s"))
    w = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"  {k:<{w}}  {v}" for k, v in rows))
    acc = s.get("accuracy", {})
    if acc:
        diffs = sorted({d for t in acc.values() for d in t["by_steps"]}, key=int)
        print("\n  held-out exact match (English arithmetic; difficulty = steps)")
        print(f"  {'stage':<16} {'all':>6} " + " ".join(f"{d + ' st':>6}" for d in diffs) + f" {'reply tok':>9}")
        for k in ("base_few_shot", "sft", "dpo", "llama_cpp"):
            if k in acc:
                t = acc[k]
                print(f"  {k:<16} {t['accuracy']:6.1%} " + " ".join(
                    f"{t['by_steps'][d]['accuracy']:6.1%}" if d in t["by_steps"] else f"{'-':>6}" for d in diffs)
                    + f" {t.get('mean_length', float('nan')):9.1f}")
    if s.get("dpo"):
        d, v = s["dpo"], s["dpo"]["vs_sft"]
        gold = f" ({d['pairs']['gold_pairs']} with the reference as chosen)" if d["pairs"].get("gold_pairs") else ""
        print(f"\n  DPO (beta {d['beta']}): {d['pairs']['pairs']} pairs{gold}, reward margin {d['reward_margin']:.3f}, "
              f"reward accuracy {d['reward_accuracy']:.2f}, KL to SFT {d['kl_to_reference']['kl_mean']:.4f} nats/reply")
        print(f"  DPO - SFT on the held-out set: {v['difference']:+.1%} (95% paired-bootstrap CI {v['ci_low']:+.1%} .. "
              f"{v['ci_high']:+.1%}; McNemar p = {v['mcnemar_p']:.3g})")
    if s.get("chat_export"):
        c = s["chat_export"]
        print(f"\n  llama.cpp chat ({c['path']}): {c['llama_cpp_accuracy']:.1%} vs JAX {c['jax_accuracy']:.1%}; "
              f"identical replies {c['identical_replies']:.1%}, same verdict {c['same_verdict']:.1%}")
    if s.get("gguf"):
        print("\n  GGUF in llama.cpp (vs JAX on a held-out passage)")
        print(f"  {'file':<26} {'MiB':>7} {'rel max dlogit':>15} {'top-1':>7} {'KL':>9} {'greedy':>7} "
              f"{'TTFT s':>7} {'decode tok/s':>13}")
        for g in s["gguf"]:
            print(f"  {g['path']:<26} {g['size_bytes'] / 2**20:7.2f} {g['max_rel_logit_diff']:15.2e} "
                  f"{g['top1_agreement']:7.3f} {g['mean_kl']:9.2e} {g['greedy_match_tokens']:>3}/{g['n_greedy']:<3} "
                  f"{g['time_to_first_token_s']:7.3f} {g['decode_tokens_per_second']:13.1f}")
    for smp in s.get("samples", []) if "pretrain" in s.get("stages_run", []) else []:
        print(f"\n--- {smp['prompt']!r}\n{smp['prompt']}{smp['completion']}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.chimera", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help=f"one of {sorted(PRESETS)} (default tiny)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated stages to run, in order (default {','.join(STAGES)})")
    p.add_argument("--steps", type=int, default=None, help="override the preset's number of pretraining steps")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/chimera-<preset>)")
    p.add_argument("--resume", action="store_true", help="continue pretraining from the latest checkpoint in --out")
    p.add_argument("--corpus", default=None, help="'shakespeare' (default), a directory of .txt files, or a .jsonl")
    p.add_argument("--cache-dir", type=Path, default=None, help="downloads and token caches (default "
                   "$MANI_JAX_CACHE or ~/.cache/mani_jax)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run field (e.g. learning_rate=1e-3), a model field (model.d_state=16), an "
                        "experiment field (dpo_beta=0.2) or a stage's training field (sft.steps=400)")
    args = p.parse_args(argv)
    cfg = get_preset(PRESETS, args.preset, "experiment preset")
    stages = parse_stages(args.stages)
    model_ov, exp_ov, train_ov, stage_ov = _split_overrides(args.overrides)
    if args.steps is not None:
        train_ov.append(f"steps={args.steps}")
    if args.corpus is not None:
        exp_ov.append(f"corpus={args.corpus}")
    cfg = apply_overrides(cfg, exp_ov)
    cfg = dataclasses.replace(cfg, train=apply_overrides(cfg.train, train_ov),
                              sft=apply_overrides(cfg.sft, stage_ov["sft"]),
                              dpo=apply_overrides(cfg.dpo, stage_ov["dpo"]))
    out = args.out or Path("runs") / f"chimera-{args.preset}"
    return run(cfg, out, preset=args.preset, stages=stages, model_overrides=model_ov, resume=args.resume,
               cache_dir=args.cache_dir)


if __name__ == "__main__":
    main()
