"""The training loop: jitted train/eval steps, logging, evaluation, checkpoints and exact resume.

The train step is a pure function ``(state, batch) -> (state, metrics)`` over the ``nnx.State`` of the
pair ``(model, optimizer)``: the pair is ``nnx.split`` once, the step ``nnx.merge``-s inside
``jax.jit`` (graph definition closed over, state buffers donated), and the loop carries only the state.
This avoids ``nnx.jit``'s per-call graph traversal of the Python objects (see the speed note in
``mani_jax/train/__init__.py``). The Python ``model`` / ``optimizer`` objects are brought up to date
(``nnx.update``) before every evaluation, checkpoint and at the end of training (also when the loop is
left by an exception or Ctrl-C); in between, their arrays are stale (donated) and must not be read.

Exact resume: a checkpoint holds the model state, the optimizer state (moments, counts, step), the step,
the tokens seen and the data iterator's ``get_state()``. Restoring all of it and re-running the same
deterministic jitted step on the same batches reproduces the uninterrupted run's losses bit for bit
(tested in ``tests/test_train.py``).

Mixed precision (``compute_dtype="bfloat16"``): float parameters are cast to bfloat16 inside the step
for the forward and backward pass; gradients flow back through the cast to the float32 master weights,
and the optimizer state stays float32 (Micikevicius et al., "Mixed Precision Training", 2018, without
loss scaling, which bfloat16's float32-sized exponent makes unnecessary). The loss is computed in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from mani_jax.train.checkpoint import Checkpointer, checkpoint_steps
from mani_jax.train.losses import lm_loss
from mani_jax.train.metrics import MetricsWriter, count_params, plot_loss_curve, read_metrics, truncate_metrics
from mani_jax.train.optim import OptimConfig, make_optimizer, make_schedule

__all__ = ["TrainConfig", "BATCH_KEYS", "make_train_step", "evaluate", "train", "cast_floating"]

_log = logging.getLogger(__name__)

#: The keys every batch must have; all ``[batch, seq]``. Other keys are ignored by the step.
BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_MOE_METRICS = ("load_balancing_loss", "router_z_loss", "dropped_fraction", "expert_load")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run. Flat (no nested config) so every field is a ``key=value`` override.

    Attributes:
      steps: total optimizer steps of the run (a resumed run continues up to this).
      batch_size, seq_len: the expected batch shape ``[batch_size, seq_len]``; every batch is checked.
      compute_dtype: ``"float32"`` or ``"bfloat16"`` forward/backward; master weights and optimizer state
        stay float32 either way.
      eval_every: evaluate every this many steps (and at the last step) when an ``eval_fn`` is given;
        0 = only at the last step.
      checkpoint_every: save every this many steps and at the last step; 0 = never save.
      keep_checkpoints: how many recent checkpoints to keep (>= 1).
      log_every: write a metrics record (and refresh the progress bar) every this many steps, and at the
        last step.
      seed: the run's seed. The trainer itself draws no random numbers (its step is deterministic); the
        caller uses ``seed`` to initialise the model and shuffle the data, so equal seeds give equal losses.
      learning_rate, warmup_steps, min_lr_ratio, weight_decay, b1, b2, eps, grad_clip_norm: see
        :class:`~mani_jax.train.optim.OptimConfig`.
      lr_decay_steps: where the cosine schedule ends; ``None`` = ``steps``. Set it explicitly if you
        resume a run with a larger ``steps`` and want the original schedule (the schedule is a function of
        the config, not stored in the checkpoint; the optimizer's step count is).
      progress: show a tqdm progress bar.
    """

    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip_norm: float = 1.0
    lr_decay_steps: int | None = None
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = off), got {getattr(self, name)}")
        if self.compute_dtype not in _DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(_DTYPES)}, got {self.compute_dtype!r}")
        total = self.lr_decay_steps or self.steps
        if self.warmup_steps >= total:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < the schedule length "
                             f"lr_decay_steps or steps ({total})")
        self.optim_config()  # validates the other optimizer fields, naming the bad one

    def optim_config(self) -> OptimConfig:
        """The :class:`OptimConfig` of this run (``total_steps = lr_decay_steps or steps``)."""
        return OptimConfig(
            learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
            total_steps=self.lr_decay_steps or self.steps, min_lr_ratio=self.min_lr_ratio,
            weight_decay=self.weight_decay, b1=self.b1, b2=self.b2, eps=self.eps,
            grad_clip_norm=self.grad_clip_norm)


# ------------------------------------------------------------------ steps

def cast_floating(model: nnx.Module, dtype: Any) -> nnx.Module:
    """A copy of ``model`` whose floating-point ``nnx.Param`` arrays are cast to ``dtype``.

    Differentiable (use inside ``grad``: the cotangent is cast back to the master dtype). Returns
    ``model`` itself when ``dtype`` is float32.
    """
    if jnp.dtype(dtype) == jnp.float32:
        return model
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    return nnx.merge(graphdef, params, rest)


def _moe_config(model: nnx.Module):
    cfg = getattr(model, "config", None)
    return cfg if getattr(cfg, "n_experts", 0) else None


def _forward_loss(model: nnx.Module, batch: dict[str, jax.Array], dtype: Any):
    """``(objective, info)``: the differentiated objective and ``info`` with ``loss`` (LM cross entropy,
    nats/token), ``n_tokens`` and, for an MoE model (``model.config.n_experts > 0``), the router losses and
    per-layer expert load. objective = loss + router_aux_loss_coef * load_balancing_loss +
    router_z_loss_coef * router_z_loss (just ``loss`` for a dense model)."""
    m = cast_floating(model, dtype)
    moe_cfg = _moe_config(model)
    out = m(batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"],
            **({"return_aux": True} if moe_cfg else {}))
    if m is not model:  # carry any non-parameter updates (RNG counters, ...) back to the master model
        nnx.update(model, nnx.state(m, nnx.Not(nnx.Param)))
    logits, aux = out if moe_cfg else (out, None)
    loss, n_tokens = lm_loss(logits, batch["targets"], batch["loss_mask"])
    info = {"loss": loss, "n_tokens": n_tokens}
    if moe_cfg is None:
        return loss, info
    lb, z = aux["load_balancing_loss"], aux["router_z_loss"]
    info.update({"load_balancing_loss": lb, "router_z_loss": z, "expert_load": aux["layers"]["load"],
                 "dropped_fraction": jnp.mean(aux["layers"]["dropped_fraction"])})
    return loss + moe_cfg.router_aux_loss_coef * lb + moe_cfg.router_z_loss_coef * z, info


def make_train_step(graphdef: nnx.GraphDef, schedule: optax.Schedule,
                    compute_dtype: str = "float32", grad_transform: Callable | None = None) -> Callable:
    """The jitted train step for the split pair ``graphdef, state = nnx.split((model, optimizer))``.

    ``grad_transform``: optional ``grads -> grads`` applied before the optimizer update (e.g. a sharding
    constraint: :mod:`mani_jax.parallel` uses it for ZeRO-1's reduce-scatter of the gradients).

    Returns:
      ``step(state, batch) -> (new_state, metrics)``; ``state`` is donated (do not reuse it). ``batch``
      holds the :data:`BATCH_KEYS` arrays, all ``[batch, seq]`` (int32 except ``loss_mask`` float32).
      ``metrics``: float32 scalars ``loss`` (mean nats/token before the update, the LM cross entropy
      only), ``grad_norm`` (global L2 norm before clipping), ``lr`` (the learning rate this update used),
      ``n_tokens`` (loss tokens); for an MoE model also ``load_balancing_loss``, ``router_z_loss`` (unscaled,
      mean over MoE layers), ``dropped_fraction`` and ``expert_load [n_moe_layers, n_experts]`` (fraction
      of routing assignments per expert). The gradient is of the objective with the router losses added.
    """
    dtype = _DTYPES[compute_dtype]

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        lr = schedule(optimizer.step[...])
        (_, info), grads = nnx.value_and_grad(
            lambda m: _forward_loss(m, batch, dtype), has_aux=True)(model)
        if grad_transform is not None:
            grads = grad_transform(grads)
        optimizer.update(model, grads)
        metrics = {**info, "grad_norm": optax.tree.norm(grads), "lr": jnp.asarray(lr, jnp.float32)}
        return nnx.state((model, optimizer)), metrics

    return jax.jit(step, donate_argnums=0)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _eval_step(graphdef, state, batch, compute_dtype):
    model = nnx.merge(graphdef, state)
    _, info = _forward_loss(model, batch, _DTYPES[compute_dtype])
    return info["loss"] * info["n_tokens"], info["n_tokens"]


def _select(batch: dict[str, Any], where: str) -> dict[str, Any]:
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"{where}: batch is missing keys {missing}; a batch needs {list(BATCH_KEYS)}")
    shape = np.shape(batch["tokens"])
    if len(shape) != 2:
        raise ValueError(f"{where}: batch['tokens'] must be [batch, seq], got shape {shape}")
    for k in BATCH_KEYS:
        if np.shape(batch[k]) != shape:
            raise ValueError(f"{where}: batch[{k!r}] has shape {np.shape(batch[k])}, expected {shape} "
                             "like batch['tokens']")
    for k in ("tokens", "targets", "segment_ids", "positions"):
        dtype = getattr(batch[k], "dtype", None)
        if dtype is not None and not np.issubdtype(dtype, np.integer):
            raise ValueError(f"{where}: batch[{k!r}] must be an integer array (int32), got dtype {dtype}")
    return {k: batch[k] for k in BATCH_KEYS}


def evaluate(model: nnx.Module, batches: Iterable[dict[str, Any]], compute_dtype: str = "float32") -> float:
    """Token-weighted mean next-token loss (nats/token) of ``model`` over ``batches``.

    Args:
      model: called as ``model(tokens, segment_ids=, positions=) -> logits [B, L, V]``.
      batches: an iterable of batch dicts with the :data:`BATCH_KEYS` (``[B, L]`` each); consumed once.
      compute_dtype: ``"float32"`` or ``"bfloat16"`` parameters for the forward pass.

    Returns:
      ``sum(loss_b * n_b) / sum(n_b)`` over the batches, a Python float.

    Raises:
      ValueError: a batch lacks a key or has mismatched shapes, or ``batches`` held no target token.
    """
    if compute_dtype not in _DTYPES:
        raise ValueError(f"compute_dtype must be one of {sorted(_DTYPES)}, got {compute_dtype!r}")
    graphdef, state = nnx.split(model)
    total, count = [], []
    for i, batch in enumerate(batches):
        s, n = _eval_step(graphdef, state, _select(batch, f"evaluate batches[{i}]"), compute_dtype)
        total.append(s)
        count.append(n)
    total_f = float(np.sum(np.asarray(jax.device_get(total), np.float64)))
    count_f = float(np.sum(np.asarray(jax.device_get(count), np.float64)))
    if count_f <= 0:
        raise ValueError("evaluate: batches contained no target tokens (empty, or loss_mask all zero)")
    return total_f / count_f


# ------------------------------------------------------------------ the loop

def train(model: nnx.Module, config: TrainConfig, train_iter: Iterator[dict[str, Any]], *,
          out_dir: str | Path, eval_fn: Callable[[nnx.Module], float] | None = None, resume: bool = False,
          optimizer: nnx.Optimizer | None = None, step_factory: Callable | None = None) -> dict[str, Any]:
    """Train ``model`` for ``config.steps`` optimizer steps on ``train_iter``; log, evaluate, checkpoint.

    Args:
      model: an ``nnx.Module`` called as ``model(tokens, segment_ids=, positions=) -> logits [B, L, V]``;
        updated in place (its arrays are the trained ones when ``train`` returns).
      config: the run's :class:`TrainConfig` (optimizer hyperparameters included).
      train_iter: yields batch dicts with :data:`BATCH_KEYS`, each ``[batch_size, seq_len]`` (numpy or jax;
        int32, ``loss_mask`` float32). For checkpoints to restore the data position it must have
        ``get_state()`` / ``set_state(state)`` (a grain ``DatasetIterator``, e.g.
        ``iter(dataset.to_iter_dataset())``, or a ``DataLoaderIterator``); pass the *same* iterator
        object you draw from, not the dataset. If it runs out early, training stops with a warning.
      out_dir: run directory: ``metrics.jsonl``, ``loss_curve.png`` and ``checkpoints/`` go here.
      eval_fn: optional ``eval_fn(model) -> float`` eval loss, e.g.
        ``lambda m: evaluate(m, val_batches)``; called every ``eval_every`` steps and at the end.
      resume: continue from the latest checkpoint in ``out_dir/checkpoints`` if there is one (restoring
        model, optimizer, step, tokens seen and the iterator position); start fresh if there is none.
      optimizer: optional ready ``nnx.Optimizer`` over ``model``; default
        ``make_optimizer(config.optim_config(), model)``.
      step_factory: optional ``(model, optimizer, schedule, compute_dtype) -> (step_fn, state)`` replacing
        :func:`make_train_step` (same contract: ``step_fn(state, batch) -> (state, metrics)``, ``state`` the
        ``nnx.split((model, optimizer))`` state), e.g. :func:`mani_jax.parallel.sharded_step_factory` for a
        device mesh. Called after any checkpoint restore.

    Returns:
      A summary dict: ``final_step``, ``start_step``, ``steps_run``, ``train_tokens`` (tokens processed,
      all runs), ``tokens_per_second`` (this run, excluding its first, compiling step; ``None`` if it ran
      fewer than 2 steps), ``compile_seconds`` (first step), ``wall_seconds``, ``final_loss`` (last step),
      ``final_loss_avg`` (mean of the last ``log_every`` steps), ``final_eval_loss`` (or ``None``),
      ``losses`` (per-step train loss of this run, a list ``[[step, loss], ...]``), ``n_params``,
      ``metrics_path``, ``plot_path``.

    Raises:
      TypeError: ``config`` is not a ``TrainConfig``.
      ValueError: a batch is malformed or not ``[batch_size, seq_len]``; ``out_dir/checkpoints`` already
        holds checkpoints but ``resume`` is False; a checkpoint is corrupt or does not match the model.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
    if not hasattr(train_iter, "__next__"):
        raise TypeError(f"train_iter must be an iterator (e.g. iter(dataset.to_iter_dataset())), got "
                        f"{type(train_iter).__name__}; pass the iterator itself so its position can be "
                        "checkpointed")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"
    metrics_path = out_dir / "metrics.jsonl"
    plot_path = out_dir / "loss_curve.png"
    if optimizer is None:
        optimizer = make_optimizer(config.optim_config(), model)
    schedule = make_schedule(config.optim_config())
    n_params = count_params(model)

    existing = checkpoint_steps(ckpt_dir)
    if existing and not resume:
        raise ValueError(f"out_dir {str(out_dir)!r} already holds checkpoints (steps {existing}); pass "
                         "resume=True to continue that run, or use a fresh out_dir")
    ckpt = Checkpointer(ckpt_dir, max_to_keep=config.keep_checkpoints) \
        if (config.checkpoint_every > 0 or existing) else None

    start_step, tokens_seen = 0, 0
    if resume and existing:
        info = ckpt.restore(model, optimizer, train_iter)
        start_step = info["step"]
        tokens_seen = int(info["extra"].get("tokens_seen", 0))
        if not info["data_iter_restored"]:
            warnings.warn(f"resumed from step {start_step} but the data iterator position was not restored "
                          "(train_iter has no set_state, or the checkpoint holds no iterator state); the run "
                          "will see different batches than an uninterrupted one", stacklevel=2)
        truncate_metrics(metrics_path, start_step)
        _log.info("resumed from %s at step %d", ckpt_dir, start_step)
    elif metrics_path.exists():
        metrics_path.unlink()  # a fresh run: do not mix with an old log

    if step_factory is None:
        graphdef, state = nnx.split((model, optimizer))
        step_fn = make_train_step(graphdef, schedule, config.compute_dtype)
    else:
        step_fn, state = step_factory(model, optimizer, schedule, config.compute_dtype)

    def sync() -> None:
        nnx.update((model, optimizer), state)

    writer = MetricsWriter(metrics_path)
    bar = tqdm(total=config.steps, initial=start_step, disable=not config.progress, dynamic_ncols=True,
               desc="train")
    expected = (config.batch_size, config.seq_len)
    pending: list[tuple[int, dict[str, jax.Array]]] = []  # step metrics not yet fetched from the device
    losses: list[list[float]] = []
    window: list[float] = []  # losses since the last log record
    run = {"last_eval": None, "final_loss_avg": None, "excluded": 0.0, "t_window": time.perf_counter(),
           "window_tokens": 0, "handled": start_step}
    compile_s = 0.0
    t_start = time.perf_counter()
    t_steady = None          # wall clock after the first (compiling) step of this run
    steady_tokens = 0        # tokens processed after the first step

    def pause(step: int, do_log: bool, do_eval: bool, do_ckpt: bool) -> None:
        """Fetch metrics, log, evaluate, checkpoint; the time spent here is excluded from tokens/s."""
        nonlocal window
        jax.block_until_ready(state)  # the wait is training time; what follows is not
        t_pause = time.perf_counter()
        # train_seconds: wall clock of this run so far, compile included, log/eval/checkpoint pauses excluded.
        record: dict[str, Any] = {"step": step, "tokens_seen": tokens_seen,
                                  "train_seconds": t_pause - t_start - run["excluded"]}
        if pending:
            fetched = jax.device_get([m for _, m in pending])
            for (s, _), m in zip(pending, fetched):
                losses.append([s, float(m["loss"])])
                window.append(float(m["loss"]))
            pending.clear()
            m = fetched[-1]
            elapsed = t_pause - run["t_window"]
            tps = run["window_tokens"] / elapsed if elapsed > 0 and run["window_tokens"] else None
            record.update({"loss": float(m["loss"]), "loss_avg": float(np.mean(window)), "lr": float(m["lr"]),
                           "grad_norm": float(m["grad_norm"]), "n_tokens": float(m["n_tokens"]),
                           "tokens_seen": tokens_seen, "tokens_per_second": tps})
            for key in _MOE_METRICS:  # MoE routing state at this step (expert_load: [layer][expert])
                if key in m:
                    record[key] = np.asarray(m[key]).tolist()
            bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tps:,.0f}" if tps else "-")
        if do_eval:
            sync()
            run["last_eval"] = float(eval_fn(model))
            record["eval_loss"] = run["last_eval"]
            bar.write(f"step {step}: eval loss {run['last_eval']:.4f}")
        if do_log or do_eval:
            writer.write(record)
            if do_log and window:
                run["final_loss_avg"] = float(np.mean(window))
                window = []
        if do_ckpt:
            sync()
            ckpt.save(step, model, optimizer, train_iter, extra={"tokens_seen": tokens_seen})
        t_resume = time.perf_counter()
        run["excluded"] += t_resume - t_pause
        run["t_window"], run["window_tokens"], run["handled"] = t_resume, 0, step

    step = start_step
    finished = False
    try:
        while step < config.steps:
            try:
                raw = next(train_iter)
            except StopIteration:
                warnings.warn(f"train_iter ran out after step {step} of {config.steps}; stopping early",
                              stacklevel=2)
                if step > run["handled"]:  # log / evaluate / checkpoint the last step taken
                    pause(step, True, eval_fn is not None, ckpt is not None and config.checkpoint_every > 0)
                break
            batch = _select(raw, f"train_iter (step {step + 1})")
            if np.shape(batch["tokens"]) != expected:
                raise ValueError(f"train_iter (step {step + 1}): batch['tokens'] has shape "
                                 f"{np.shape(batch['tokens'])}, expected [batch_size, seq_len] = {expected}")
            n_tok = int(np.prod(np.shape(batch["tokens"])))
            state, metrics = step_fn(state, batch)
            step += 1
            tokens_seen += n_tok
            run["window_tokens"] += n_tok
            pending.append((step, metrics))
            if t_steady is None:
                jax.block_until_ready(metrics)
                compile_s = time.perf_counter() - t_start
                t_steady = run["t_window"] = time.perf_counter()
                run["window_tokens"] = 0
            else:
                steady_tokens += n_tok
            bar.update(1)

            is_last = step == config.steps
            do_log = step % config.log_every == 0 or is_last
            do_eval = eval_fn is not None and (
                is_last or (config.eval_every > 0 and step % config.eval_every == 0))
            do_ckpt = ckpt is not None and config.checkpoint_every > 0 and (
                is_last or step % config.checkpoint_every == 0)
            if do_log or do_eval or do_ckpt:
                pause(step, do_log, do_eval, do_ckpt)
        finished = True
    finally:
        bar.close()
        writer.close()
        if ckpt is not None:
            ckpt.close()
        # Leave `model` / `optimizer` holding the latest state, also after an exception or Ctrl-C.
        try:
            jax.block_until_ready(state)
            sync()
        except Exception:
            if finished:
                raise  # otherwise keep the original exception
    t_end = time.perf_counter()
    steady_s = (t_end - t_steady - run["excluded"]) if t_steady is not None else 0.0
    tps = steady_tokens / steady_s if steady_tokens and steady_s > 0 else None
    plot_loss_curve(read_metrics(metrics_path), plot_path, title=f"training loss ({out_dir.name})")
    final_avg = float(np.mean(window)) if window else run["final_loss_avg"]
    return {
        "final_step": step,
        "start_step": start_step,
        "steps_run": step - start_step,
        "train_tokens": tokens_seen,
        "tokens_per_second": tps,
        "compile_seconds": compile_s,
        "wall_seconds": t_end - t_start,
        "final_loss": losses[-1][1] if losses else None,
        "final_loss_avg": final_avg,
        "final_eval_loss": run["last_eval"],
        "losses": losses,
        "n_params": n_params,
        "metrics_path": str(metrics_path),
        "plot_path": str(plot_path),
    }
