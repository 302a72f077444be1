"""Post-training helpers of ``experiments.chimera``: reasoning evaluation (JAX engine and llama.cpp), on-policy
preference pairs, the policy-to-reference KL, paired statistics and the accuracy plot.

Every evaluation decodes greedily and scores a completion with :func:`mani_jax.data.reasoning.check_answer`
(exact match of the last ``Answer:`` line). Chat models get the problem as the user turn of
:data:`mani_jax.chat.CHAT_TEMPLATE` and stop at ``<|end|>``; base models get
:func:`~mani_jax.data.reasoning.few_shot_prompt` and their continuation is cut at the first blank line.
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import numpy as np

from mani_jax.chat import END_TOKEN, encode_prompt
from mani_jax.data.reasoning import (
    FEW_SHOT_STOP,
    Problem,
    check_answer,
    few_shot_prompt,
    generate_problems,
)

__all__ = [
    "tokenizer_texts",
    "engine_for",
    "chat_eval",
    "few_shot_eval",
    "accuracy_table",
    "paired_difference",
    "sample_preference_pairs",
    "policy_kl",
    "llama_cpp_chat_eval",
    "plot_accuracy",
]


# ---------------------------------------------------------------------------------------------- tokenizer
def tokenizer_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` generated problems rendered as text (question, then worked solution) for tokenizer training:
    half English arithmetic, then English Countdown, Hindi arithmetic and Hindi Countdown (mixed numerals) in
    shares 1/2 : 1/6 : 1/4 : 1/12, steps 1..4 and operand digits 1..3. Deterministic in ``(n, seed)``."""
    shares = [("arithmetic", "en", 6), ("countdown", "en", 2), ("arithmetic", "hi", 3), ("countdown", "hi", 1)]
    out = []
    for family, lang, share in shares:
        k = n * share // 12
        for p in generate_problems(k, family=family, lang=lang, seed=seed, steps=(1, 2, 3, 4), digits=(1, 2, 3)):
            out.append(f"{p.question}\n{p.solution}")
    return out


# ------------------------------------------------------------------------------------------------- engine
def engine_for(model, max_batch: int = 32):
    """An :class:`~mani_jax.inference.engine.Engine` over ``model`` (weights captured now) for batched evaluation
    and sampling: ``max_batch`` rows, no prefix caching (the prompts share only BOS and a header)."""
    from mani_jax.inference.engine import Engine

    return Engine(model, max_batch=max_batch, prefix_caching=False)


def _generate(engine, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
              seeds: Sequence[int] | None = None, stop_ids: Sequence[int] = ()) -> list[list[int]]:
    from mani_jax.inference.engine import SamplingParams

    seeds = list(seeds) if seeds is not None else [0] * len(prompts)
    params = [SamplingParams(temperature=float(temperature), seed=int(s), max_new_tokens=int(max_new_tokens),
                             stop_token_ids=tuple(int(t) for t in stop_ids)) for s in seeds]
    engine.reset()
    return engine.generate([list(map(int, p)) for p in prompts], params)


def _reply(tokenizer, tokens: Sequence[int], end_id: int) -> tuple[str, int, bool]:
    """(text before ``<|end|>``, its token count, whether ``<|end|>`` was reached)."""
    tokens = list(tokens)
    ended = end_id in tokens
    body = tokens[: tokens.index(end_id)] if ended else tokens
    return tokenizer.decode(body), len(body), ended


def chat_eval(engine, tokenizer, problems: Sequence[Problem], *, max_new_tokens: int = 96) -> dict[str, Any]:
    """Greedy chat evaluation of a chat model on ``problems`` (batched by the engine).

    Returns:
      ``{"correct": list[bool], "completions": list[str], "lengths": list[int] (reply tokens before <|end|>),
      "ended": list[bool] (reached <|end|> within max_new_tokens), "seconds": float}``, in problem order.
    """
    end_id = tokenizer.piece_to_id(END_TOKEN)
    prompts = [encode_prompt(tokenizer, p.messages(with_solution=False)) for p in problems]
    t0 = time.perf_counter()
    outs = _generate(engine, prompts, max_new_tokens, stop_ids=(end_id,))
    seconds = time.perf_counter() - t0
    texts, lengths, ended = zip(*(_reply(tokenizer, o, end_id) for o in outs)) if outs else ((), (), ())
    return {"correct": [bool(check_answer(p, t)) for p, t in zip(problems, texts)], "completions": list(texts),
            "lengths": list(lengths), "ended": list(ended), "seconds": seconds}


def few_shot_eval(engine, tokenizer, problems: Sequence[Problem], shots: Sequence[Problem], *,
                  max_new_tokens: int = 64) -> dict[str, Any]:
    """Greedy few-shot evaluation of a base model: prompt ``BOS + few_shot_prompt(problem, shots)``, continuation
    cut at the first :data:`~mani_jax.data.reasoning.FEW_SHOT_STOP` (or EOS), scored with ``check_answer``.

    Returns: as :func:`chat_eval` (``ended``: a blank line or EOS was reached).
    """
    prompts = [tokenizer.encode(few_shot_prompt(p, shots), add_bos=True) for p in problems]
    t0 = time.perf_counter()
    outs = _generate(engine, prompts, max_new_tokens, stop_ids=(tokenizer.eos_id,))
    seconds = time.perf_counter() - t0
    texts, lengths, ended = [], [], []
    for o in outs:
        text = tokenizer.decode([t for t in o if t != tokenizer.eos_id])
        cut = text.find(FEW_SHOT_STOP)
        ended.append(cut >= 0 or tokenizer.eos_id in o)
        text = text[:cut] if cut >= 0 else text
        texts.append(text)
        lengths.append(len(tokenizer.encode(text)))
    return {"correct": [bool(check_answer(p, t)) for p, t in zip(problems, texts)], "completions": texts,
            "lengths": lengths, "ended": ended, "seconds": seconds}


# ---------------------------------------------------------------------------------------------- statistics
def accuracy_table(problems: Sequence[Problem], correct: Sequence[bool], lengths: Sequence[int] | None = None
                   ) -> dict[str, Any]:
    """Exact-match accuracy overall, by difficulty (``steps``) and by ``(steps, digits)`` cell.

    Returns:
      ``{"accuracy": float, "n": int, "by_steps": {"1": {"accuracy", "n"}, ...}, "by_steps_digits":
      {"1x2": {"accuracy", "n"}, ...}, "mean_length": float (when ``lengths`` is given)}``; keys are strings
      (JSON).
    """
    c = np.asarray(correct, np.float64)
    out: dict[str, Any] = {"accuracy": float(c.mean()) if c.size else float("nan"), "n": int(c.size)}
    for name, key in (("by_steps", lambda p: f"{p.steps}"), ("by_steps_digits", lambda p: f"{p.steps}x{p.digits}")):
        groups: dict[str, list[float]] = {}
        for p, ok in zip(problems, c):
            groups.setdefault(key(p), []).append(ok)
        out[name] = {k: {"accuracy": float(np.mean(v)), "n": len(v)} for k, v in sorted(groups.items())}
    if lengths is not None:
        out["mean_length"] = float(np.mean(lengths)) if len(lengths) else float("nan")
    return out


def paired_difference(a: Sequence[bool], b: Sequence[bool], *, n_boot: int = 10_000, seed: int = 0,
                      level: float = 0.95) -> dict[str, float]:
    """Accuracy difference ``mean(b) - mean(a)`` of two systems scored on the same problems, with a paired
    bootstrap confidence interval (problems resampled with replacement, percentile interval) and the exact
    two-sided McNemar test on the discordant pairs.

    Args:
      a, b: bool ``[n]``, correctness of the two systems on the same ``n`` problems (``n >= 1``).

    Returns:
      ``{"difference", "ci_low", "ci_high", "level", "n", "b_only" (b right, a wrong), "a_only",
      "mcnemar_p"}``.

    Raises:
      ValueError: ``a`` and ``b`` differ in length or are empty.
    """
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"a, b: expected two non-empty 1-D sequences of one length, got {x.shape} and {y.shape}")
    d = y - x
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    boot = d[idx].mean(axis=1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    b_only, a_only = int(((y == 1) & (x == 0)).sum()), int(((x == 1) & (y == 0)).sum())
    m = b_only + a_only
    # Exact McNemar: under H0 the discordant pairs split Binomial(m, 1/2).
    k = min(b_only, a_only)
    p = min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m) if m else 1.0
    return {"difference": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi), "level": level,
            "n": int(d.size), "b_only": b_only, "a_only": a_only, "mcnemar_p": float(p)}


# ------------------------------------------------------------------------------------ preference sampling
def sample_preference_pairs(engine, tokenizer, problems: Sequence[Problem], *, n_samples: int = 4,
                            temperature: float = 1.0, max_new_tokens: int = 96, seed: int = 0,
                            max_pairs_per_problem: int = 1, gold_fallback: bool = False
                            ) -> tuple[list, dict[str, Any]]:
    """On-policy preference pairs: ``n_samples`` replies per problem sampled from the engine's model at
    ``temperature`` (request ``i`` of problem ``j`` uses seed ``seed + j * n_samples + i``); for every problem
    with at least one verified-correct and one wrong reply, up to ``max_pairs_per_problem`` pairs
    (chosen = a correct reply, rejected = a wrong one, distinct replies, drawn without replacement). A reply
    that did not reach ``<|end|>`` counts as wrong; replies are trained with their closing ``<|end|>``
    (a truncated reply is kept as it was sampled).

    ``gold_fallback``: for a problem whose samples are all wrong, pair the problem's reference worked solution
    (``problem.solution`` + ``<|end|>``, correct by construction) with a wrong sample. The chosen reply is then
    off-policy; off by default (the smoke preset uses it, where the SFT model is too small to be ever right).

    Returns:
      ``(pairs, stats)``: a list of :class:`~mani_jax.train.preference.PreferencePair` and ``{"problems",
      "samples", "sample_accuracy", "all_correct", "all_wrong", "mixed", "pairs", "gold_pairs", "seconds"}``
      (``all_*`` / ``mixed``: problems whose samples were all right, all wrong, or both).
    """
    from mani_jax.train.preference import PreferencePair

    end_id = tokenizer.piece_to_id(END_TOKEN)
    prompts = [encode_prompt(tokenizer, p.messages(with_solution=False)) for p in problems]
    flat = [pr for pr in prompts for _ in range(n_samples)]
    seeds = [seed + i for i in range(len(flat))]
    t0 = time.perf_counter()
    outs = _generate(engine, flat, max_new_tokens, temperature=temperature, seeds=seeds, stop_ids=(end_id,))
    seconds = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    pairs, n_ok, counts = [], 0, {"all_correct": 0, "all_wrong": 0, "mixed": 0, "gold_pairs": 0}
    for j, p in enumerate(problems):
        replies = outs[j * n_samples: (j + 1) * n_samples]
        good, bad = [], []
        for r in replies:
            text, _, ended = _reply(tokenizer, r, end_id)
            (good if ended and check_answer(p, text) else bad).append(tuple(r))
        n_ok += len(good)
        good, bad = list(dict.fromkeys(good)), list(dict.fromkeys(bad))
        if good and bad:
            counts["mixed"] += 1
            rng.shuffle(good)
            rng.shuffle(bad)
            for c, r in list(zip(good, bad))[:max_pairs_per_problem]:
                pairs.append(PreferencePair(tuple(int(t) for t in prompts[j]), c, r))
        else:
            counts["all_correct" if good else "all_wrong"] += 1
            if gold_fallback and bad:
                gold = tuple(tokenizer.encode(p.solution)) + (end_id,)
                rng.shuffle(bad)
                pairs.append(PreferencePair(tuple(int(t) for t in prompts[j]), gold, bad[0]))
                counts["gold_pairs"] += 1
    stats = {"problems": len(problems), "samples": len(flat), "sample_accuracy": n_ok / max(len(flat), 1),
             **counts, "pairs": len(pairs), "seconds": seconds}
    return pairs, stats


def policy_kl(policy, reference, engine, tokenizer, problems: Sequence[Problem], *, temperature: float = 1.0,
              max_new_tokens: int = 96, seed: int = 0, batch_size: int = 16) -> dict[str, float]:
    """``KL(policy || reference)`` per reply, estimated on one reply per problem sampled from ``policy`` (through
    ``engine``, which must hold the policy's weights) at ``temperature`` 1: the exact per-position KL of the
    next-token distributions summed over the reply tokens (:func:`mani_jax.train.losses.sequence_kl`), averaged
    over replies. Its expectation is the sequence-level KL the DPO objective implicitly constrains.

    Returns:
      ``{"kl_mean": nats per reply, "kl_sem": its standard error, "kl_per_token": nats per reply token, "n"}``.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mani_jax.train.losses import sequence_kl
    from mani_jax.train.preference import PreferencePair, pair_arrays

    end_id = tokenizer.piece_to_id(END_TOKEN)
    prompts = [encode_prompt(tokenizer, p.messages(with_solution=False)) for p in problems]
    outs = _generate(engine, prompts, max_new_tokens, temperature=temperature,
                     seeds=[seed + i for i in range(len(prompts))], stop_ids=(end_id,))
    # One row per reply: reuse the pair layout with the reply as both responses and keep the chosen half.
    pairs = [PreferencePair(tuple(int(t) for t in pr), tuple(o), tuple(o)) for pr, o in zip(prompts, outs)]
    seq_len = max(p.length for p in pairs) - 1
    gp, sp = nnx.split(policy)
    gr, sr = nnx.split(reference)

    @jax.jit
    def kl(sp, sr, batch):
        lp = nnx.merge(gp, sp)(batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"])
        lr = nnx.merge(gr, sr)(batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"])
        return sequence_kl(lp, lr, batch["response_mask"]), jnp.sum(batch["response_mask"], axis=-1)

    vals, ntok = [], []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i: i + batch_size]
        n = len(chunk)
        chunk = chunk + [chunk[0]] * (batch_size - n)
        arrays = pair_arrays(chunk, seq_len, tokenizer.pad_id)
        half = {k: v[:batch_size] for k, v in arrays.items()}
        k, t = kl(sp, sr, half)
        vals.extend(np.asarray(k)[:n].tolist())
        ntok.extend(np.asarray(t)[:n].tolist())
    v = np.asarray(vals, np.float64)
    return {"kl_mean": float(v.mean()), "kl_sem": float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else 0.0,
            "kl_per_token": float(v.sum() / max(np.sum(ntok), 1.0)), "n": int(v.size)}


# ---------------------------------------------------------------------------------------------- llama.cpp
def llama_cpp_chat_eval(gguf_path, problems: Sequence[Problem], *, max_tokens: int = 96, n_ctx: int = 512,
                        n_threads: int = 2) -> dict[str, Any]:
    """Run ``problems`` through llama.cpp's own chat path: ``Llama.create_chat_completion`` (the GGUF's
    ``tokenizer.chat_template``, greedy: ``temperature=0``, no repetition penalty), one problem at a time, with
    llama.cpp's default F16 KV cache; score the replies with ``check_answer``.

    Returns:
      ``{"correct", "completions", "lengths" (completion tokens), "ended" (finish_reason == "stop"), "seconds",
      "chat_format"}``.

    Raises:
      ImportError: llama-cpp-python is missing. FileNotFoundError / ValueError: as
      :func:`mani_jax.export.parity.open_llama`.
    """
    from mani_jax.export.parity import open_llama

    correct, texts, lengths, ended = [], [], [], []
    t0 = time.perf_counter()
    with open_llama(gguf_path, n_ctx=n_ctx, n_threads=n_threads, logits_all=False, kv_cache_f32=False) as llm:
        chat_format = llm.chat_format
        for p in problems:
            out = llm.create_chat_completion(p.messages(with_solution=False), max_tokens=max_tokens,
                                             temperature=0.0, top_k=1, repeat_penalty=1.0, seed=0)
            text = out["choices"][0]["message"]["content"] or ""
            texts.append(text)
            lengths.append(int(out["usage"]["completion_tokens"]))
            ended.append(out["choices"][0]["finish_reason"] == "stop")
            correct.append(bool(check_answer(p, text)))
    return {"correct": correct, "completions": texts, "lengths": lengths, "ended": ended,
            "seconds": time.perf_counter() - t0, "chat_format": chat_format}


# ----------------------------------------------------------------------------------------------------- plot
def plot_accuracy(stages: dict[str, dict[str, Any]], path, title: str = "held-out exact match by difficulty"):
    """Grouped bars: accuracy by difficulty (``by_steps``) for each stage of ``stages`` (``{name:
    accuracy_table(...)}``, in order), with 95% Wilson intervals; saved as PNG with
    :func:`mani_jax.train.metrics.save_figure`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mani_jax.train.metrics import save_figure

    names = list(stages)
    diffs = sorted({k for t in stages.values() for k in t["by_steps"]}, key=int)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(diffs) * max(1, len(names)) / 3, 3.8))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for j, d in enumerate(diffs):
            cell = stages[name]["by_steps"].get(d)
            if cell is None:
                continue
            a, n = cell["accuracy"], cell["n"]
            l, h = _wilson(a, n)
            xs.append(j + (i - (len(names) - 1) / 2) * width)
            ys.append(a)
            lo.append(max(a - l, 0.0))  # rounding can put a bound a hair inside an accuracy of 0 or 1
            hi.append(max(h - a, 0.0))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=f"{name} ({stages[name]['accuracy']:.0%})")
    first = stages[names[0]]["by_steps"]
    ax.set_xticks(range(len(diffs)), [f"{d} step{'s' if d != '1' else ''}\nn={first[d]['n'] if d in first else '-'}"
                                      for d in diffs])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("exact match (95% Wilson interval)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return save_figure(fig, path)


def _wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, c - h), min(1.0, c + h)
