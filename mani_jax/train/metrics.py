"""Training metrics: JSONL log, loss-curve plot, parameter count."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import jax
import numpy as np
from flax import nnx

__all__ = ["MetricsWriter", "read_metrics", "truncate_metrics", "plot_loss_curve", "count_params"]


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "__array__"):
        v = np.asarray(v).item() if np.asarray(v).ndim == 0 else np.asarray(v).tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep them visible as strings
    return v


class MetricsWriter:
    """Append-only JSONL writer: one JSON object per line, flushed after every record.

    Args:
      path: the ``.jsonl`` file; its parent directory is created. Existing content is kept (appended to),
        so a resumed run continues the same file (see :func:`truncate_metrics`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (scalars: Python, numpy or jax; non-finite floats become strings) and flush."""
        self._f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics JSONL file (``[]`` if it does not exist); a torn last line is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash mid-write
    return out


def truncate_metrics(path: str | os.PathLike, after_step: int) -> None:
    """Drop records with ``step > after_step`` (used on resume so re-run steps are not logged twice).

    Rewrites through a temporary file and an atomic rename. No-op if the file does not exist.
    """
    path = Path(path)
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if int(r.get("step", 0)) <= after_step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in keep:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def _as_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def plot_loss_curve(records: Iterable[dict[str, Any]], out_path: str | os.PathLike,
                    title: str = "loss") -> Path:
    """Plot train loss (line) and eval loss (points) against step; write a PNG with the Agg backend.

    Args:
      records: metric dicts with ``step`` and optionally ``loss``, ``loss_avg`` and ``eval_loss`` (e.g. from
        :func:`read_metrics`).
      out_path: where the PNG goes (written to a temporary name, then renamed).
      title: the plot title.

    Returns:
      ``out_path`` as a ``Path``.
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    records = list(records)
    train = [(r["step"], _as_float(r["loss"])) for r in records if "loss" in r]
    train_avg = [(r["step"], _as_float(r["loss_avg"])) for r in records if "loss_avg" in r]
    evals = [(r["step"], _as_float(r["eval_loss"])) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        s, l = zip(*train)
        ax.plot(s, l, label="train loss (logged step)", lw=0.8, alpha=0.4 if train_avg else 1.0)
    if train_avg:
        s, l = zip(*train_avg)
        ax.plot(s, l, label="train loss (mean since last log)", lw=1.4)
    if evals:
        s, l = zip(*evals)
        ax.plot(s, l, "o-", label="eval loss", ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    return save_figure(fig, out_path)


def save_figure(fig, out_path: str | os.PathLike, **savefig_kwargs) -> Path:
    """Write a matplotlib figure as PNG to a temporary name, then rename (never a half-written file);
    closes the figure. ``savefig_kwargs`` go to ``fig.savefig`` (default ``dpi=110``). Returns the path."""
    import matplotlib.pyplot as plt

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.stem + ".tmp" + out_path.suffix)
    fig.savefig(tmp, **{"dpi": 110, **savefig_kwargs})
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path


def count_params(model: nnx.Module, filter: Any = nnx.Param) -> int:
    """Number of scalar parameters in ``model`` (its variables matching ``filter``, default ``nnx.Param``).

    Works on a concrete model and on an abstract one from ``nnx.eval_shape`` (nothing is allocated).
    """
    state = nnx.state(model, filter)
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state)))
