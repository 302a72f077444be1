"""Sparse mixture of experts: top-k router, balancing losses, capacity and dropless dispatch, utilisation stats.

Layout: tokens carry any leading axes (``[batch, seq, d_model]`` or already flat ``[tokens, d_model]``);
every function flattens them to ``T = prod(leading)`` tokens and restores them on the way out. Routing
arrays are ``weights / experts [..., top_k]`` and ``logits [..., n_experts]``. Expert FFNs are SwiGLU with
stacked weights ``w_gate [n_experts, d_model, d_ff]``, ``w_up [n_experts, d_model, d_ff]``,
``w_down [n_experts, d_ff, d_model]``: expert ``e`` computes ``(silu(x W_gate[e]) * (x W_up[e])) W_down[e]``
(Shazeer 2020, eq. 6; Mixtral's ``w1``/``w3``/``w2``; llama.cpp ``ffn_gate_exps``/``ffn_up_exps``/
``ffn_down_exps``).

The router is softmax over experts -> top-k -> renormalise the k weights (Jiang et al. 2024, Mixtral,
eq. 1-2; Hugging Face ``MixtralSparseMoeBlock``; llama.cpp ``build_moe_ffn`` with softmax gating and
``norm_w``), which equals a softmax over the k selected logits. Router math is float32 whatever the
compute dtype (float64 when the inputs are float64, for gradient checks).

Two dispatch paths compute the same function when nothing is dropped:

* :func:`moe_capacity` -- GShard (Lepikhin et al. 2020, Alg. 1) / Switch (Fedus et al. 2021, Sec. 2.2):
  each expert has ``capacity = ceil(top_k * T * capacity_factor / n_experts)`` slots; assignments are
  served first choices before second choices, in token order within a choice; assignments past capacity
  are dropped (they add zero; the residual stream carries the token).
* :func:`moe_dropless` -- MegaBlocks (Gale et al. 2022, arXiv 2211.15841, Sec. 5): sort the ``T * top_k``
  assignments by expert, grouped matmul with :func:`jax.lax.ragged_dot` (or block-padded batched matmuls,
  faster on CPU where jax lowers ragged_dot densely), unsort; nothing is dropped.

Losses: :func:`load_balancing_loss` (Switch, eq. 4-6) and :func:`router_z_loss` (ST-MoE, Zoph et al.
2022, eq. 5). Both return the unscaled loss: multiply by the coefficient (``alpha`` ~ 1e-2, z-loss ~ 1e-3)
outside.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import jax
import jax.numpy as jnp

Array = jax.Array


# ---------------------------------------------------------------------------------------------- helpers
def _router_dtype(*arrays) -> jnp.dtype:
    """float32, or float64 when an input is float64 (router / loss math never runs below float32)."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _check_top_k(top_k, n_experts: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k: expected an int in [1, n_experts={n_experts}], got {top_k!r}")


def _check_mask(mask, lead: tuple[int, ...]) -> None:
    if mask is not None and tuple(mask.shape) != lead:
        raise ValueError(f"mask: expected shape {lead} (the token axes), got {tuple(mask.shape)}")


def _check_routing(weights: Array, experts: Array, x_lead: tuple[int, ...] | None = None) -> int:
    if experts.ndim < 1 or not jnp.issubdtype(experts.dtype, jnp.integer):
        raise ValueError(f"experts: expected an integer array [..., top_k], got {experts.dtype} {experts.shape}")
    if weights is not None and weights.shape != experts.shape:
        raise ValueError(f"weights: expected the shape of experts {experts.shape}, got {weights.shape}")
    if x_lead is not None and tuple(experts.shape[:-1]) != x_lead:
        raise ValueError(f"experts, weights: expected shape {(*x_lead, experts.shape[-1])} "
                         f"(x's token axes + top_k), got {experts.shape}")
    return experts.shape[-1]


def _check_experts_ffn(w_gate: Array, w_up: Array, w_down: Array, d_model: int) -> tuple[int, int]:
    if w_gate.ndim != 3 or w_gate.shape[1] != d_model:
        raise ValueError(f"w_gate: expected [n_experts, d_model={d_model}, d_ff], got {w_gate.shape}")
    n_experts, _, d_ff = w_gate.shape
    if w_up.shape != w_gate.shape:
        raise ValueError(f"w_up: expected shape {w_gate.shape} (that of w_gate), got {w_up.shape}")
    if w_down.shape != (n_experts, d_ff, d_model):
        raise ValueError(f"w_down: expected shape {(n_experts, d_ff, d_model)}, got {w_down.shape}")
    return n_experts, d_ff


def _check_capacity_factor(capacity_factor) -> None:
    if (isinstance(capacity_factor, bool) or not isinstance(capacity_factor, numbers.Real)
            or not math.isfinite(capacity_factor) or capacity_factor <= 0):
        raise ValueError(
            f"capacity_factor: expected a finite number > 0 (or None for dropless), got {capacity_factor!r}")


def _flat_mask(mask: Array | None, t: int, dtype) -> Array:
    return jnp.ones((t,), dtype) if mask is None else mask.reshape(t).astype(dtype)


# ----------------------------------------------------------------------------------------------- router
def router(
    x: Array, w_router: Array, *, top_k: int, renormalize: bool = True
) -> tuple[Array, Array, Array]:
    """Top-k softmax router: ``logits = x W_router``; softmax over experts; keep the top k; renormalise.

    With ``renormalize`` (Mixtral, llama.cpp ``llama`` with experts, Hugging Face ``MixtralSparseMoeBlock``)
    the k weights are ``softmax(logits)[top-k] / sum(softmax(logits)[top-k])``, computed as the equal
    ``softmax`` over the k selected logits. Without it (Qwen2-MoE ``norm_topk_prob=False``) they are the
    plain softmax probabilities of the selected experts. The selection is ``jax.lax.top_k`` on the logits
    (softmax is monotonic): descending, exact ties broken towards the lower expert index.

    Args:
      x: ``[..., d_model]`` (e.g. ``[batch, seq, d_model]`` or ``[tokens, d_model]``), any float dtype.
      w_router: ``[d_model, n_experts]``.
      top_k: experts per token, ``1 <= top_k <= n_experts``.
      renormalize: rescale the k weights to sum to 1.

    Returns:
      ``(weights, experts, logits)``: ``weights`` float32 ``[..., top_k]`` (descending), ``experts`` int32
      ``[..., top_k]``, ``logits`` float32 ``[..., n_experts]``. The matmul runs in float32 at HIGHEST
      precision (no TF32/bf16 passes) whatever x's dtype; float64 inputs stay float64.

    Raises:
      ValueError: if ``w_router`` is not ``[d_model, n_experts]`` or ``top_k`` is out of range.
    """
    if x.ndim < 1:
        raise ValueError(f"x: expected [..., d_model], got shape {x.shape}")
    if w_router.ndim != 2 or w_router.shape[0] != x.shape[-1]:
        raise ValueError(f"w_router: expected [d_model={x.shape[-1]}, n_experts], got {w_router.shape}")
    _check_top_k(top_k, w_router.shape[1])
    ct = _router_dtype(x, w_router)
    logits = jnp.einsum("...d,de->...e", x.astype(ct), w_router.astype(ct), precision=jax.lax.Precision.HIGHEST)
    top_logits, experts = jax.lax.top_k(logits, top_k)
    if renormalize:
        weights = jax.nn.softmax(top_logits, axis=-1)
    else:
        weights = jnp.exp(top_logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
    return weights, experts.astype(jnp.int32), logits


# ----------------------------------------------------------------------------------------------- losses
def load_balancing_loss(logits: Array, experts: Array, *, n_experts: int, mask: Array | None = None) -> Array:
    """Switch Transformer auxiliary load-balancing loss ``N * sum_i f_i * P_i`` (unscaled; times alpha outside).

    Fedus et al. 2021 (arXiv 2101.03961), eq. 4-6: ``P_i`` is the mean router probability of expert ``i``
    over tokens, and ``f_i`` the fraction of routing assignments that went to ``i``. For top-k routing
    ``f_i`` is taken over all ``k * T`` assignments (every slot counts, first or not), so ``sum_i f_i = 1``
    and the loss is **1.0 for perfectly uniform routing** for any k. Its maximum is ``N / k``: a token
    gives at most one of its k slots to an expert, so ``f_i <= 1/k``, and ``sum_i P_i = 1``. Collapsed
    routing (every token picks the same k experts and puts its probability there) reaches it: ``N`` for
    top-1 (Switch), ``N / 2`` for top-2.

    Relation to Hugging Face: ``transformers`` ``load_balancing_loss_func`` (Mixtral, Qwen2-MoE,
    GraniteMoe) uses the same f over tokens for each slot and sums over the k slots, i.e. its f sums to k;
    its value is exactly ``top_k *`` this loss (k at uniform routing). Multiply by ``top_k`` (or fold it
    into alpha) to reproduce HF's ``aux_loss`` number; the gradient direction is the same.

    Gradients flow to ``logits`` through ``P_i`` only; ``f_i`` is piecewise constant (``experts`` is an
    integer input), as in the paper.

    Args:
      logits: ``[..., n_experts]`` router logits (any float dtype; math in float32, float64 kept).
      experts: int ``[..., top_k]`` selected experts of the same tokens (from :func:`router`).
      n_experts: ``N``; must equal ``logits.shape[-1]``.
      mask: optional ``[...]`` bool/0-1 token mask; tokens with 0 (padding) are left out of both f and P
        (as HF does with ``attention_mask``).

    Returns:
      scalar float32 (float64 for float64 logits). 0 if the mask selects no token.

    Raises:
      ValueError: on mismatched shapes or ``n_experts``.
    """
    if logits.ndim < 1 or logits.shape[-1] != n_experts:
        raise ValueError(f"logits: expected [..., n_experts={n_experts}], got {logits.shape}")
    k = _check_routing(None, experts, tuple(logits.shape[:-1]))
    _check_mask(mask, tuple(logits.shape[:-1]))
    ct = _router_dtype(logits)
    t = math.prod(logits.shape[:-1])
    probs = jax.nn.softmax(logits.reshape(t, n_experts).astype(ct), axis=-1)
    counts = jax.nn.one_hot(experts.reshape(t, k), n_experts, dtype=ct).sum(axis=1)  # [T, N]
    m = _flat_mask(mask, t, ct)
    n_valid = jnp.maximum(jnp.sum(m), 1.0)
    f = jnp.einsum("t,te->e", m, counts) / (k * n_valid)
    p = jnp.einsum("t,te->e", m, probs) / n_valid
    return n_experts * jnp.sum(jax.lax.stop_gradient(f) * p)


def router_z_loss(logits: Array, *, mask: Array | None = None) -> Array:
    """ST-MoE router z-loss ``mean_tokens(logsumexp(logits)^2)`` (unscaled; times its coefficient outside).

    Zoph et al. 2022, "ST-MoE" (arXiv 2202.08906), eq. 5: ``L_z = 1/B sum_i (log sum_j exp(x_ij))^2``.

    Args:
      logits: ``[..., n_experts]`` router logits (math in float32, float64 kept).
      mask: optional ``[...]`` token mask; padding tokens are excluded from the mean.

    Returns:
      scalar float32 (float64 for float64 logits); 0 if the mask selects no token.

    Raises:
      ValueError: if ``mask`` does not match the token axes.
    """
    if logits.ndim < 1:
        raise ValueError(f"logits: expected [..., n_experts], got shape {logits.shape}")
    _check_mask(mask, tuple(logits.shape[:-1]))
    ct = _router_dtype(logits)
    t = math.prod(logits.shape[:-1])
    lse = jax.nn.logsumexp(logits.reshape(t, logits.shape[-1]).astype(ct), axis=-1)
    m = _flat_mask(mask, t, ct)
    return jnp.sum(m * lse * lse) / jnp.maximum(jnp.sum(m), 1.0)


# --------------------------------------------------------------------------------------------- dispatch
def capacity(n_tokens: int, n_experts: int, top_k: int, capacity_factor: float) -> int:
    """Expert capacity ``ceil(top_k * n_tokens * capacity_factor / n_experts)`` (GShard / Switch, Sec. 2.2).

    ``capacity_factor = 1`` gives each expert exactly its share of the ``top_k * n_tokens`` assignments.
    The product is rounded to 9 decimals before the ceiling so that float noise (``1.1 * 10``) does not
    add a slot. A Python int (static under ``jit``).

    Raises:
      ValueError: if ``capacity_factor <= 0``, counts are not positive, or ``top_k > n_experts``.
    """
    _check_capacity_factor(capacity_factor)
    if n_tokens < 0:
        raise ValueError(f"n_tokens: expected >= 0, got {n_tokens}")
    if n_experts < 1:
        raise ValueError(f"n_experts: expected >= 1, got {n_experts}")
    _check_top_k(top_k, n_experts)
    return max(1, math.ceil(round(top_k * n_tokens * capacity_factor / n_experts, 9)))


def _swiglu_dense(xe: Array, w_gate: Array, w_up: Array, w_down: Array) -> Array:
    """Per-expert SwiGLU on ``xe [E, C, d]`` -> ``[E, C, d]`` (matmuls in x's dtype, float32+ accumulation)."""
    dt, acc = xe.dtype, _router_dtype(xe)
    g = jnp.einsum("ecd,edf->ecf", xe, w_gate.astype(dt), preferred_element_type=acc)
    u = jnp.einsum("ecd,edf->ecf", xe, w_up.astype(dt), preferred_element_type=acc)
    h = (jax.nn.silu(g) * u).astype(dt)
    return jnp.einsum("ecf,efd->ecd", h, w_down.astype(dt), preferred_element_type=acc)


def capacity_slots(experts: Array, n_experts: int, cap: int, valid: Array | None = None
                   ) -> tuple[Array, Array, Array, Array]:
    """Where each assignment goes in ``[n_experts, cap]`` expert buffers (GShard Alg. 1 / Switch order).

    The ``k * T`` assignments are ordered slot-major -- every token's first choice (token order), then
    every second choice, ... -- and an assignment's position in its expert's buffer is the running count
    of earlier assignments to that expert (cumsum of the one-hot choice). Positions ``>= cap`` are dropped.

    Args:
      experts: int ``[T, k]`` router choices. n_experts, cap: buffer shape (``cap`` from :func:`capacity`).
      valid: optional bool ``[T]``; invalid (padding) tokens take no slot and count nowhere.

    Returns:
      ``(pos, slot, keep, counts)``: ``pos`` int32 ``[k, T]`` position in the expert's buffer (``cap`` when
      not kept); ``slot`` int32 ``[k, T]`` flat index ``expert * cap + pos`` (``n_experts * cap``, out of
      range, when not kept); ``keep`` bool ``[k, T]``; ``counts`` int32 ``[n_experts]``, valid assignments
      routed to each expert before dropping.
    """
    t, k = experts.shape
    e_a = experts.T.reshape(k * t).astype(jnp.int32)  # assignment a = j * T + t
    valid_a = jnp.ones((k * t,), bool) if valid is None else jnp.tile(valid, k)
    onehot = jax.nn.one_hot(e_a, n_experts, dtype=jnp.int32) * valid_a[:, None]  # [kT, E]
    pos_a = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)
    keep_a = valid_a & (pos_a < cap)
    pos_a = jnp.where(keep_a, pos_a, cap)  # cap == "no slot": one_hot gives a zero row, scatter drops it
    slot_a = jnp.where(keep_a, e_a * cap + pos_a, n_experts * cap)
    return pos_a.reshape(k, t), slot_a.reshape(k, t), keep_a.reshape(k, t), jnp.sum(onehot, axis=0)


def slots_dispatch(xf: Array, slot: Array, n_experts: int, cap: int) -> Array:
    """Scatter tokens ``xf [T, d]`` to their kept slots (``slot [k, T]`` from :func:`capacity_slots`):
    ``[n_experts, cap, d]`` buffers, zero where no assignment landed."""
    xe = jnp.zeros((n_experts * cap, xf.shape[-1]), xf.dtype)
    for j in range(slot.shape[0]):
        xe = xe.at[slot[j]].set(xf, mode="drop", unique_indices=False)
    return xe.reshape(n_experts, cap, xf.shape[-1])


def slots_combine(ye: Array, slot: Array, weights: Array, dtype) -> Array:
    """``y_t = sum_j weights[t, j] * ye[slot[j, t]]`` in ``dtype`` (dropped slots add zero): the expert
    outputs ``ye [n_experts, cap, d]`` gathered back to ``[T, d]`` tokens."""
    ye = ye.reshape(-1, ye.shape[-1])
    y = jnp.zeros((slot.shape[1], ye.shape[-1]), dtype)
    for j in range(slot.shape[0]):
        y = y + weights[:, j, None].astype(dtype) * ye.at[slot[j]].get(mode="fill", fill_value=0).astype(dtype)
    return y


def moe_capacity(
    x: Array,
    weights: Array,
    experts: Array,
    w_gate: Array,
    w_up: Array,
    w_down: Array,
    *,
    capacity_factor: float,
    mask: Array | None = None,
    dispatch: Literal["einsum", "gather"] = "einsum",
) -> tuple[Array, dict]:
    """Capacity-based MoE FFN (GShard / Switch): fixed ``[n_experts, capacity, d_model]`` expert buffers.

    All ``T`` tokens of the call form one group. The ``k * T`` assignments are ordered slot-major -- every
    token's first choice (in token order), then every second choice, ... (GShard Alg. 1, Switch) -- and
    the position of each in its expert's buffer is a cumulative count (cumsum of the one-hot expert
    choice). Assignments at position ``>= capacity`` are dropped: they contribute zero and the surviving
    weights are *not* renormalised. Masked (padding) tokens take no slot and output zero.

    ``dispatch="einsum"`` builds the one-hot dispatch tensor ``[T, E, C]`` and the combine tensor (router
    weights on it) and moves tokens with einsums (GShard / MaxText "dropping" path; O(T E C d) work).
    ``dispatch="gather"`` moves the same rows with scatter/gather on the slot index ``e * C + position``
    (same result, O(T k d) movement).

    Args:
      x: ``[..., d_model]`` tokens (any leading axes), compute dtype of the experts.
      weights: float ``[..., top_k]`` router weights (from :func:`router`).
      experts: int ``[..., top_k]`` router choices in ``[0, n_experts)``.
      w_gate, w_up: ``[n_experts, d_model, d_ff]``; w_down: ``[n_experts, d_ff, d_model]`` (cast to x.dtype).
      capacity_factor: > 0; see :func:`capacity`.
      mask: optional ``[...]`` token mask (0 = padding).
      dispatch: ``"einsum"`` or ``"gather"``.

    Returns:
      ``(y, stats)``: ``y`` ``[..., d_model]`` in x's dtype, ``y_t = sum over kept assignments (t, j) of
      weights[t, j] * SwiGLU_{experts[t, j]}(x_t)`` (expert matmuls in x's dtype with float32 accumulation,
      combine in float32). ``stats``: ``capacity`` (int), ``n_dropped`` (int32 scalar, dropped
      assignments), ``dropped_fraction`` (float32, ``n_dropped`` / valid assignments), ``expert_counts``
      (int32 ``[n_experts]``, assignments routed to each expert before dropping).

    Raises:
      ValueError: on mismatched shapes, ``capacity_factor <= 0`` or an unknown ``dispatch``.
    """
    if x.ndim < 1:
        raise ValueError(f"x: expected [..., d_model], got shape {x.shape}")
    lead, d = tuple(x.shape[:-1]), x.shape[-1]
    k = _check_routing(weights, experts, lead)
    n_experts, _ = _check_experts_ffn(w_gate, w_up, w_down, d)
    _check_mask(mask, lead)
    if dispatch not in ("einsum", "gather"):
        raise ValueError(f"dispatch: expected 'einsum' or 'gather', got {dispatch!r}")
    t = math.prod(lead)
    cap = capacity(t, n_experts, k, capacity_factor)
    acc = _router_dtype(x)
    xf = x.reshape(t, d)
    wf = weights.reshape(t, k).astype(_router_dtype(x, weights))
    valid = _flat_mask(mask, t, bool)

    pos, slot, keep, counts = capacity_slots(experts.reshape(t, k), n_experts, cap, valid)
    n_valid = k * jnp.sum(valid.astype(jnp.int32))
    n_dropped = n_valid - jnp.sum(keep.astype(jnp.int32))
    stats = {
        "capacity": cap,
        "n_dropped": n_dropped,
        "dropped_fraction": n_dropped.astype(jnp.float32) / jnp.maximum(n_valid, 1).astype(jnp.float32),
        "expert_counts": counts,
    }
    if dispatch == "einsum":
        disp = jnp.zeros((t, n_experts, cap), x.dtype)
        comb = jnp.zeros((t, n_experts, cap), wf.dtype)
        for j in range(k):  # every kept assignment owns its own (e, c) slot, so the k slabs never overlap
            slab = (jax.nn.one_hot(experts.reshape(t, k)[:, j], n_experts, dtype=wf.dtype)[:, :, None]
                    * jax.nn.one_hot(pos[j], cap, dtype=wf.dtype)[:, None, :])  # [T, E, C]
            disp = disp + slab.astype(x.dtype)
            comb = comb + slab * wf[:, j, None, None]
        hi = jax.lax.Precision.HIGHEST  # pure data movement: no TF32 / bf16-pass rounding on GPU
        xe = jnp.einsum("tec,td->ecd", disp, xf, precision=hi)  # each (e, c) row holds at most one token: exact
        ye = _swiglu_dense(xe, w_gate, w_up, w_down)
        y = jnp.einsum("tec,ecd->td", comb, ye, precision=hi, preferred_element_type=acc)
    else:
        ye = _swiglu_dense(slots_dispatch(xf, slot, n_experts, cap), w_gate, w_up, w_down)
        y = slots_combine(ye, slot, wf, acc)
    return y.astype(x.dtype).reshape(x.shape), stats


def moe_dropless(
    x: Array,
    weights: Array,
    experts: Array,
    w_gate: Array,
    w_up: Array,
    w_down: Array,
    *,
    mask: Array | None = None,
    impl: Literal["ragged_dot", "blocked"] = "ragged_dot",
    block_size: int = 128,
) -> tuple[Array, dict]:
    """Dropless MoE FFN (MegaBlocks-style grouped GEMM): no capacity, no dropped tokens.

    The ``T * k`` assignments are stably sorted by expert (``argsort``), their token rows gathered into
    ``[T * k, d_model]``, and each expert's contiguous group multiplied by its own weights; SwiGLU; the
    down projection likewise; rows are weighted by the router weights and unsorted with the inverse
    permutation. Gale et al. 2022, "MegaBlocks" (arXiv 2211.15841), Sec. 5; MaxText ``sparse_matmul``.

    ``impl="ragged_dot"``: ``jax.lax.ragged_dot(lhs [T*k, d], rhs [E, d, f], group_sizes [E])`` for gate
    and up, and again for down. Masked (padding) assignments sort past the last group, where ragged_dot
    writes zeros. On GPU/TPU XLA runs a grouped GEMM; **on CPU jax 0.11 lowers ragged_dot densely** (every
    row against every expert, masked: ``n_experts`` times the FLOPs and memory).
    ``impl="blocked"``: each expert's group is padded to a multiple of ``block_size`` rows (MegaBlocks'
    block padding), giving at most ``(T*k + E*(block_size-1)) // block_size`` blocks of one expert each,
    multiplied as a batched matmul with the per-block expert weights gathered (``[n_blocks, d, f]``
    extra memory). Same result; at most ``E*(block_size-1)`` wasted rows; the fast choice on CPU.

    Args:
      x, weights, experts, w_gate, w_up, w_down, mask: as :func:`moe_capacity`.
      impl: ``"ragged_dot"`` or ``"blocked"``.
      block_size: rows per block for ``impl="blocked"`` (positive int).

    Returns:
      ``(y, stats)``: ``y`` ``[..., d_model]`` in x's dtype (expert matmuls in x's dtype with float32
      accumulation, combine in float32); ``stats``: ``n_dropped`` (0), ``dropped_fraction`` (0.0),
      ``expert_counts`` (int32 ``[n_experts]``, the group sizes).

    Raises:
      ValueError: on mismatched shapes, an unknown ``impl`` or a non-positive ``block_size``.
    """
    if x.ndim < 1:
        raise ValueError(f"x: expected [..., d_model], got shape {x.shape}")
    lead, d = tuple(x.shape[:-1]), x.shape[-1]
    k = _check_routing(weights, experts, lead)
    n_experts, _ = _check_experts_ffn(w_gate, w_up, w_down, d)
    _check_mask(mask, lead)
    if impl not in ("ragged_dot", "blocked"):
        raise ValueError(f"impl: expected 'ragged_dot' or 'blocked', got {impl!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
    t = math.prod(lead)
    dt, acc = x.dtype, _router_dtype(x)
    wg, wu, wd = w_gate.astype(dt), w_up.astype(dt), w_down.astype(dt)
    xf = x.reshape(t, d)
    valid_a = jnp.repeat(_flat_mask(mask, t, bool), k)  # token-major: a = t * k + j
    e_a = jnp.where(valid_a, experts.reshape(t * k).astype(jnp.int32), n_experts)
    order = jnp.argsort(e_a, stable=True)
    group_sizes = jnp.bincount(e_a, length=n_experts + 1)[:n_experts].astype(jnp.int32)
    xs = xf[order // k]  # [T*k, d] rows grouped by expert
    if impl == "ragged_dot":
        g = jax.lax.ragged_dot(xs, wg, group_sizes, preferred_element_type=acc)
        u = jax.lax.ragged_dot(xs, wu, group_sizes, preferred_element_type=acc)
        h = (jax.nn.silu(g) * u).astype(dt)
        out = jax.lax.ragged_dot(h, wd, group_sizes, preferred_element_type=acc)
    else:
        bs = block_size
        n_blocks = max(1, (t * k + n_experts * (bs - 1)) // bs)  # static bound on sum_e ceil(n_e / bs)
        padded = (group_sizes + bs - 1) // bs * bs
        padded_end = jnp.cumsum(padded)
        start = jnp.cumsum(group_sizes) - group_sizes
        e_sorted = e_a[order]
        e_c = jnp.minimum(e_sorted, n_experts - 1)
        rank = jnp.arange(t * k, dtype=jnp.int32) - start[e_c]
        row = jnp.where(e_sorted < n_experts, padded_end[e_c] - padded[e_c] + rank, n_blocks * bs)
        xb = jnp.zeros((n_blocks * bs, d), dt).at[row].set(xs, mode="drop").reshape(n_blocks, bs, d)
        block_expert = jnp.minimum(  # the expert whose padded range holds the block's first row
            jnp.searchsorted(padded_end, jnp.arange(n_blocks, dtype=padded_end.dtype) * bs, side="right"),
            n_experts - 1)
        g = jnp.einsum("nbd,ndf->nbf", xb, wg[block_expert], preferred_element_type=acc)
        u = jnp.einsum("nbd,ndf->nbf", xb, wu[block_expert], preferred_element_type=acc)
        h = (jax.nn.silu(g) * u).astype(dt)
        out_b = jnp.einsum("nbf,nfd->nbd", h, wd[block_expert], preferred_element_type=acc)
        out = out_b.reshape(n_blocks * bs, d).at[row].get(mode="fill", fill_value=0.0)
    inverse = jnp.zeros((t * k,), jnp.int32).at[order].set(jnp.arange(t * k, dtype=jnp.int32))
    out = out[inverse].reshape(t, k, d)
    wf = jnp.where(valid_a.reshape(t, k), weights.reshape(t, k).astype(_router_dtype(x, weights)), 0.0)
    y = jnp.einsum("tk,tkd->td", wf, out)
    stats = {"n_dropped": jnp.zeros((), jnp.int32), "dropped_fraction": jnp.zeros((), jnp.float32),
             "expert_counts": group_sizes}
    return y.astype(dt).reshape(x.shape), stats


def moe_ffn(
    x: Array,
    w_router: Array,
    w_gate: Array,
    w_up: Array,
    w_down: Array,
    *,
    top_k: int,
    capacity_factor: float | None = None,
    mask: Array | None = None,
    renormalize: bool = True,
    dispatch: Literal["einsum", "gather"] = "einsum",
    dropless_impl: Literal["ragged_dot", "blocked"] = "ragged_dot",
    block_size: int = 128,
) -> tuple[Array, dict]:
    """Routed SwiGLU MoE feed-forward: :func:`router`, then :func:`moe_dropless` (``capacity_factor=None``,
    with ``dropless_impl`` and ``block_size``) or :func:`moe_capacity` (``capacity_factor`` > 0, with
    ``dispatch``).

    Args:
      x: ``[..., d_model]`` (e.g. ``[batch, seq, d_model]``).
      w_router: ``[d_model, n_experts]``; w_gate, w_up ``[n_experts, d_model, d_ff]``; w_down
        ``[n_experts, d_ff, d_model]``.
      top_k, renormalize: see :func:`router`. capacity_factor, dispatch: see :func:`moe_capacity`.
      dropless_impl, block_size: ``impl`` and ``block_size`` of :func:`moe_dropless`.
      mask: optional ``[...]`` token mask (0 = padding): excluded from dispatch, losses and counts.

    Returns:
      ``(y, aux)``: ``y`` like ``x``; ``aux`` dict with ``logits`` float32 ``[..., n_experts]``,
      ``experts`` int32 ``[..., top_k]``, ``weights`` float32 ``[..., top_k]``, ``dropped_fraction``
      (float32 scalar; 0 when dropless), ``expert_counts`` int32 ``[n_experts]``, and the unscaled
      ``load_balancing_loss`` and ``router_z_loss`` (scalars) for the caller to weight and sum.

    Raises:
      ValueError: on mismatched shapes (``w_router`` and ``w_gate`` must agree on ``n_experts``), bad
        ``top_k`` or ``capacity_factor <= 0``.
    """
    if w_router.ndim != 2 or w_gate.ndim != 3 or w_router.shape[1] != w_gate.shape[0]:
        raise ValueError(f"w_router: expected [d_model, n_experts] with n_experts = w_gate.shape[0], got "
                         f"{w_router.shape} and w_gate {w_gate.shape}")
    if capacity_factor is not None:
        _check_capacity_factor(capacity_factor)  # before doing any work
    weights, experts, logits = router(x, w_router, top_k=top_k, renormalize=renormalize)
    if capacity_factor is None:
        y, stats = moe_dropless(x, weights, experts, w_gate, w_up, w_down, mask=mask, impl=dropless_impl,
                                block_size=block_size)
    else:
        y, stats = moe_capacity(x, weights, experts, w_gate, w_up, w_down, capacity_factor=capacity_factor,
                                mask=mask, dispatch=dispatch)
    n_experts = w_router.shape[1]
    aux = {
        "logits": logits,
        "experts": experts,
        "weights": weights,
        "dropped_fraction": stats["dropped_fraction"],
        "expert_counts": stats["expert_counts"],
        "load_balancing_loss": load_balancing_loss(logits, experts, n_experts=n_experts, mask=mask),
        "router_z_loss": router_z_loss(logits, mask=mask),
    }
    return y, aux


# ---------------------------------------------------------------------------------------------- analysis
def expert_utilisation(
    experts: Array,
    logits: Array,
    *,
    n_experts: int,
    mask: Array | None = None,
    dropped_fraction: Array | float | None = None,
) -> dict:
    """Expert-utilisation statistics for collapse analysis (one MoE layer, one batch).

    Args:
      experts: int ``[..., top_k]`` router choices.
      logits: ``[..., n_experts]`` router logits of the same tokens.
      n_experts: number of experts ``N`` (= ``logits.shape[-1]``).
      mask: optional ``[...]`` token mask (0 = padding, not counted).
      dropped_fraction: optional, passed through (e.g. from :func:`moe_capacity`).

    Returns:
      dict of float32 arrays: ``load`` ``[N]`` -- fraction of the valid ``k * T`` assignments per expert
      (sums to 1); ``mean_prob`` ``[N]`` -- mean router probability per expert; ``entropy`` -- normalised
      entropy of ``load``, ``-sum load log load / log N`` (1 = uniform, 0 = one expert; 1 when N = 1);
      ``max_over_mean`` -- ``max(load) / mean(load) = N max(load)`` (1 = balanced, N = collapsed);
      ``dead_experts`` (int32) -- experts with load 0; ``router_logit_norm`` -- mean over tokens of the L2
      norm of the logit vector; and ``dropped_fraction`` when given. With no valid token, load is all 0.

    Raises:
      ValueError: on mismatched shapes or ``n_experts``.
    """
    if logits.ndim < 1 or logits.shape[-1] != n_experts:
        raise ValueError(f"logits: expected [..., n_experts={n_experts}], got {logits.shape}")
    k = _check_routing(None, experts, tuple(logits.shape[:-1]))
    _check_mask(mask, tuple(logits.shape[:-1]))
    t = math.prod(logits.shape[:-1])
    ct = _router_dtype(logits)
    m = _flat_mask(mask, t, ct)
    counts = jnp.einsum("t,te->e", m, jax.nn.one_hot(experts.reshape(t, k), n_experts, dtype=ct).sum(axis=1))
    n_valid = jnp.maximum(jnp.sum(m), 1.0)
    load = counts / (k * n_valid)
    plogp = jnp.where(load > 0, load * jnp.log(jnp.where(load > 0, load, 1.0)), 0.0)
    entropy = -jnp.sum(plogp) / math.log(n_experts) if n_experts > 1 else jnp.ones((), ct)
    lf = logits.reshape(t, n_experts).astype(ct)
    out = {
        "load": load,
        "mean_prob": jnp.einsum("t,te->e", m, jax.nn.softmax(lf, axis=-1)) / n_valid,
        "entropy": entropy,
        "max_over_mean": n_experts * jnp.max(load),
        "dead_experts": jnp.sum(counts == 0).astype(jnp.int32),
        "router_logit_norm": jnp.sum(m * jnp.linalg.norm(lf, axis=-1)) / n_valid,
    }
    if dropped_fraction is not None:
        out["dropped_fraction"] = jnp.asarray(dropped_fraction, jnp.float32)
    return out
