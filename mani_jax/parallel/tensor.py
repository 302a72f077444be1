"""Tensor parallelism with the collectives written out: a ``shard_map`` forward of the hybrid model.

Sharding mode: **manual** (``jax.shard_map`` over every mesh axis; only ``data`` and ``tensor`` may be
larger than 1). The annotation version of the same splits is
:func:`mani_jax.parallel.step.make_sharded_train_step` on a mesh with ``tensor > 1``; both use the
parameter shardings of :data:`mani_jax.parallel.rules.LOGICAL_RULES` and are tested equal to each other
and to the unsharded model.

The splits (Shoeybi et al. 2019, "Megatron-LM", Sec. 3, Fig. 3; ``t`` = tensor rank, ``P`` = ranks):

* **attention** (the configured ``attention_impl`` on local heads): ``q/k/v_proj`` column-parallel (rank
  ``t`` owns query heads ``[t H/P, (t+1) H/P)`` and KV heads ``[t K/P, (t+1) K/P)``, which are exactly the
  KV heads those query heads read under GQA); ``o_proj`` row-parallel, then ``psum`` over ``tensor``.
* **SwiGLU MLP**: ``gate/up_proj`` column-parallel, ``down_proj`` row-parallel, ``psum``. MoE experts split
  their ``d_ff_expert`` the same way (router replicated).
* **Mamba-2**: ``in_proj`` column-parallel, ``out_proj`` row-parallel, ``psum``. ``in_proj``'s columns are
  ``[z | x | B | C | dt]``; a contiguous split would cut across those blocks, so the parameters are kept in
  a *TP layout* (:func:`to_tp_layout`) whose rank-``t`` slice is ``[z_t | x_t | B_t | C_t | dt_t]``: the
  rank's heads of ``z``, ``x``, ``dt``, and its groups of ``B``, ``C`` (hence ``mamba_n_heads % P == 0``
  and ``n_groups % P == 0``). The depthwise conv channels ``[x | B | C]`` are permuted likewise; the
  conv, the SSD scan and the grouped gated RMSNorm are then local to the rank. Same layout as the
  Mamba-2 reference's ``process_group`` split (``mamba_ssm/modules/mamba2.py``).
* **vocab-parallel embedding** (Megatron ``VocabParallelEmbedding``): rank ``t`` owns rows
  ``[t V/P, (t+1) V/P)``; a token outside the range looks up zeros; ``psum``.
* **vocab-parallel cross entropy** (Megatron ``vocab_parallel_cross_entropy``): the logits stay split over
  the vocabulary; ``pmax`` of the row max, ``psum`` of the exponentials and of the target's logit.

Backward: Megatron's ``f`` operator (identity forward, all-reduce backward) before every column-parallel
layer needs no code here: the replicated activation is "invariant" over ``tensor`` and meets a varying
weight, and JAX's transpose of that implicit broadcast (``pvary``) is a ``psum`` of the cotangents. The
``g`` operator (all-reduce forward, identity backward) is the explicit ``psum``. Gradients of the
replicated parameters (norms) are likewise summed over ``tensor``, and over ``data`` for every
parameter, by the transpose of ``shard_map``'s replicated in_specs.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mani_jax import core
from mani_jax.models.attention_impls import full_sequence_attention
from mani_jax.models.config import ModelConfig
from mani_jax.models.remat import checkpoint_policy
from mani_jax.parallel.mesh import batch_axes
from mani_jax.parallel.multiprocess import is_abstract, place
from mani_jax.parallel.rules import LOGICAL_RULES, batch_sharding, check_model_config, tree_shardings, with_rules
from mani_jax.train.optim import OptimConfig, make_tx

__all__ = ["tp_layout_permutations", "to_tp_layout", "from_tp_layout", "tp_param_specs", "tp_logits",
           "vocab_parallel_cross_entropy", "make_tp_loss", "make_tp_train_step"]

Params = dict[str, Any]
AXIS = "tensor"


def _segments_perm(segments: list[int], tp: int) -> np.ndarray:
    """Column order that puts, for each rank, its 1/tp of every segment next to each other."""
    starts = np.cumsum([0] + segments[:-1])
    idx = []
    for r in range(tp):
        for start, size in zip(starts, segments):
            step = size // tp
            idx.extend(range(start + r * step, start + (r + 1) * step))
    return np.asarray(idx, np.int32)


def tp_layout_permutations(cfg: ModelConfig, tp: int) -> dict[str, np.ndarray]:
    """Index arrays of the Mamba-2 TP layout: ``in_proj`` (``[z|x|B|C|dt]`` columns) and ``conv``
    (``[x|B|C]`` channels). ``new = old[..., perm]``; each is a permutation of ``arange``.

    Raises:
      ValueError: ``mamba_n_heads`` or ``n_groups`` not divisible by ``tp``.
    """
    for field in ("mamba_n_heads", "n_groups"):
        if getattr(cfg, field) % tp:
            raise ValueError(f"ModelConfig.{field}={getattr(cfg, field)} is not divisible by tensor={tp} "
                             "(Mamba-2 tensor parallelism gives each rank whole heads and whole B/C groups)")
    gn = cfg.n_groups * cfg.d_state
    return {"in_proj": _segments_perm([cfg.d_inner, cfg.d_inner, gn, gn, cfg.mamba_n_heads], tp),
            "conv": _segments_perm([cfg.d_inner, gn, gn], tp)}


def _permute_mamba(params: Params, cfg: ModelConfig, tp: int, inverse: bool) -> Params:
    if tp == 1 or not cfg.n_mamba_layers:
        return params
    perms = tp_layout_permutations(cfg, tp)
    if is_abstract(params):
        return params  # a permutation changes no shape
    if inverse:
        perms = {k: np.argsort(v).astype(np.int32) for k, v in perms.items()}
    out = dict(params)
    layers = dict(params["layers"])
    for i, t in enumerate(cfg.layer_types):
        if t != "mamba":
            continue
        mix = dict(layers[i]["mixer"])
        ip = dict(mix["in_proj"])
        ip["kernel"] = jnp.take(ip["kernel"], perms["in_proj"], axis=1)
        if "bias" in ip:
            ip["bias"] = jnp.take(ip["bias"], perms["in_proj"], axis=0)
        mix["in_proj"] = ip
        mix["conv_weight"] = jnp.take(mix["conv_weight"], perms["conv"], axis=0)
        if "conv_bias" in mix:
            mix["conv_bias"] = jnp.take(mix["conv_bias"], perms["conv"], axis=0)
        layers[i] = {**layers[i], "mixer": mix}
    out["layers"] = layers
    return out


def to_tp_layout(params: Params, cfg: ModelConfig, tp: int) -> Params:
    """The model's parameters (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``) with every Mamba-2 layer's
    ``in_proj`` columns and conv channels in the rank-major TP layout (see the module docstring). Other
    parameters are unchanged; shapes never change."""
    return _permute_mamba(params, cfg, tp, inverse=False)


def from_tp_layout(params: Params, cfg: ModelConfig, tp: int) -> Params:
    """Inverse of :func:`to_tp_layout` (also for gradients and Adam moments)."""
    return _permute_mamba(params, cfg, tp, inverse=True)


def _check_mesh(mesh: Mesh) -> None:
    extra = {a: n for a, n in mesh.shape.items() if a not in ("data", "tensor") and n > 1}
    if extra:
        raise ValueError(f"mesh: the shard_map tensor-parallel step splits over 'data' and 'tensor' only; got "
                         f"{extra} (use the annotation step, make_sharded_train_step, for FSDP / EP, and "
                         "mani_jax.parallel.pipeline for pipeline stages)")


def tp_param_specs(params: Params, mesh: Mesh) -> Any:
    """``PartitionSpec`` of every parameter: the logical-axis rules without FSDP (``embed`` replicated)."""
    rules = with_rules(LOGICAL_RULES, embed=None)
    return jax.tree.map(lambda s: s.spec, tree_shardings(params, mesh, rules))


# ------------------------------------------------------------------------------------ the local forward
def _linear(x, p: Params):
    y = x @ p["kernel"].astype(x.dtype)
    return y + p["bias"].astype(x.dtype) if "bias" in p else y


def _row_parallel(x, p: Params):
    """Row-parallel linear: local matmul, ``psum`` over tensor (Megatron's g), then the bias once."""
    y = jax.lax.psum(x @ p["kernel"].astype(x.dtype), AXIS)
    return y + p["bias"].astype(x.dtype) if "bias" in p else y


def _attention(p: Params, x, positions, segment_ids, cfg: ModelConfig, tp: int):
    b, t, _ = x.shape
    nh, nkv, hd = cfg.n_heads // tp, cfg.n_kv_heads // tp, cfg.head_dim
    q = _linear(x, p["q_proj"]).reshape(b, t, nh, hd)
    k = _linear(x, p["k_proj"]).reshape(b, t, nkv, hd)
    v = _linear(x, p["v_proj"]).reshape(b, t, nkv, hd)
    if cfg.rope:
        q = core.apply_rope(q, positions, theta=cfg.rope_theta)
        k = core.apply_rope(k, positions, theta=cfg.rope_theta)
    out = full_sequence_attention(cfg)(q, k, v, causal=True, segment_ids=segment_ids, q_positions=positions,
                                       kv_positions=positions, softmax_scale=cfg.attention_multiplier,
                                       sliding_window=cfg.sliding_window)
    return _row_parallel(out.reshape(b, t, nh * hd), p["o_proj"])


def _mamba(p: Params, x, segment_ids, cfg: ModelConfig, tp: int):
    b, t, _ = x.shape
    nh, hp, g, n = cfg.mamba_n_heads // tp, cfg.mamba_head_dim, cfg.n_groups // tp, cfg.d_state
    d_inner, conv_dim = cfg.d_inner // tp, cfg.conv_dim // tp
    z, xbc, dt = jnp.split(_linear(x, p["in_proj"]), [d_inner, d_inner + conv_dim], axis=-1)
    xbc, _ = core.causal_conv1d(xbc, p["conv_weight"], p.get("conv_bias"), segment_ids=segment_ids)
    xbc = jax.nn.silu(xbc)
    xs, B, C = jnp.split(xbc, [d_inner, d_inner + g * n], axis=-1)
    dtv = core.softplus(dt.astype(jnp.float32) + p["dt_bias"].astype(jnp.float32))
    A = -jnp.exp(p["A_log"].astype(jnp.float32))
    y, _ = core.ssd_chunked(xs.reshape(b, t, nh, hp), dtv, A, B.reshape(b, t, g, n), C.reshape(b, t, g, n),
                            chunk_size=cfg.chunk_size, D=p["D"], segment_ids=segment_ids)
    y = core.gated_rms_norm(y.reshape(b, t, d_inner), z, p["norm"]["weight"], n_groups=g, eps=cfg.norm_eps)
    return _row_parallel(y, p["out_proj"])


def _mlp(p: Params, x):
    return _row_parallel(core.swiglu(_linear(x, p["gate_proj"]), _linear(x, p["up_proj"])), p["down_proj"])


def _moe(p: Params, x, cfg: ModelConfig):
    """Experts' ``d_ff_expert`` split over tensor (gate/up column, down row), router replicated: every rank
    routes identically, runs its slice of each expert, and the partial outputs are summed."""
    y, aux = core.moe_ffn(x, p["router"]["kernel"], p["w_gate"].astype(x.dtype), p["w_up"].astype(x.dtype),
                          p["w_down"].astype(x.dtype), top_k=cfg.top_k, capacity_factor=cfg.capacity_factor,
                          dispatch="gather" if cfg.moe_dispatch == "all_to_all" else cfg.moe_dispatch,
                          dropless_impl=cfg.dropless_impl)  # all_to_all: no expert axis here, its local form
    return jax.lax.psum(y, AXIS), (aux["load_balancing_loss"], aux["router_z_loss"])


def _block(p: Params, x, positions, segment_ids, cfg: ModelConfig, layer_type: str, tp: int):
    h = core.rms_norm(x, p["mixer_norm"]["weight"], cfg.norm_eps)
    if layer_type == "attention":
        h = _attention(p["mixer"], h, positions, segment_ids, cfg, tp)
    else:
        h = _mamba(p["mixer"], h, segment_ids, cfg, tp)
    x = x + cfg.residual_multiplier * h
    h = core.rms_norm(x, p["ffn_norm"]["weight"], cfg.norm_eps)
    zero = jnp.zeros((), jnp.float32)
    aux = (zero, zero)
    if "moe" in p:
        out, aux = _moe(p["moe"], h, cfg)
        if "ffn" in p:
            out = out + _mlp(p["ffn"], h)
    else:
        out = _mlp(p["ffn"], h)
    return x + cfg.residual_multiplier * out, aux


def _local_logits(params: Params, tokens, positions, segment_ids, cfg: ModelConfig, tp: int):
    """Per-rank forward: ``tokens [b, t]`` -> ``(logits [b, t, V/tp] float32, (lb, z) mean over MoE layers)``."""
    table = params["embed"]["embedding"]
    v_local = table.shape[0]
    start = jax.lax.axis_index(AXIS) * v_local
    local = tokens - start
    inside = (local >= 0) & (local < v_local)
    x = jnp.where(inside[..., None], jnp.take(table, jnp.clip(local, 0, v_local - 1), axis=0), 0)
    x = jax.lax.psum(x, AXIS) * jnp.asarray(cfg.embedding_multiplier, table.dtype)
    lbs, zs = [], []
    for i, (layer_type, policy) in enumerate(zip(cfg.layer_types, cfg.remat_policies)):
        fn = lambda p, x, lt=layer_type: _block(p, x, positions, segment_ids, cfg, lt, tp)  # noqa: E731
        if policy != "none":
            fn = jax.checkpoint(fn, policy=checkpoint_policy(policy))
        x, (lb, z) = fn(params["layers"][i], x)
        lbs.append(lb)
        zs.append(z)
    x = core.rms_norm(x, params["final_norm"]["weight"], cfg.norm_eps)
    w = table.T if "lm_head" not in params else params["lm_head"]["kernel"]
    logits = (x @ w.astype(x.dtype)).astype(jnp.float32) / cfg.logits_scaling
    n_moe = cfg.n_layers if cfg.n_experts else 0
    aux = (sum(lbs) / n_moe, sum(zs) / n_moe) if n_moe else (jnp.zeros(()), jnp.zeros(()))
    return logits, aux


def vocab_parallel_cross_entropy(local_logits: jax.Array, targets: jax.Array, axis_name: str = AXIS) -> jax.Array:
    """Cross entropy with the vocabulary split over ``axis_name`` (call inside ``shard_map``).

    Args:
      local_logits: float ``[..., V / P]``, this rank's contiguous slice ``[r V/P, (r+1) V/P)`` of the logits.
      targets: int ``[...]`` global token ids in ``[0, V)``.

    Returns:
      float32 ``[...]`` negative log-likelihoods, identical on every rank:
      ``logsumexp_v(logits) - logits[target]`` computed with a ``pmax`` (of the stop-gradient row max) and
      two ``psum`` s of ``[...]``-sized arrays; the ``[..., V]`` logits are never gathered.
    """
    lg = local_logits.astype(jnp.float32)
    v_local = lg.shape[-1]
    m = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(lg, axis=-1)), axis_name)
    sumexp = jax.lax.psum(jnp.sum(jnp.exp(lg - m[..., None]), axis=-1), axis_name)
    local_t = targets - jax.lax.axis_index(axis_name) * v_local
    inside = (local_t >= 0) & (local_t < v_local)
    picked = jnp.take_along_axis(lg, jnp.clip(local_t, 0, v_local - 1)[..., None], axis=-1)[..., 0]
    target_logit = jax.lax.psum(jnp.where(inside, picked, 0.0), axis_name)
    return jnp.log(sumexp) + m - target_logit


def _batch_spec(mesh: Mesh) -> P:
    axes = tuple(a for a in batch_axes(mesh) if mesh.shape[a] > 1)
    return P(axes if axes else None)


def tp_logits(params: Params, tokens: jax.Array, cfg: ModelConfig, mesh: Mesh, *,
              segment_ids: jax.Array | None = None, positions: jax.Array | None = None) -> jax.Array:
    """Full logits ``[batch, seq, vocab]`` float32 of the shard_map forward (for tests and inspection).

    ``params`` are in the TP layout (:func:`to_tp_layout`) and may be host arrays or placed ones.
    """
    _check_mesh(mesh)
    check_model_config(cfg, mesh)
    tp = mesh.shape[AXIS]
    b, t = tokens.shape
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    if positions is None:
        positions = core.positions_from_segments(segment_ids)
    bs = _batch_spec(mesh)

    def local(params, tokens, positions, segment_ids):
        return _local_logits(params, tokens, positions, segment_ids, cfg, tp)[0]

    out_spec = P(bs[0] if len(bs) else None, None, AXIS)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(tp_param_specs(params, mesh), bs, bs, bs), out_specs=out_spec)
    return jax.jit(fn)(params, tokens, positions, segment_ids)


def make_tp_loss(cfg: ModelConfig, mesh: Mesh, params_like: Params) -> Callable:
    """``loss_fn(params, batch) -> (objective, info)``: the trainer's objective computed by the shard_map
    forward (:func:`mani_jax.train.trainer._forward_loss` semantics: token-weighted mean cross entropy over
    the *global* batch, plus the router losses of an MoE). ``info``: ``loss``, ``n_tokens`` (and
    ``load_balancing_loss``, ``router_z_loss`` for an MoE). Differentiable with ``jax.grad`` outside.
    ``params_like`` gives the parameter tree structure (TP layout). With ``data > 1`` an MoE's router
    losses are the mean of the per-shard losses (GShard's per-group auxiliary loss), not the loss of the
    whole batch; with ``data == 1`` they equal the model's."""
    _check_mesh(mesh)
    check_model_config(cfg, mesh)
    tp = mesh.shape[AXIS]
    bs = _batch_spec(mesh)
    baxes = tuple(a for a in batch_axes(mesh) if mesh.shape[a] > 1)

    def local(params, batch):
        logits, (lb, z) = _local_logits(params, batch["tokens"], batch["positions"], batch["segment_ids"], cfg, tp)
        nll = vocab_parallel_cross_entropy(logits, batch["targets"])
        mask = batch["loss_mask"].astype(jnp.float32)
        total, count = jnp.sum(nll * mask), jnp.sum(mask)
        if baxes:
            total, count = jax.lax.psum(total, baxes), jax.lax.psum(count, baxes)
            lb, z = jax.lax.pmean(lb, baxes), jax.lax.pmean(z, baxes)
        loss = total / jnp.where(count > 0, count, 1.0)
        return loss, count, lb, z

    fn = jax.shard_map(local, mesh=mesh, in_specs=(tp_param_specs(params_like, mesh), bs),
                       out_specs=(P(), P(), P(), P()))

    def loss_fn(params, batch):
        batch = {k: batch[k] for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask")}
        loss, count, lb, z = fn(params, batch)
        info = {"loss": loss, "n_tokens": count}
        if not cfg.n_experts:
            return loss, info
        info.update({"load_balancing_loss": lb, "router_z_loss": z})
        return loss + cfg.router_aux_loss_coef * lb + cfg.router_z_loss_coef * z, info

    return loss_fn


def make_tp_train_step(model: nnx.Module, mesh: Mesh, optim_config: OptimConfig):
    """The shard_map tensor-parallel train step for ``model`` (a :class:`~mani_jax.models.HybridLM`).

    Same update as the trainer (:func:`mani_jax.train.optim.make_tx`: clipping + AdamW + schedule + decay
    mask; the schedule reads optax's step count) on the pure-dict parameters in the TP layout.

    Returns:
      ``(step, state)``: ``step(state, batch) -> (state, metrics)`` jitted with ``state = (params,
      opt_state)`` donated, ``metrics`` with ``loss``, ``n_tokens``, ``grad_norm`` (and the router losses
      for an MoE); ``state`` placed on ``mesh`` (shapes with shardings for a model from ``nnx.eval_shape``).
      Recover the model's parameters with ``from_tp_layout(state[0], cfg, tp)``.

    Raises:
      ValueError: the mesh splits other axes than ``data`` / ``tensor``, or the config does not divide.
    """
    cfg = model.config
    _check_mesh(mesh)
    check_model_config(cfg, mesh)
    tp = mesh.shape[AXIS]
    params = to_tp_layout(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg, tp)
    tx = make_tx(optim_config)
    specs = tp_param_specs(params, mesh)
    p_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    params = place(params, p_sh)
    o_sh = tree_shardings(jax.eval_shape(tx.init, params), mesh, with_rules(LOGICAL_RULES, embed=None))
    opt_state = place(jax.eval_shape(tx.init, params), o_sh) if is_abstract(params) else \
        jax.jit(tx.init, out_shardings=o_sh)(params)
    loss_fn = make_tp_loss(cfg, mesh, params)

    def step(state, batch):
        params, opt_state = state
        (_, info), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), {**info, "grad_norm": optax.tree.norm(grads)}

    rep = NamedSharding(mesh, P())
    jitted = jax.jit(step, in_shardings=((p_sh, o_sh), batch_sharding(mesh)), out_shardings=((p_sh, o_sh), rep),
                     donate_argnums=0)
    return jitted, (params, opt_state)
