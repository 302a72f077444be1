"""Logical-axis sharding rules: every parameter dimension gets a logical name, and one table maps logical
names to mesh axes (the MaxText ``logical_axis_rules`` / EasyLM ``get_partition_rules`` idea).

Two tables, read top to bottom:

1. :data:`PARAM_AXES` names each dimension of each parameter by the end of its path in the NNX state
   (``("mixer", "q_proj", "kernel")`` ...), first match wins. The same suffix matches the parameter's
   Adam moments (``opt_state/.../mu/<param path>``), so optimizer state follows its parameter.
2. :data:`LOGICAL_RULES` maps each logical name to the mesh axes (:data:`mani_jax.parallel.mesh.AXES`) it
   is split over, or ``None`` (replicated). A mesh axis of size 1 splits nothing, so the one table serves
   every layout: the mesh's shape picks the strategy.

==================  ========================  =================================================================
logical axis        mesh axes                 dimensions it names
==================  ========================  =================================================================
``batch``           data, fsdp, expert        batch of activations and of the input batch
``act_seq``,        --                        sequence and d_model of the residual stream (replicated: the
``act_embed``                                 Megatron layout; FSDP gathers weights, not activations)
``vocab``           tensor                    embedding rows, lm_head columns (vocab-parallel)
``embed``           fsdp                      the d_model side of every weight matrix (FSDP / ZeRO-3)
``q_heads``         tensor                    q_proj columns, o_proj rows (Megatron column / row)
``kv_heads``        tensor                    k_proj, v_proj columns
``mlp``             tensor                    gate/up columns, down rows; expert d_ff
``ssm_in``          tensor                    Mamba-2 in_proj columns ``[z|x|B|C|dt]``
``ssm_conv``        tensor                    conv channels ``[x|B|C]``
``ssm_heads``       tensor                    dt_bias, A_log, D
``ssm_inner``       tensor                    gated-norm scale, out_proj rows (row-parallel)
``expert``          expert                    leading axis of the stacked expert weights
``stage``           pipeline                  leading axis of stacked pipeline-stage parameters
``norm``, ``conv_width``, ``router``, ``layer``  --  replicated (small)
==================  ========================  =================================================================

Strategies are the mesh shape plus, for ZeRO-1, a second table for the optimizer state
(:data:`ZERO1_OPT_RULES`: ``embed`` also over ``data``, so Adam moments are split over the data replicas
while the parameters stay whole). These are sharding *annotations*: the jitted step is compiled by XLA's
GSPMD partitioner, which propagates them through the model (``Auto`` mesh axes) and inserts the
collectives.

Divisibility: a dimension must divide evenly by the product of its mesh axes; otherwise
:func:`spec_for` raises a ``ValueError`` naming the parameter, the dimension and the axes, and
:func:`check_model_config` explains it in config fields first (e.g. Mamba-2 tensor parallelism needs
``mamba_n_heads % tensor == 0`` and ``n_groups % tensor == 0``).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mani_jax.parallel.mesh import batch_axes
from mani_jax.parallel.multiprocess import place

__all__ = ["PARAM_AXES", "LOGICAL_RULES", "ZERO1_OPT_RULES", "logical_axes", "spec_for", "with_rules",
           "tree_shardings", "model_shardings", "shard_model", "shard_train_state", "batch_sharding",
           "check_model_config", "path_names", "describe_shardings"]

Rules = Sequence[tuple[str, Any]]

#: (path suffix, logical axis per array dimension); first match wins. Sizes refer to :class:`ModelConfig`.
PARAM_AXES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("embed", "embedding"),        ("vocab", "embed")),          # [vocab_size, d_model]
    (("lm_head", "kernel"),         ("embed", "vocab")),          # [d_model, vocab_size]
    (("q_proj", "kernel"),          ("embed", "q_heads")),        # [d_model, n_heads * head_dim]
    (("q_proj", "bias"),            ("q_heads",)),
    (("k_proj", "kernel"),          ("embed", "kv_heads")),       # [d_model, n_kv_heads * head_dim]
    (("k_proj", "bias"),            ("kv_heads",)),
    (("v_proj", "kernel"),          ("embed", "kv_heads")),
    (("v_proj", "bias"),            ("kv_heads",)),
    (("o_proj", "kernel"),          ("q_heads", "embed")),        # [n_heads * head_dim, d_model]
    (("gate_proj", "kernel"),       ("embed", "mlp")),            # [d_model, d_ff]
    (("gate_proj", "bias"),         ("mlp",)),
    (("up_proj", "kernel"),         ("embed", "mlp")),
    (("up_proj", "bias"),           ("mlp",)),
    (("down_proj", "kernel"),       ("mlp", "embed")),            # [d_ff, d_model]
    (("in_proj", "kernel"),         ("embed", "ssm_in")),         # [d_model, 2 d_inner + 2 G N + H]
    (("in_proj", "bias"),           ("ssm_in",)),
    (("conv_weight",),              ("ssm_conv", "conv_width")),  # [conv_dim, d_conv]
    (("conv_bias",),                ("ssm_conv",)),               # [conv_dim]
    (("dt_bias",),                  ("ssm_heads",)),              # [mamba_n_heads]
    (("A_log",),                    ("ssm_heads",)),
    (("D",),                        ("ssm_heads",)),
    (("mixer", "norm", "weight"),   ("ssm_inner",)),              # [d_inner] gated RMSNorm scale
    (("out_proj", "kernel"),        ("ssm_inner", "embed")),      # [d_inner, d_model]
    (("router", "kernel"),          ("embed", "router")),         # [d_model, n_experts]
    (("w_gate",),                   ("expert", "embed", "mlp")),  # [n_experts, d_model, d_ff_expert]
    (("w_up",),                     ("expert", "embed", "mlp")),
    (("w_down",),                   ("expert", "mlp", "embed")),  # [n_experts, d_ff_expert, d_model]
    (("weight",),                   ("norm",)),                   # RMSNorm scales [d_model]
    (("bias",),                     ("norm",)),                   # o_proj / down_proj / out_proj bias
)

#: logical axis -> mesh axes (a name, a tuple of names, or None = replicated).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch",       ("data", "fsdp", "expert")),
    ("act_seq",     None),
    ("act_embed",   None),
    ("vocab",       "tensor"),
    ("embed",       "fsdp"),
    ("q_heads",     "tensor"),
    ("kv_heads",    "tensor"),
    ("mlp",         "tensor"),
    ("ssm_in",      "tensor"),
    ("ssm_conv",    "tensor"),
    ("ssm_heads",   "tensor"),
    ("ssm_inner",   "tensor"),
    ("expert",      "expert"),
    ("stage",       "pipeline"),
    ("layer",       None),
    ("router",      None),
    ("conv_width",  None),
    ("norm",        None),
)


def with_rules(rules: Rules = LOGICAL_RULES, **changes) -> tuple[tuple[str, Any], ...]:
    """A copy of ``rules`` with some logical axes remapped, e.g. ``with_rules(embed=None)`` (no FSDP).

    Raises:
      ValueError: a key is not a logical axis of ``rules``.
    """
    names = [k for k, _ in rules]
    unknown = sorted(set(changes) - set(names))
    if unknown:
        raise ValueError(f"with_rules: unknown logical axes {unknown}; known: {names}")
    return tuple((k, changes.get(k, v)) for k, v in rules)


#: ZeRO-1 (Rajbhandari et al. 2020, "ZeRO", Sec. 5.1 P_os): Adam moments split over the data replicas
#: along the d_model side; used for the optimizer state only, the parameters keep :data:`LOGICAL_RULES`.
ZERO1_OPT_RULES = with_rules(LOGICAL_RULES, embed=("fsdp", "data"))


def path_names(path: Iterable[Any]) -> tuple[str, ...]:
    """A pytree / NNX state path as strings (``DictKey``, ``GetAttrKey``, indices), without ``value``."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                k = getattr(k, attr)
                break
        out.append(str(k))
    if out and out[-1] == "value":
        out.pop()
    return tuple(out)


def logical_axes(path: Sequence[Any], ndim: int) -> tuple[str | None, ...] | None:
    """The logical axis names of the array at ``path`` (first :data:`PARAM_AXES` suffix match).

    Args:
      path: the array's path (strings or pytree keys), e.g. ``("layers", "0", "mixer", "q_proj", "kernel")``.
      ndim: the array's rank.

    Returns:
      one name per dimension, or ``None`` when no pattern matches (scalars, step counts, unknown arrays:
      they are replicated).

    Raises:
      ValueError: a pattern matches but names a different number of dimensions than ``ndim``.
    """
    names = path_names(path)
    for suffix, axes in PARAM_AXES:
        if len(names) >= len(suffix) and names[-len(suffix):] == suffix:
            if len(axes) != ndim:
                raise ValueError(f"{'/'.join(names)}: rank {ndim}, but the rule {suffix} names {len(axes)} "
                                 f"dimensions {axes}")
            return axes
    return None


def _mesh_axes(rules: Rules, logical: str | None) -> tuple[str, ...]:
    if logical is None:
        return ()
    table = dict(rules)
    if logical not in table:
        raise ValueError(f"logical axis {logical!r} has no rule; rules cover {sorted(table)}")
    v = table[logical]
    return () if v is None else ((v,) if isinstance(v, str) else tuple(v))


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = LOGICAL_RULES,
             *, where: str = "array") -> P:
    """The :class:`PartitionSpec` of an array whose dimensions have the ``logical`` names.

    Mesh axes of size 1 are dropped from the spec (they split nothing). A mesh axis used by an earlier
    dimension of the same array is not used again (e.g. ``stage`` and ``embed`` both on one axis).

    Raises:
      ValueError: a dimension is not divisible by the product of its mesh axis sizes, naming ``where``,
        the dimension, its logical name and the axes.
    """
    if len(logical) != len(shape):
        raise ValueError(f"{where}: {len(logical)} logical axes {tuple(logical)} for shape {tuple(shape)}")
    used: set[str] = set()
    parts = []
    for dim, (name, size) in enumerate(zip(logical, shape)):
        axes = [a for a in _mesh_axes(rules, name) if a in mesh.shape and mesh.shape[a] > 1 and a not in used]
        n = math.prod(mesh.shape[a] for a in axes)
        if size % n:
            raise ValueError(f"{where}: dimension {dim} ({name!r}) has size {size}, not divisible by mesh axes "
                             f"{axes} of total size {n}; change the model config or the mesh "
                             f"({dict(mesh.shape)})")
        used.update(axes)
        parts.append(None if not axes else (axes[0] if len(axes) == 1 else tuple(axes)))
    while parts and parts[-1] is None:
        parts.pop()
    return P(*parts)


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES, *, opt_rules: Rules | None = None,
                   lead_axes: Sequence[str] = ()) -> Any:
    """:class:`NamedSharding` for every array leaf of ``tree`` (an ``nnx.State``, a dict, ...), same structure.

    Leaves whose path contains ``opt_state`` use ``opt_rules`` (default ``rules``); leaves no
    :data:`PARAM_AXES` pattern matches (scalars, counters) are replicated. ``lead_axes`` are logical names
    of extra leading dimensions every matched leaf has (e.g. ``("stage", "layer")`` for stacked stages).

    Raises:
      ValueError: from :func:`logical_axes` / :func:`spec_for` (rank mismatch, indivisible dimension).
    """
    opt_rules = rules if opt_rules is None else opt_rules

    def one(path, x):
        names = path_names(path)
        shape = np.shape(x)
        if not shape:
            return NamedSharding(mesh, P())
        inner = logical_axes(names, len(shape) - len(lead_axes))
        if inner is None:
            return NamedSharding(mesh, P())
        r = opt_rules if "opt_state" in names else rules
        return NamedSharding(mesh, spec_for(tuple(lead_axes) + inner, shape, mesh, r, where="/".join(names)))

    return jax.tree_util.tree_map_with_path(one, tree)


def model_shardings(model: nnx.Module, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> nnx.State:
    """The shardings of ``model``'s ``nnx.Param`` state under ``rules`` (an ``nnx.State`` of
    :class:`NamedSharding`)."""
    return tree_shardings(nnx.state(model, nnx.Param), mesh, rules)


def check_model_config(cfg, mesh: Mesh) -> None:
    """Explain, in :class:`~mani_jax.models.ModelConfig` fields, why a model cannot be split on ``mesh``.

    Tensor parallelism (Megatron-LM column/row splits, Shoeybi et al. 2019) needs ``n_heads``,
    ``n_kv_heads`` (whole KV heads per rank), ``d_ff``, ``vocab_size`` and, for Mamba-2 layers,
    ``mamba_n_heads`` and ``n_groups`` (each rank owns whole heads and whole B/C groups) divisible by the
    ``tensor`` axis; ``d_ff_expert`` too for an MoE. FSDP (and ZeRO-1's optimizer state) splits ``d_model``.
    Expert parallelism needs ``n_experts % expert == 0``.

    Raises:
      ValueError: naming the first field that does not divide, its value and the mesh axis.
    """
    tp = mesh.shape.get("tensor", 1)
    need: list[tuple[str, int, str, int]] = []
    if tp > 1:
        need += [("vocab_size", cfg.vocab_size, "tensor", tp)]
        if cfg.n_attention_layers:
            need += [("n_heads", cfg.n_heads, "tensor", tp), ("n_kv_heads", cfg.n_kv_heads, "tensor", tp)]
        if cfg.n_mamba_layers:
            need += [("mamba_n_heads", cfg.mamba_n_heads, "tensor", tp), ("n_groups", cfg.n_groups, "tensor", tp)]
        if cfg.n_experts == 0 or cfg.shared_mlp:
            need += [("d_ff", cfg.d_ff, "tensor", tp)]
        if cfg.n_experts:
            need += [("d_ff_expert", cfg.d_ff_expert, "tensor", tp)]
    fs = mesh.shape.get("fsdp", 1)
    if fs > 1:
        need += [("d_model", cfg.d_model, "fsdp", fs)]
    ep = mesh.shape.get("expert", 1)
    if ep > 1 and cfg.n_experts:
        need += [("n_experts", cfg.n_experts, "expert", ep)]
    for field, value, axis, size in need:
        if value % size:
            what = " (Mamba-2 tensor parallelism gives each rank whole heads and whole B/C groups)" \
                if field in ("mamba_n_heads", "n_groups") else ""
            raise ValueError(f"ModelConfig.{field}={value} is not divisible by the {axis!r} mesh axis of size "
                             f"{size}{what}")


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a ``[batch, seq, ...]`` input: batch over ``data``, ``fsdp`` and ``expert``."""
    axes = tuple(a for a in batch_axes(mesh) if mesh.shape[a] > 1)
    first = None if not axes else (axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, P(first, *([None] * (ndim - 1))))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> nnx.State:
    """Place ``model``'s parameters on ``mesh`` as ``rules`` say (in place) and return their shardings.

    Raises:
      ValueError: a parameter dimension does not divide (see :func:`spec_for`); for a
        :class:`~mani_jax.models.HybridLM`, :func:`check_model_config` first names the config field.
    """
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "n_mamba_layers"):
        check_model_config(cfg, mesh)
    shardings = model_shardings(model, mesh, rules)
    nnx.update(model, place(nnx.state(model, nnx.Param), shardings))
    return shardings


def shard_train_state(model: nnx.Module, optimizer: nnx.Optimizer, mesh: Mesh, rules: Rules = LOGICAL_RULES,
                      *, zero1: bool = False):
    """Split ``(model, optimizer)`` and place the state on ``mesh``.

    Args:
      model, optimizer: the pair the trainer trains (``optimizer`` over ``model``'s ``nnx.Param``).
      mesh: from :func:`mani_jax.parallel.make_mesh`.
      rules: parameter rules; the optimizer state follows them, or :data:`ZERO1_OPT_RULES`'s version of
        them with ``zero1=True`` (moments split over ``data`` too).

    Returns:
      ``(graphdef, state, shardings)``: ``state`` is ``nnx.split((model, optimizer))[1]`` placed on the
      mesh, ``shardings`` its :class:`NamedSharding` tree.

    Raises:
      ValueError: see :func:`shard_model`.
    """
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "n_mamba_layers"):
        check_model_config(cfg, mesh)
    graphdef, state = nnx.split((model, optimizer))
    opt_rules = with_rules(rules, embed=_add_axis(dict(rules)["embed"], "data")) if zero1 else rules
    shardings = tree_shardings(state, mesh, rules, opt_rules=opt_rules)
    return graphdef, place(state, shardings), shardings


def _add_axis(v, axis: str):
    v = () if v is None else ((v,) if isinstance(v, str) else tuple(v))
    return v if axis in v else v + (axis,)


def describe_shardings(tree: Any, shardings: Any = None) -> dict[str, str]:
    """``{"path": "shape -> spec"}`` for every array of ``tree`` (its own shardings, or ``shardings``)."""
    out = {}
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    shs = jax.tree.leaves(shardings) if shardings is not None else [getattr(x, "sharding", None) for _, x in leaves]
    for (path, x), sh in zip(leaves, shs):
        spec = getattr(sh, "spec", sh)
        out["/".join(path_names(path))] = f"{tuple(np.shape(x))} -> {spec}"
    return out
