"""Checkpoints: model state + optimizer state + step + data-iterator state, with orbax.

Layout (one orbax ``CheckpointManager`` root, usually ``RUN_DIR/checkpoints``)::

    checkpoints/
      <step>/
        model/       nnx.state(model) as a pure dict (orbax StandardSave: tensorstore/OCDBT arrays)
        optimizer/   nnx.state(optimizer) as a pure dict (Adam moments, counts, the optimizer step)
        data_iter/   the data iterator's ``get_state()`` as JSON (absent state is stored as null)
        meta/        JSON: {"step": int, "extra": {...}} (e.g. tokens seen)
        _CHECKPOINT_METADATA, commit_success.txt

Atomicity: orbax writes every step into ``<step>.orbax-checkpoint-tmp*`` and only renames it to
``<step>`` once all items are written and flushed (``orbax.checkpoint._src.path.atomicity
.AtomicRenameTemporaryPath``, the default on local file systems; it also writes ``commit_success.txt``).
A crash mid-save therefore leaves a ``*.orbax-checkpoint-tmp*`` directory that is never listed as a step
and is ignored by :meth:`Checkpointer.latest_step`; the previous checkpoints stay intact, and the next
writable ``Checkpointer`` on that root deletes the leftover. Saving here is
synchronous (``enable_async_checkpointing=False``), so the trainer may donate its buffers right after.

Restoring goes *into* an existing model / optimizer: their current state supplies the tree structure,
shapes, dtypes and shardings (so a mismatching checkpoint is rejected, not silently reshaped).
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

__all__ = ["Checkpointer", "restore_checkpoint", "checkpoint_steps"]

_ITEMS = ("model", "optimizer", "data_iter", "meta")


# ------------------------------------------------------------------ state <-> saveable pure dicts

def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_saveable(node: Any) -> dict:
    """``nnx.state(node)`` as a pure dict; typed PRNG keys become their raw uint32 key data."""
    pure = nnx.to_pure_dict(nnx.state(node))
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, pure)


def _abstract(pure: dict) -> dict:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, pure)


def _load_into(node: Any, restored: dict) -> None:
    """Write a restored pure dict into ``node`` (model or optimizer), re-wrapping PRNG key data."""
    state = nnx.state(node)
    current = nnx.to_pure_dict(state)
    restored = jax.tree.map(
        lambda cur, new: jax.random.wrap_key_data(new, impl=jax.random.key_impl(cur)) if _is_key(cur) else new,
        current, restored)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(node, state)


def _encode_iter_state(state: Any) -> Any:
    """Make a data-iterator state JSON-serialisable (grain ``DataLoaderIterator`` states are bytes)."""
    if isinstance(state, bytes):
        return {"__bytes_b64__": base64.b64encode(state).decode("ascii")}
    return state


def _decode_iter_state(state: Any) -> Any:
    if isinstance(state, dict) and set(state) == {"__bytes_b64__"}:
        return base64.b64decode(state["__bytes_b64__"])
    return state


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _flat(tree: Any) -> dict[str, Any]:
    return {"/".join(_key_name(k) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_matches(saved: Any, target: dict, item: str, step_dir: Path) -> None:
    """Raise ``ValueError`` naming the paths where the saved tree differs from ``target`` in keys/shapes."""
    tree = getattr(saved, "tree", saved)
    if tree is None:
        raise ValueError(f"checkpoint {str(step_dir)!r} is corrupt: item {item!r} has no readable metadata")
    have, want = _flat(tree), _flat(target)
    problems = [f"{p}: missing from checkpoint" for p in sorted(set(want) - set(have))]
    problems += [f"{p}: in checkpoint but not in the {item}" for p in sorted(set(have) - set(want))]
    for p in sorted(set(have) & set(want)):
        hs, ws = tuple(getattr(have[p], "shape", ())), tuple(getattr(want[p], "shape", ()))
        if hs != ws:
            problems.append(f"{p}: checkpoint shape {hs} vs {item} shape {ws}")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} differences)" if len(problems) > 6 else "")
        raise ValueError(f"checkpoint {str(step_dir)!r} does not match the given {item}: {shown}")


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """The finished checkpoint steps under ``directory`` (ascending); ``[]`` if none or no directory.

    Unfinished saves (``*.orbax-checkpoint-tmp*`` directories) are not listed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.is_dir() and p.name.isdigit())


# ------------------------------------------------------------------ the checkpointer

class Checkpointer:
    """Save / restore training state under one directory with an orbax ``CheckpointManager``.

    Args:
      directory: the checkpoint root (e.g. ``RUN_DIR/checkpoints``); created on the first save unless
        ``read_only``.
      max_to_keep: how many most-recent checkpoints to keep (older ones are deleted after a save), >= 1.
      read_only: open an existing root for restoring only; raises ``FileNotFoundError`` if it does not
        exist.

    Raises:
      ValueError: ``max_to_keep < 1``.
      FileNotFoundError: ``read_only`` and ``directory`` does not exist.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2, read_only: bool = False):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory {str(self.directory)!r} does not exist")
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"checkpoint directory {str(self.directory)!r} exists and is not a directory")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=not read_only,
        )
        handlers = {"model": ocp.StandardCheckpointHandler(), "optimizer": ocp.StandardCheckpointHandler(),
                    "data_iter": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        # orbax removes stale ``*.orbax-checkpoint-tmp*`` dirs (crashed saves) in a background future;
        # wait for it so the directory is clean when the constructor returns.
        getattr(self._mngr, "_maybe_await_cleanup_tmp_directory", lambda: None)()

    # -- queries
    def all_steps(self) -> list[int]:
        """Finished checkpoint steps, ascending."""
        self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        """The newest finished checkpoint step, or ``None`` when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- save
    def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer | None = None,
             data_iter: Any = None, extra: dict[str, Any] | None = None) -> None:
        """Write checkpoint ``step`` (blocking; atomic: temp directory + rename by orbax).

        Args:
          step: the number of optimizer steps taken so far (>= 0).
          model: the model; all of ``nnx.state(model)`` is saved (params and any other variables).
          optimizer: its ``nnx.state`` (moments, counts, step) is saved when given.
          data_iter: an iterator with ``get_state()`` (a grain ``DatasetIterator`` /
            ``DataLoaderIterator``); its state must be JSON-serialisable (dict) or bytes. ``None`` or an
            iterator without ``get_state`` stores ``null``.
          extra: small JSON-serialisable dict stored beside the step (e.g. ``{"tokens_seen": n}``).

        Raises:
          ValueError: ``step`` is negative or already saved, or the iterator state is not
            JSON-serialisable.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step in self.all_steps():
            raise ValueError(f"checkpoint step {step} already exists in {str(self.directory)!r}")
        iter_state = None
        if data_iter is not None and hasattr(data_iter, "get_state"):
            iter_state = _encode_iter_state(data_iter.get_state())
        items = {
            "model": ocp.args.StandardSave(_to_saveable(model)),
            "meta": ocp.args.JsonSave({"step": int(step), "extra": dict(extra or {})}),
            "data_iter": ocp.args.JsonSave({"state": iter_state}),
        }
        if optimizer is not None:
            items["optimizer"] = ocp.args.StandardSave(_to_saveable(optimizer))
        try:
            self._mngr.save(int(step), args=ocp.args.Composite(**items), force=True)
        except TypeError as e:
            raise ValueError(f"cannot save checkpoint step {step} to {str(self.directory)!r}: data_iter state "
                             f"or extra is not JSON-serialisable ({e})") from e
        self._mngr.wait_until_finished()

    # -- restore
    def restore(self, model: nnx.Module, optimizer: nnx.Optimizer | None = None, data_iter: Any = None,
                step: int | None = None) -> dict[str, Any]:
        """Load checkpoint ``step`` (default: the latest) into ``model`` / ``optimizer`` / ``data_iter``.

        ``model`` and ``optimizer`` must have the structure of the saved ones (same module tree, shapes and
        dtypes); their arrays are replaced in place (``nnx.update``). ``data_iter.set_state`` is called
        with the saved state when both exist.

        Returns:
          ``{"step": int, "extra": dict, "data_iter_restored": bool}``.

        Raises:
          FileNotFoundError: the directory holds no finished checkpoint, or not ``step``. The message names
            the directory and the steps that exist.
          ValueError: the step directory is corrupt (missing or unreadable files) or does not match the
            structure of ``model`` / ``optimizer``; the message names the step directory.
        """
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"no checkpoint found in {str(self.directory)!r} (expected step directories like "
                f"'{self.directory}/100' written by Checkpointer.save)")
        if step is None:
            step = steps[-1]
        if step not in steps:
            raise FileNotFoundError(f"checkpoint step {step} not found in {str(self.directory)!r}; "
                                    f"steps present: {steps}")
        step_dir = self.directory / str(step)
        present = {p.name for p in step_dir.iterdir()} if step_dir.is_dir() else set()
        needed = {"model", "meta"} | ({"optimizer"} if optimizer is not None else set())
        missing = sorted(needed - present)
        if missing:
            raise ValueError(f"checkpoint {str(step_dir)!r} is incomplete or corrupt: missing {missing} "
                             f"(found {sorted(present)})")
        targets = {"model": _to_saveable(model)}
        if optimizer is not None:
            targets["optimizer"] = _to_saveable(optimizer)
        try:
            saved = self._mngr.item_metadata(step)
            saved = {name: saved[name] for name in targets}
        except Exception as e:  # orbax raises KeyError / JSONDecodeError / ... on unreadable metadata
            raise ValueError(f"checkpoint {str(step_dir)!r} is corrupt: cannot read its metadata "
                             f"({type(e).__name__}: {e})") from e
        for name, target in targets.items():
            _check_matches(saved[name], target, name, step_dir)
        items = {
            "model": ocp.args.StandardRestore(_abstract(targets["model"])),
            "meta": ocp.args.JsonRestore(),
        }
        if optimizer is not None:
            items["optimizer"] = ocp.args.StandardRestore(_abstract(targets["optimizer"]))
        if "data_iter" in present:
            items["data_iter"] = ocp.args.JsonRestore()
        try:
            restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax/tensorstore raise many types on corrupt or mismatching files
            raise ValueError(
                f"checkpoint {str(step_dir)!r} is corrupt or does not match the given model/optimizer "
                f"structure: {type(e).__name__}: {e}") from e
        meta = restored["meta"]
        if not isinstance(meta, dict) or "step" not in meta:
            raise ValueError(f"checkpoint {str(step_dir)!r} is corrupt: meta item has no 'step' ({meta!r})")
        try:
            _load_into(model, restored["model"])
            if optimizer is not None:
                _load_into(optimizer, restored["optimizer"])
        except Exception as e:
            raise ValueError(f"checkpoint {str(step_dir)!r} does not match the given model/optimizer "
                             f"structure: {type(e).__name__}: {e}") from e
        data_restored = False
        if data_iter is not None and "data_iter" in items:
            iter_state = (restored["data_iter"] or {}).get("state")
            if iter_state is not None and hasattr(data_iter, "set_state"):
                data_iter.set_state(_decode_iter_state(iter_state))
                data_restored = True
        return {"step": int(meta["step"]), "extra": dict(meta.get("extra") or {}),
                "data_iter_restored": data_restored}

    def close(self) -> None:
        self._mngr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def restore_checkpoint(directory: str | os.PathLike, model: nnx.Module, optimizer: nnx.Optimizer | None = None,
                       data_iter: Any = None, step: int | None = None) -> dict[str, Any]:
    """Restore from an existing checkpoint root without creating anything (read-only).

    ``directory`` is the root that holds the step directories (``RUN_DIR/checkpoints``); a run directory
    that contains ``checkpoints/`` is accepted too. Typical use: load trained weights into a freshly built
    model for evaluation or export: ``restore_checkpoint(run_dir, model)``.

    Returns / Raises: as :meth:`Checkpointer.restore`; also ``FileNotFoundError`` if ``directory`` does
    not exist or holds no checkpoint.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
    if not checkpoint_steps(directory) and (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    ckpt = Checkpointer(directory, read_only=True)
    try:
        return ckpt.restore(model, optimizer, data_iter, step=step)
    finally:
        ckpt.close()
