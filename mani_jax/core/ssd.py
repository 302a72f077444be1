"""Mamba-2 state-space duality (SSD): chunked scan, naive recurrence, decode step, causal depthwise conv1d.

The selective SSM of one Mamba-2 head (head dim ``p``, state size ``n``), per token ``t``::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T          h_t: [p, n]
    y_t = h_t C_t + D * x_t

Shapes (layout ``[batch, seq, heads, ...]``): ``x [b, l, h, p]``, ``dt [b, l, h]`` (after softplus, > 0),
``A [h]`` (negative: ``-exp(A_log)``), ``B, C [b, l, g, n]`` with ``g = n_groups`` and head ``i`` reading
group ``i // (h // g)``, ``D [h]``, state ``[b, h, p, n]``.

Sources: Dao & Gu 2024, "Transformers are SSMs" (arXiv 2405.21060), Sec. 6 and Listing 1
(``ssd_minimal_discrete`` in state-spaces/mamba: the four steps, the stable ``segsum``); the recurrence
and conv layout are what llama.cpp's ``ssm_scan`` / ``ssm_conv`` and Hugging Face ``GraniteMoeHybrid``
compute.

Packed sequences: ``segment_ids [b, l]`` (contiguous runs) stop state from flowing between documents,
exactly as if each document were run alone from a zero state (mamba_ssm's ``seq_idx``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _check_ssd(x, dt, A, B, C, D):
    if x.ndim != 4:
        raise ValueError(f"x: expected [batch, seq, n_heads, head_dim], got shape {x.shape}")
    b, l, h, p = x.shape
    if dt.shape != (b, l, h):
        raise ValueError(f"dt: expected shape {(b, l, h)}, got {dt.shape}")
    if A.shape != (h,):
        raise ValueError(f"A: expected shape ({h},), got {A.shape}")
    if B.ndim != 4 or B.shape[:2] != (b, l) or C.shape != B.shape:
        raise ValueError(f"B, C: expected [batch={b}, seq={l}, n_groups, d_state], got {B.shape} and {C.shape}")
    g = B.shape[2]
    if h % g:
        raise ValueError(f"n_groups ({g}) must divide n_heads ({h})")
    if D is not None and D.shape != (h,):
        raise ValueError(f"D: expected shape ({h},), got {D.shape}")
    return b, l, h, p, g, B.shape[3]


def _heads(bc: Array, h: int) -> Array:
    """Expand a grouped ``[..., g, n]`` B or C to per-head ``[..., h, n]`` (head i reads group i // (h/g))."""
    g = bc.shape[-2]
    return jnp.repeat(bc, h // g, axis=-2)


def segsum(a: Array) -> Array:
    """Stable segment sums: ``out[..., i, j] = sum_{j < k <= i} a[..., k]`` for ``i >= j``, ``-inf`` above.

    Computed by masked cumulative sums rather than differences of one cumsum, so no catastrophic
    cancellation (Dao & Gu 2024, Listing 1, ``segsum``). ``a [..., T]`` -> ``[..., T, T]``.
    """
    t = a.shape[-1]
    x = jnp.broadcast_to(a[..., None, :], (*a.shape[:-1], t, t))  # x[..., i, k] = a[k]
    strictly_lower = jnp.tril(jnp.ones((t, t), bool), -1)
    # For fixed j (column), cumsum down the rows over k in (j, i].
    x = jnp.where(strictly_lower, jnp.swapaxes(x, -1, -2), 0.0)  # x[..., k, j] = a[k] for k > j
    s = jnp.cumsum(x, axis=-2)  # s[..., i, j] = sum_{j<k<=i} a[k]
    return jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)


def ssd_chunked(
    x: Array,
    dt: Array,
    A: Array,
    B: Array,
    C: Array,
    *,
    chunk_size: int,
    D: Array | None = None,
    initial_state: Array | None = None,
    segment_ids: Array | None = None,
) -> tuple[Array, Array]:
    """Mamba-2 SSD by chunks (the training / prefill algorithm), O(seq * chunk_size) work.

    The four steps of Dao & Gu 2024 (Sec. 6): (1) the diagonal blocks as a masked attention-like matmul
    ``(L o C B^T) (dt x)`` with ``L = exp(segsum(dt A))``; (2) each chunk's final state; (3) the recurrence
    over chunk states (a ``lax.scan``, linear in the number of chunks); (4) the state-to-output term.

    Args:
      x, dt, A, B, C, D: see the module docstring. ``D`` is optional (no skip term when None).
      chunk_size: tokens per chunk (``Q``); ``seq`` need not be a multiple (padded internally).
      initial_state: ``[b, h, p, n]`` state before the first token (belongs to the first segment);
        zeros if None.
      segment_ids: int ``[b, l]``; state never crosses a change of segment id.

    Returns:
      ``(y, final_state)``: ``y [b, l, h, p]`` in ``x.dtype`` and ``final_state [b, h, p, n]`` float32
      (the state after the last token, of the last segment). All math is float32.

    Raises:
      ValueError: on inconsistent shapes or a non-positive ``chunk_size``.
    """
    b, l, h, p, g, n = _check_ssd(x, dt, A, B, C, D)
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size}")
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        raise ValueError(f"initial_state: expected shape {(b, h, p, n)}, got {initial_state.shape}")
    if segment_ids is not None and segment_ids.shape != (b, l):
        raise ValueError(f"segment_ids: expected shape {(b, l)}, got {segment_ids.shape}")
    out_dtype = x.dtype
    f32 = jnp.float32
    q = chunk_size
    nc = -(-l // q)
    pad = nc * q - l
    x32, dt32 = x.astype(f32), dt.astype(f32)
    Bh, Ch = _heads(B.astype(f32), h), _heads(C.astype(f32), h)
    if pad:  # padded steps have dt = 0: decay 1 and no input, so the final state is unchanged.
        x32 = jnp.pad(x32, ((0, 0), (0, pad), (0, 0), (0, 0)))
        dt32 = jnp.pad(dt32, ((0, 0), (0, pad), (0, 0)))
        Bh = jnp.pad(Bh, ((0, 0), (0, pad), (0, 0), (0, 0)))
        Ch = jnp.pad(Ch, ((0, 0), (0, pad), (0, 0), (0, 0)))
    seg = None
    if segment_ids is not None:
        seg = jnp.pad(segment_ids, ((0, 0), (0, pad)), mode="edge") if pad else segment_ids
        seg = seg.reshape(b, nc, q)

    def chunks(t):
        return t.reshape(b, nc, q, *t.shape[2:])

    xc, dtc, Bc, Cc = chunks(x32), chunks(dt32), chunks(Bh), chunks(Ch)
    a = jnp.einsum("bcqh,h->bchq", dtc, A.astype(f32))  # log-decay per step, [b, c, h, q]
    a_cs = jnp.cumsum(a, axis=-1)
    xdt = xc * dtc[..., None]  # [b, c, q, h, p]

    # 1. Intra-chunk (diagonal blocks).
    L = jnp.exp(segsum(a))  # [b, c, h, q(i), q(j)]
    if seg is not None:
        L = L * (seg[:, :, None, :, None] == seg[:, :, None, None, :])
    y_diag = jnp.einsum("bcihn,bcjhn,bchij,bcjhp->bcihp", Cc, Bc, L, xdt)

    # 2. State at the end of each chunk from that chunk's own inputs.
    decay_to_end = jnp.exp(a_cs[..., -1:] - a_cs)  # [b, c, h, q]
    if seg is not None:
        decay_to_end = decay_to_end * (seg[:, :, None, :] == seg[:, :, None, -1:])
    chunk_states = jnp.einsum("bcjhn,bchj,bcjhp->bchpn", Bc, decay_to_end, xdt)

    # 3. Recurrence over chunks: S_c = exp(sum a over chunk c) * S_{c-1} + chunk_states_c.
    chunk_decay = jnp.exp(a_cs[..., -1])  # [b, c, h]
    # zeros_like (not zeros) so that under shard_map the carry varies over the same mesh axes as the inputs.
    s0 = jnp.zeros_like(chunk_states[:, 0], f32) if initial_state is None else initial_state.astype(f32)
    if seg is not None:
        state_seg0 = seg[:, 0, 0]
        end_seg = seg[:, :, -1]  # [b, c]
    else:
        state_seg0 = jnp.zeros((b,), jnp.int32)
        end_seg = jnp.zeros((b, nc), jnp.int32)

    def step(carry, inputs):
        state, state_seg = carry
        decay, new, seg_end = inputs
        keep = (state_seg == seg_end).astype(f32)[:, None, None, None]
        nxt = state * decay[:, :, None, None] * keep + new
        return (nxt, seg_end), (state, state_seg)

    (final_state, _), (states_in, states_in_seg) = jax.lax.scan(
        step, (s0, state_seg0),
        (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(chunk_states, 1, 0), jnp.moveaxis(end_seg, 1, 0)))
    states_in = jnp.moveaxis(states_in, 0, 1)  # state entering chunk c: [b, c, h, p, n]
    states_in_seg = jnp.moveaxis(states_in_seg, 0, 1)  # [b, c]

    # 4. Contribution of the incoming state to each token of the chunk.
    decay_from_start = jnp.exp(a_cs)  # [b, c, h, q]
    if seg is not None:
        decay_from_start = decay_from_start * (seg[:, :, None, :] == states_in_seg[:, :, None, None])
    y_off = jnp.einsum("bcihn,bchpn,bchi->bcihp", Cc, states_in, decay_from_start)

    y = (y_diag + y_off).reshape(b, nc * q, h, p)[:, :l]
    if D is not None:
        y = y + x.astype(f32) * D.astype(f32)[:, None]
    return y.astype(out_dtype), final_state


def ssd_recurrent(
    x: Array,
    dt: Array,
    A: Array,
    B: Array,
    C: Array,
    *,
    D: Array | None = None,
    initial_state: Array | None = None,
    segment_ids: Array | None = None,
) -> tuple[Array, Array]:
    """The SSM as a plain token-by-token recurrence (``lax.scan``): the naive reference for :func:`ssd_chunked`.

    Same arguments (no ``chunk_size``), returns and errors as :func:`ssd_chunked`.
    """
    b, l, h, p, g, n = _check_ssd(x, dt, A, B, C, D)
    f32 = jnp.float32
    s0 = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)
    seg = jnp.zeros((b, l), jnp.int32) if segment_ids is None else segment_ids
    prev_seg = jnp.concatenate([seg[:, :1], seg[:, :-1]], axis=1)

    def step(state, inp):
        xt, dtt, Bt, Ct, new_doc = inp
        state = state * (1.0 - new_doc.astype(f32))[:, None, None, None]
        yt, state = ssd_step(state, xt, dtt, A, Bt, Ct, D=D)
        return state, yt

    final, ys = jax.lax.scan(step, s0, tuple(jnp.moveaxis(t, 1, 0) for t in (x, dt, B, C, seg != prev_seg)))
    return jnp.moveaxis(ys, 0, 1).astype(x.dtype), final


def ssd_step(
    state: Array, x: Array, dt: Array, A: Array, B: Array, C: Array, *, D: Array | None = None
) -> tuple[Array, Array]:
    """One decoding step of the SSM recurrence.

    Args:
      state: ``[b, h, p, n]`` (float32 recommended).
      x: ``[b, h, p]``; dt: ``[b, h]`` (after softplus); A: ``[h]``; B, C: ``[b, g, n]``; D: ``[h]`` or None.

    Returns:
      ``(y [b, h, p] in x.dtype, new_state [b, h, p, n] float32)``:
      ``new_state = exp(dt A) state + dt x B^T``, ``y = new_state C + D x``.

    Raises:
      ValueError: on inconsistent shapes.
    """
    if x.ndim != 3 or state.shape[:3] != x.shape:
        raise ValueError(f"x: expected [batch, n_heads, head_dim] matching state {state.shape}, got {x.shape}")
    b, h, p = x.shape
    n = state.shape[-1]
    if dt.shape != (b, h):
        raise ValueError(f"dt: expected shape {(b, h)}, got {dt.shape}")
    if B.ndim != 3 or B.shape[0] != b or B.shape[2] != n or C.shape != B.shape or h % B.shape[1]:
        raise ValueError(f"B, C: expected [batch, n_groups | n_heads, {n}], got {B.shape} and {C.shape}")
    f32 = jnp.float32
    Bh, Ch = _heads(B.astype(f32), h), _heads(C.astype(f32), h)
    dt32 = dt.astype(f32)
    decay = jnp.exp(dt32 * A.astype(f32))[:, :, None, None]
    new_state = state.astype(f32) * decay + (dt32[:, :, None] * x.astype(f32))[..., None] * Bh[:, :, None, :]
    y = jnp.einsum("bhpn,bhn->bhp", new_state, Ch)
    if D is not None:
        y = y + D.astype(f32)[:, None] * x.astype(f32)
    return y.astype(x.dtype), new_state


def causal_conv1d(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    *,
    initial_state: Array | None = None,
    segment_ids: Array | None = None,
) -> tuple[Array, Array]:
    """Causal depthwise conv1d over time: ``y[t, c] = sum_k weight[c, k] * xpad[t + k, c] + bias[c]``.

    ``xpad`` is ``x`` with the ``d_conv - 1`` previous inputs (``initial_state``, zeros by default) in
    front, so ``weight[:, -1]`` multiplies the current token: PyTorch ``Conv1d(groups=channels,
    padding=d_conv-1)`` truncated to the first ``seq`` outputs, and llama.cpp's ``ssm_conv``.
    No activation is applied.

    Args:
      x: ``[b, l, channels]``.
      weight: ``[channels, d_conv]``.
      bias: ``[channels]`` or None.
      initial_state: ``[b, d_conv - 1, channels]``, the inputs before ``x`` (oldest first).
      segment_ids: int ``[b, l]``; taps never reach into another segment (the initial state belongs to
        the first token's segment).

    Returns:
      ``(y [b, l, channels] in x.dtype, final_state [b, d_conv - 1, channels])``: the last ``d_conv - 1``
      inputs, ready for :func:`causal_conv1d_step`; rows from a segment other than the last are zeroed.

    Raises:
      ValueError: on inconsistent shapes.
    """
    if x.ndim != 3:
        raise ValueError(f"x: expected [batch, seq, channels], got shape {x.shape}")
    b, l, c = x.shape
    if weight.ndim != 2 or weight.shape[0] != c:
        raise ValueError(f"weight: expected [channels={c}, d_conv], got {weight.shape}")
    k = weight.shape[1]
    if bias is not None and bias.shape != (c,):
        raise ValueError(f"bias: expected shape ({c},), got {bias.shape}")
    if initial_state is None:
        initial_state = jnp.zeros((b, k - 1, c), x.dtype)
    elif initial_state.shape != (b, k - 1, c):
        raise ValueError(f"initial_state: expected shape {(b, k - 1, c)}, got {initial_state.shape}")
    xpad = jnp.concatenate([initial_state.astype(x.dtype), x], axis=1)  # [b, k-1+l, c]
    if segment_ids is not None:
        if segment_ids.shape != (b, l):
            raise ValueError(f"segment_ids: expected shape {(b, l)}, got {segment_ids.shape}")
        segpad = jnp.concatenate([jnp.broadcast_to(segment_ids[:, :1], (b, k - 1)), segment_ids], axis=1)
    f32 = jnp.float32
    y = jnp.zeros((b, l, c), f32)
    for j in range(k):
        tap = xpad[:, j:j + l].astype(f32)
        if segment_ids is not None:
            tap = tap * (segpad[:, j:j + l] == segment_ids)[..., None]
        y = y + tap * weight[:, j].astype(f32)
    if bias is not None:
        y = y + bias.astype(f32)
    final_state = xpad[:, l:]
    if segment_ids is not None:
        final_state = final_state * (segpad[:, l:] == segment_ids[:, -1:])[..., None].astype(x.dtype)
    return y.astype(x.dtype), final_state


def causal_conv1d_step(
    conv_state: Array, x: Array, weight: Array, bias: Array | None = None
) -> tuple[Array, Array]:
    """One decoding step of :func:`causal_conv1d`.

    Args:
      conv_state: ``[b, d_conv - 1, channels]``, the previous inputs (oldest first).
      x: ``[b, channels]``, the current input.
      weight: ``[channels, d_conv]``; bias: ``[channels]`` or None.

    Returns:
      ``(y [b, channels], new_state [b, d_conv - 1, channels])``.

    Raises:
      ValueError: on inconsistent shapes.
    """
    if x.ndim != 2 or conv_state.ndim != 3 or conv_state.shape[::2] != x.shape:
        raise ValueError(f"x: expected [batch, channels] matching conv_state {conv_state.shape}, got {x.shape}")
    if weight.shape != (x.shape[1], conv_state.shape[1] + 1):
        raise ValueError(f"weight: expected shape {(x.shape[1], conv_state.shape[1] + 1)}, got {weight.shape}")
    window = jnp.concatenate([conv_state.astype(x.dtype), x[:, None]], axis=1)  # [b, k, c]
    y = jnp.einsum("bkc,ck->bc", window.astype(jnp.float32), weight.astype(jnp.float32))
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype), window[:, 1:]
