"""Preference optimisation: DPO on (prompt, chosen, rejected) token sequences, with a frozen reference.

Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model", eq. 7; loss in :func:`mani_jax.train.losses.dpo_loss`) needs, per pair, the summed
log-probabilities of the chosen and the rejected response under the policy being trained and under a frozen
reference (the SFT model). The reference never changes, so its log-probabilities are computed once, before
training (:func:`reference_logprobs`); the policy's are recomputed inside every jitted step.

Layout. :func:`pair_arrays` turns ``n`` pairs into ``[2n, L]`` rows (all chosen rows first, then the rejected
rows in the same order), one sequence ``prompt + response`` per row, right-padded with ``pad_id``:

=================  =========  ==========  ==========================================================
key                dtype      shape       meaning
=================  =========  ==========  ==========================================================
``tokens``         int32      [2n, L]     ``seq[:-1]`` padded
``targets``        int32      [2n, L]     ``seq[1:]`` padded
``segment_ids``    int32      [2n, L]     1 on the sequence, 0 on padding
``positions``      int32      [2n, L]     0, 1, 2, ... (0 on padding)
``response_mask``  float32    [2n, L]     1 where ``targets[t]`` is a response token
=================  =========  ==========  ==========================================================

so ``sequence_logprobs(model(tokens), targets, response_mask)`` is ``log pi(response | prompt)``. A causal model
never looks right, so the padding changes nothing on the sequence's positions.

The loop (:func:`train_dpo`) draws batches of ``config.batch_size`` pairs from a per-epoch shuffle (seeded by
``config.seed``), runs AdamW with :class:`~mani_jax.train.TrainConfig`'s schedule, and writes every step's
loss, implicit-reward margin, reward accuracy and the mean policy-minus-reference log-ratio of the chosen and
rejected responses to ``metrics.jsonl`` (plotted to ``dpo_curve.png``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from mani_jax.train.losses import dpo_loss, sequence_logprobs
from mani_jax.train.metrics import MetricsWriter, save_figure
from mani_jax.train.optim import make_optimizer, make_schedule
from mani_jax.train.trainer import TrainConfig

__all__ = ["PreferencePair", "pair_arrays", "reference_logprobs", "make_dpo_step", "train_dpo"]

PAIR_KEYS = ("tokens", "targets", "segment_ids", "positions", "response_mask")


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """One preference: a prompt and two responses to it, the chosen (preferred) and the rejected one.

    Attributes:
      prompt: int token ids of the prompt (for a chat: :func:`mani_jax.chat.encode_prompt`, BOS included).
      chosen, rejected: int token ids of the two responses (for a chat: the reply tokens including the closing
        ``<|end|>``).
    """

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]

    def __post_init__(self):
        for name in ("prompt", "chosen", "rejected"):
            value = tuple(int(t) for t in getattr(self, name))
            if not value:
                raise ValueError(f"{name}: expected at least one token id")
            object.__setattr__(self, name, value)

    @property
    def length(self) -> int:
        """Tokens of the longer of ``prompt + chosen`` and ``prompt + rejected``."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


def _rows(prompt: Sequence[int], response: Sequence[int], seq_len: int, pad_id: int):
    seq = np.asarray(list(prompt) + list(response), np.int32)
    n = len(seq) - 1
    if n > seq_len:
        raise ValueError(f"a pair of {len(seq)} tokens does not fit seq_len={seq_len} (needs seq_len >= {n})")
    tokens = np.full(seq_len, pad_id, np.int32)
    targets = np.full(seq_len, pad_id, np.int32)
    seg = np.zeros(seq_len, np.int32)
    pos = np.zeros(seq_len, np.int32)
    mask = np.zeros(seq_len, np.float32)
    tokens[:n], targets[:n], seg[:n], pos[:n] = seq[:-1], seq[1:], 1, np.arange(n)
    mask[len(prompt) - 1: n] = 1.0  # targets seq[len(prompt):] are the response
    return tokens, targets, seg, pos, mask


def pair_arrays(pairs: Sequence[PreferencePair], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """The ``[2n, seq_len]`` arrays of ``n`` pairs (chosen rows ``0..n-1``, rejected rows ``n..2n-1``; see the
    module docstring for the keys).

    Raises:
      ValueError: ``pairs`` is empty, or a pair needs more than ``seq_len + 1`` tokens.
      TypeError: an element is not a :class:`PreferencePair`.
    """
    if not pairs:
        raise ValueError("pairs: expected at least one PreferencePair")
    rows = []
    for kind in ("chosen", "rejected"):
        for i, p in enumerate(pairs):
            if not isinstance(p, PreferencePair):
                raise TypeError(f"pairs[{i}]: expected a PreferencePair, got {type(p).__name__}")
            rows.append(_rows(p.prompt, getattr(p, kind), seq_len, pad_id))
    return {k: np.stack([r[j] for r in rows]) for j, k in enumerate(PAIR_KEYS)}


def _logps(model, batch) -> jax.Array:
    logits = model(batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    return sequence_logprobs(logits, batch["targets"], batch["response_mask"])


@functools.partial(jax.jit, static_argnums=0)
def _logps_step(graphdef, state, batch):
    return _logps(nnx.merge(graphdef, state), batch)


def reference_logprobs(model: nnx.Module, pairs: Sequence[PreferencePair], seq_len: int, *, batch_size: int = 16,
                       pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``log ref(chosen | prompt)`` and ``log ref(rejected | prompt)`` of every pair under ``model`` (float32 ``[n]``
    each), computed in batches of ``batch_size`` pairs (the last batch padded with copies of the first pair).

    Raises:
      ValueError: as :func:`pair_arrays`, or ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    graphdef, state = nnx.split(model)
    chosen, rejected = [], []
    for i in range(0, len(pairs), batch_size):
        chunk = list(pairs[i: i + batch_size])
        n = len(chunk)
        chunk += [chunk[0]] * (batch_size - n)
        lp = np.asarray(_logps_step(graphdef, state, pair_arrays(chunk, seq_len, pad_id)))
        chosen.append(lp[:n])
        rejected.append(lp[batch_size: batch_size + n])
    return np.concatenate(chosen).astype(np.float32), np.concatenate(rejected).astype(np.float32)


def make_dpo_step(graphdef: nnx.GraphDef, schedule: optax.Schedule, beta: float = 0.1,
                  label_smoothing: float = 0.0):
    """The jitted DPO step for ``graphdef, state = nnx.split((model, optimizer))``.

    Returns:
      ``step(state, batch) -> (new_state, metrics)``; ``state`` is donated. ``batch``: the :func:`pair_arrays`
      keys for ``B`` pairs (``[2B, L]``) plus ``ref_chosen`` / ``ref_rejected`` float32 ``[B]``. ``metrics``:
      float32 scalars ``loss`` and every metric of :func:`~mani_jax.train.losses.dpo_loss` (``reward_margin``,
      ``reward_accuracy``, ...), ``logratio_chosen`` / ``logratio_rejected`` (mean ``log pi - log ref``),
      ``grad_norm`` and ``lr``; all measured before the update.
    """

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        lr = schedule(optimizer.step[...])
        b = batch["ref_chosen"].shape[0]

        def objective(m):
            lp = _logps(m, batch)
            loss, met = dpo_loss(lp[:b], lp[b:], batch["ref_chosen"], batch["ref_rejected"], beta=beta,
                                 label_smoothing=label_smoothing)
            met["logratio_chosen"] = jnp.mean(jax.lax.stop_gradient(lp[:b]) - batch["ref_chosen"])
            met["logratio_rejected"] = jnp.mean(jax.lax.stop_gradient(lp[b:]) - batch["ref_rejected"])
            return loss, met

        (loss, met), grads = nnx.value_and_grad(objective, has_aux=True)(model)
        optimizer.update(model, grads)
        metrics = {"loss": loss, **met, "grad_norm": optax.tree.norm(grads), "lr": jnp.asarray(lr, jnp.float32)}
        return nnx.state((model, optimizer)), metrics

    return jax.jit(step, donate_argnums=0)


def _plot(records: list[dict], path: Path, beta: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, [r["loss"] for r in records])
    axes[0].axhline(np.log(2), ls=":", c="gray", label="log 2 (policy = reference)")
    axes[0].set_title("DPO loss")
    axes[0].legend()
    axes[1].plot(steps, [r["reward_margin"] for r in records], label="margin")
    axes[1].plot(steps, [r["rewards_chosen"] for r in records], label="chosen")
    axes[1].plot(steps, [r["rewards_rejected"] for r in records], label="rejected")
    axes[1].set_title(f"implicit rewards (beta={beta})")
    axes[1].legend()
    axes[2].plot(steps, [r["reward_accuracy"] for r in records])
    axes[2].set_ylim(0, 1.02)
    axes[2].set_title("reward accuracy (batch)")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    save_figure(fig, path)


def train_dpo(model: nnx.Module, pairs: Sequence[PreferencePair], ref_chosen: np.ndarray, ref_rejected: np.ndarray,
              config: TrainConfig, *, out_dir: str | Path, beta: float = 0.1, label_smoothing: float = 0.0,
              pad_id: int = 0) -> dict[str, Any]:
    """Train ``model`` (the policy, updated in place) with DPO on ``pairs`` for ``config.steps`` steps.

    Each step takes ``config.batch_size`` pairs from a shuffled pass over ``pairs`` (reshuffled every epoch with
    ``config.seed + epoch``); rows are ``config.seq_len`` long. The optimizer is AdamW with
    :class:`~mani_jax.train.TrainConfig`'s warmup + cosine schedule, clipping and weight decay. Nothing is
    checkpointed here (the caller saves the result).

    Args:
      model: the policy (initialised from the reference).
      pairs: the preference pairs.
      ref_chosen, ref_rejected: float ``[len(pairs)]``, the frozen reference's sequence log-probabilities
        (:func:`reference_logprobs`).
      config: steps, batch size (pairs per step), seq_len, optimizer hyperparameters, seed, log_every.
      out_dir: ``metrics.jsonl`` and ``dpo_curve.png`` are written here.
      beta: DPO's beta (> 0). label_smoothing: conservative DPO's eps (0 = the paper's loss).
      pad_id: padding token id.

    Returns:
      ``{"steps", "pairs", "epochs", "wall_seconds", "final": {metric: mean of the last log window},
      "first": {metric: value at step 1}, "metrics_path", "plot_path"}``.

    Raises:
      ValueError: ``len(pairs) < config.batch_size``, reference arrays of the wrong shape, or a pair longer than
        ``config.seq_len + 1`` tokens.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
    n = len(pairs)
    if n < config.batch_size:
        raise ValueError(f"pairs: {n} pairs, fewer than config.batch_size={config.batch_size}")
    ref_chosen = np.asarray(ref_chosen, np.float32)
    ref_rejected = np.asarray(ref_rejected, np.float32)
    if ref_chosen.shape != (n,) or ref_rejected.shape != (n,):
        raise ValueError(f"ref_chosen / ref_rejected: expected shape ({n},), got {ref_chosen.shape} and "
                         f"{ref_rejected.shape}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(config.optim_config(), model)
    schedule = make_schedule(config.optim_config())
    graphdef, state = nnx.split((model, optimizer))
    step_fn = make_dpo_step(graphdef, schedule, beta, label_smoothing)
    metrics_path = out_dir / "metrics.jsonl"
    if metrics_path.exists():
        metrics_path.unlink()
    writer = MetricsWriter(metrics_path)
    rng = np.random.default_rng(config.seed)
    order, cursor, epoch = rng.permutation(n), 0, 0
    records, window, first = [], [], None
    bar = tqdm(total=config.steps, disable=not config.progress, dynamic_ncols=True, desc="dpo")
    t0 = time.perf_counter()
    try:
        for step in range(1, config.steps + 1):
            if cursor + config.batch_size > n:
                epoch += 1
                order, cursor = np.random.default_rng(config.seed + epoch).permutation(n), 0
            idx = order[cursor: cursor + config.batch_size]
            cursor += config.batch_size
            batch = pair_arrays([pairs[i] for i in idx], config.seq_len, pad_id)
            batch["ref_chosen"], batch["ref_rejected"] = ref_chosen[idx], ref_rejected[idx]
            state, met = step_fn(state, batch)
            met = {k: float(v) for k, v in jax.device_get(met).items()}
            first = first or met
            window.append(met)
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps:
                rec = {"step": step, "epoch": epoch, **{k: float(np.mean([w[k] for w in window])) for k in met}}
                writer.write(rec)
                records.append(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", margin=f"{rec['reward_margin']:.2f}")
                window = []
    finally:
        bar.close()
        writer.close()
        nnx.update((model, optimizer), state)
    plot_path = out_dir / "dpo_curve.png"
    if records:
        _plot(records, plot_path, beta)
    return {"steps": config.steps, "pairs": n, "epochs": config.steps * config.batch_size / n,
            "wall_seconds": time.perf_counter() - t0, "first": first,
            "final": {k: v for k, v in records[-1].items() if k not in ("step", "epoch")} if records else None,
            "metrics_path": str(metrics_path), "plot_path": str(plot_path)}
