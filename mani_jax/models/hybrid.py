"""The hybrid Mamba-2 + attention language model (Chimera) as Flax NNX modules built from ``mani_jax.core``.

Block (pre-norm; llama.cpp ``granitehybrid``, Hugging Face ``GraniteMoeHybridDecoderLayer``)::

    x = x + residual_multiplier * mixer(rms_norm(x))         mixer: Attention or Mamba2Mixer per layer
    x = x + residual_multiplier * swiglu_mlp(rms_norm(x))

Model: ``embed * embedding_multiplier -> blocks -> rms_norm -> lm_head / logits_scaling``. Layout is
``[batch, seq, ...]``. With every layer ``"attention"`` this is a Qwen2/Llama-style dense decoder.

Caches for inference are plain pytrees (``dict``) so they pass through ``jax.jit``: attention layers keep
``k, v [batch, max_len, n_kv_heads, head_dim]``; Mamba-2 layers keep ``conv [batch, d_conv-1, conv_dim]``
and ``ssm [batch, n_heads, head_dim, d_state]`` (float32); ``pos`` (int32 scalar) is the number of tokens
already in the cache (all rows of a batch advance together).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mani_jax import core
from mani_jax.models.attention_impls import chunked_ssd, full_sequence_attention, paged_decode_attention
from mani_jax.models.config import ModelConfig
from mani_jax.models.quantize import weight_value
from mani_jax.models.remat import remat_call
from mani_jax.models.sharding import constrain, current_mesh

Array = jax.Array
Cache = dict[str, Any]


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale ``weight [dim]`` (see :func:`mani_jax.core.rms_norm`)."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        return core.rms_norm(x, self.weight[...], self.eps)


class MLP(nnx.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` (Shazeer 2020)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = _dtype(cfg.param_dtype)
        init = _normal(cfg.initializer_range)
        out_init = _normal(cfg.initializer_range / math.sqrt(2 * cfg.n_layers))
        self.gate_proj = nnx.Linear(cfg.d_model, cfg.d_ff, use_bias=cfg.mlp_bias, kernel_init=init,
                                    param_dtype=pd, rngs=rngs)
        self.up_proj = nnx.Linear(cfg.d_model, cfg.d_ff, use_bias=cfg.mlp_bias, kernel_init=init,
                                  param_dtype=pd, rngs=rngs)
        self.down_proj = nnx.Linear(cfg.d_ff, cfg.d_model, use_bias=cfg.mlp_bias, kernel_init=out_init,
                                    param_dtype=pd, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(core.swiglu(self.gate_proj(x), self.up_proj(x)))


class MoEFFN(nnx.Module):
    """Routed SwiGLU mixture of experts (:func:`mani_jax.core.moe.moe_ffn`): softmax over ``n_experts`` router
    logits -> top-k -> renormalise, as Mixtral, Granite-4.0-H and llama.cpp compute it.

    Parameters: ``router.kernel [d_model, n_experts]``, ``w_gate, w_up [n_experts, d_model, d_ff_expert]``,
    ``w_down [n_experts, d_ff_expert, d_model]``. Dispatch follows the config: dropless
    (``capacity_factor=None``, grouped matmul ``dropless_impl``) or capacity-based (``moe_dispatch``);
    ``moe_dispatch="all_to_all"`` is expert parallelism with the all-to-all written out
    (:func:`mani_jax.parallel.expert_parallel_moe` on the mesh of the sharded step being traced; capacity
    per batch shard; on one device, or an ``expert`` axis of 1, the same code on the whole batch).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = _dtype(cfg.param_dtype)
        e, d, f = cfg.n_experts, cfg.d_model, cfg.d_ff_expert
        std = cfg.initializer_range
        self.router = nnx.Linear(d, e, use_bias=False, kernel_init=_normal(std), param_dtype=pd, rngs=rngs)
        self.w_gate = nnx.Param(std * jax.random.normal(rngs.params(), (e, d, f), pd))
        self.w_up = nnx.Param(std * jax.random.normal(rngs.params(), (e, d, f), pd))
        self.w_down = nnx.Param(std / math.sqrt(2 * cfg.n_layers) * jax.random.normal(rngs.params(), (e, f, d), pd))

    def __call__(self, x: Array) -> tuple[Array, dict[str, Array]]:
        """``x [batch, seq, d_model]`` -> ``(y like x, aux)``.

        ``aux`` (all float32 unless noted): ``load_balancing_loss`` and ``router_z_loss`` (unscaled scalars,
        :func:`mani_jax.core.moe.load_balancing_loss` / ``router_z_loss``), ``dropped_fraction``, and
        :func:`mani_jax.core.moe.expert_utilisation`'s ``load [n_experts]``, ``mean_prob [n_experts]``,
        ``entropy``, ``max_over_mean``, ``dead_experts`` (int32), ``router_logit_norm``, and the routing
        itself: ``experts`` (int32 ``[batch, seq, top_k]``, best first) and ``weights [batch, seq, top_k]``.
        """
        cfg = self.cfg
        w_gate, w_up, w_down = (weight_value(w, x.dtype) for w in (self.w_gate, self.w_up, self.w_down))
        if cfg.moe_dispatch == "all_to_all":  # experts over the step's 'expert' axis, tokens moved by all-to-all
            from mani_jax.parallel.expert import expert_parallel_moe  # (lazy: mani_jax.parallel imports models)

            y, aux = expert_parallel_moe(x, self.router.kernel[...], w_gate, w_up, w_down, mesh=current_mesh(),
                                         top_k=cfg.top_k, capacity_factor=cfg.capacity_factor)
        else:
            y, aux = core.moe_ffn(x, self.router.kernel[...], w_gate, w_up, w_down, top_k=cfg.top_k,
                                  capacity_factor=cfg.capacity_factor, dispatch=cfg.moe_dispatch,
                                  dropless_impl=cfg.dropless_impl)
        stats = core.expert_utilisation(aux["experts"], aux["logits"], n_experts=cfg.n_experts,
                                        dropped_fraction=aux["dropped_fraction"])
        stats["load_balancing_loss"] = aux["load_balancing_loss"]
        stats["router_z_loss"] = aux["router_z_loss"]
        stats["experts"], stats["weights"] = aux["experts"], aux["weights"]
        return y, stats


class Attention(nnx.Module):
    """Multi-head attention with GQA, optional q/k/v biases, RoPE (rotate-half) or NoPE, and a KV cache."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = _dtype(cfg.param_dtype)
        init = _normal(cfg.initializer_range)
        out_init = _normal(cfg.initializer_range / math.sqrt(2 * cfg.n_layers))
        hd = cfg.head_dim
        self.q_proj = nnx.Linear(cfg.d_model, cfg.n_heads * hd, use_bias=cfg.attention_bias, kernel_init=init,
                                 param_dtype=pd, rngs=rngs)
        self.k_proj = nnx.Linear(cfg.d_model, cfg.n_kv_heads * hd, use_bias=cfg.attention_bias,
                                 kernel_init=init, param_dtype=pd, rngs=rngs)
        self.v_proj = nnx.Linear(cfg.d_model, cfg.n_kv_heads * hd, use_bias=cfg.attention_bias,
                                 kernel_init=init, param_dtype=pd, rngs=rngs)
        self.o_proj = nnx.Linear(cfg.n_heads * hd, cfg.d_model, use_bias=cfg.attention_out_bias,
                                 kernel_init=out_init, param_dtype=pd, rngs=rngs)

    def init_cache(self, batch: int, max_len: int, dtype) -> Cache:
        shape = (batch, max_len, self.cfg.n_kv_heads, self.cfg.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def __call__(self, x: Array, *, positions: Array, segment_ids: Array | None = None,
                 cache: Cache | None = None, cache_pos: Array | None = None,
                 paged: tuple[Array, Array] | None = None) -> tuple[Array, Cache | None]:
        """``cache``: contiguous ``{"k", "v"}`` written at ``cache_pos``, or with ``paged = (block_tables,
        lengths)`` the paged ``{"k_pages", "v_pages"}`` (:mod:`mani_jax.core.paged_attention` layout), where
        token ``[b, t]`` is written at its ``positions[b, t]``."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, cfg.n_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        if cfg.rope:
            q = core.apply_rope(q, positions, theta=cfg.rope_theta)
            k = core.apply_rope(k, positions, theta=cfg.rope_theta)
        kw = dict(softmax_scale=cfg.attention_multiplier, sliding_window=cfg.sliding_window)
        if cache is None:  # full sequence: the configured implementation (cached paths: the reference)
            out = full_sequence_attention(cfg)(q, k, v, causal=True, segment_ids=segment_ids,
                                               q_positions=positions, kv_positions=positions, **kw)
            new_cache = None
        elif paged is not None:
            block_tables, lengths = paged
            ps = cache["k_pages"].shape[1]
            page = jnp.take_along_axis(block_tables, positions // ps, axis=1)  # [b, t]
            off = positions % ps
            kp = cache["k_pages"].at[page, off].set(k.astype(cache["k_pages"].dtype))
            vp = cache["v_pages"].at[page, off].set(v.astype(cache["v_pages"].dtype))
            if t == 1 and cfg.paged_attention_impl != "xla":  # decode: the query sits at lengths - 1
                out = paged_decode_attention(cfg)(q[:, 0], kp, vp, block_tables, lengths, **kw)[:, None]
            else:
                out = core.paged_attention(q, kp, vp, block_tables, lengths, q_positions=positions, **kw)
            new_cache = {"k_pages": kp, "v_pages": vp}
        else:
            ck = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, cache_pos, 0, 0))
            cv = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, cache_pos, 0, 0))
            s = ck.shape[1]
            slot = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            qslot = jnp.broadcast_to(cache_pos + jnp.arange(t, dtype=jnp.int32), (b, t))
            # Slots beyond cache_pos + t are in the future of every query, so causal masking hides them.
            out = core.attention(q, ck.astype(q.dtype), cv.astype(q.dtype), causal=True, q_positions=qslot,
                                 kv_positions=slot, **kw)
            new_cache = {"k": ck, "v": cv}
        return self.o_proj(out.reshape(b, t, cfg.n_heads * cfg.head_dim)), new_cache


class Mamba2Mixer(nnx.Module):
    """Mamba-2 mixer (Dao & Gu 2024, Fig. 6 "parallel" block), exactly as llama.cpp ``granitehybrid`` runs it.

    ``in_proj`` rows are ``[z | x | B | C | dt]``; ``xBC = silu(conv1d(xBC) + conv_bias)``;
    ``dt = softplus(dt + dt_bias)`` (no clamp); ``A = -exp(A_log)``; ``y = SSD(x, dt, A, B, C) + D x``;
    ``y = grouped_rms_norm(y * silu(z)) * norm.weight``; ``out_proj(y)``.
    Parameters: ``conv_weight [conv_dim, d_conv]`` (``[:, -1]`` multiplies the current token), ``conv_bias
    [conv_dim]``, ``dt_bias, A_log, D [mamba_n_heads]``, ``norm.weight [d_inner]``.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = _dtype(cfg.param_dtype)
        nh = cfg.mamba_n_heads
        d_in_proj = 2 * cfg.d_inner + 2 * cfg.n_groups * cfg.d_state + nh
        self.in_proj = nnx.Linear(cfg.d_model, d_in_proj, use_bias=cfg.mamba_proj_bias,
                                  kernel_init=_normal(cfg.initializer_range), param_dtype=pd, rngs=rngs)
        bound = 1.0 / math.sqrt(cfg.d_conv)  # PyTorch Conv1d default (fan_in = d_conv for depthwise)
        self.conv_weight = nnx.Param(jax.random.uniform(rngs.params(), (cfg.conv_dim, cfg.d_conv), pd,
                                                        -bound, bound))
        self.conv_bias = nnx.Param(jnp.zeros((cfg.conv_dim,), pd)) if cfg.mamba_conv_bias else None
        # dt initialised log-uniform in [1e-3, 1e-1]; dt_bias = softplus^{-1}(dt) (Mamba-2 reference init).
        dt = jnp.exp(jax.random.uniform(rngs.params(), (nh,), jnp.float32, math.log(1e-3), math.log(1e-1)))
        dt = jnp.maximum(dt, 1e-4)
        self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(pd))
        self.A_log = nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (nh,), jnp.float32, 1.0, 16.0)).astype(pd))
        self.D = nnx.Param(jnp.ones((nh,), pd))
        self.norm = RMSNorm(cfg.d_inner, cfg.norm_eps, param_dtype=pd)
        self.out_proj = nnx.Linear(cfg.d_inner, cfg.d_model, use_bias=cfg.mamba_proj_bias,
                                   kernel_init=_normal(cfg.initializer_range / math.sqrt(2 * cfg.n_layers)),
                                   param_dtype=pd, rngs=rngs)

    def init_cache(self, batch: int, dtype) -> Cache:
        cfg = self.cfg
        return {"conv": jnp.zeros((batch, cfg.d_conv - 1, cfg.conv_dim), dtype),
                "ssm": jnp.zeros((batch, cfg.mamba_n_heads, cfg.mamba_head_dim, cfg.d_state), jnp.float32)}

    def __call__(self, x: Array, *, segment_ids: Array | None = None, cache: Cache | None = None,
                 step_states: bool = False) -> tuple[Array, Cache | None]:
        """``x [B, T, d_model]`` -> ``(out [B, T, d_model], new cache)``.

        With a ``cache`` and ``T == 1`` (decode), or with ``step_states=True``, the recurrences run token by
        token (:func:`core.causal_conv1d_step`, :func:`core.ssd_step`); otherwise the chunked SSD. With
        ``step_states=True`` the returned cache holds the state after **every** token, ``conv [B, T, d_conv -
        1, conv_dim]`` and ``ssm [B, T, n_heads, head_dim, d_state]``: speculative decoding keeps the state
        after the last accepted token."""
        cfg = self.cfg
        b, t, _ = x.shape
        nh, hp, g, n = cfg.mamba_n_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.d_state
        zxbcdt = self.in_proj(x)
        z, xbc, dt = jnp.split(zxbcdt, [cfg.d_inner, cfg.d_inner + cfg.conv_dim], axis=-1)
        conv_b = None if self.conv_bias is None else self.conv_bias[...]
        A = -jnp.exp(self.A_log[...].astype(jnp.float32))
        D = self.D[...]
        if cache is not None and (t == 1 or step_states):  # token-by-token recurrences
            def step(carry, inp):
                conv, ssm = carry
                xbc_t, dt_t = inp
                xbc1, conv = core.causal_conv1d_step(conv, xbc_t, self.conv_weight[...], conv_b)
                xbc1 = jax.nn.silu(xbc1)
                xs, B, C = jnp.split(xbc1, [cfg.d_inner, cfg.d_inner + g * n], axis=-1)
                dt1 = core.softplus(dt_t.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
                y, ssm = core.ssd_step(ssm, xs.reshape(b, nh, hp), dt1, A, B.reshape(b, g, n),
                                       C.reshape(b, g, n), D=D)
                conv = conv.astype(cache["conv"].dtype)
                return (conv, ssm), (y, conv, ssm)

            _, (ys, convs, ssms) = jax.lax.scan(step, (cache["conv"], cache["ssm"]),
                                                (xbc.swapaxes(0, 1), dt.swapaxes(0, 1)))
            y = ys.swapaxes(0, 1).reshape(b, t, cfg.d_inner)
            if step_states:
                new_cache = {"conv": convs.swapaxes(0, 1), "ssm": ssms.swapaxes(0, 1)}
            else:
                new_cache = {"conv": convs[-1], "ssm": ssms[-1]}
        else:
            init_conv = None if cache is None else cache["conv"].astype(xbc.dtype)
            init_ssm = None if cache is None else cache["ssm"]
            xbc, conv_state = core.causal_conv1d(xbc, self.conv_weight[...], conv_b, initial_state=init_conv,
                                                 segment_ids=segment_ids)
            xbc = jax.nn.silu(xbc)
            xs, B, C = jnp.split(xbc, [cfg.d_inner, cfg.d_inner + g * n], axis=-1)
            dtv = core.softplus(dt.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
            y, ssm_state = chunked_ssd(cfg)(xs.reshape(b, t, nh, hp), dtv, A, B.reshape(b, t, g, n),
                                            C.reshape(b, t, g, n), chunk_size=cfg.chunk_size, D=D,
                                            initial_state=init_ssm, segment_ids=segment_ids)
            y = y.reshape(b, t, cfg.d_inner)
            new_cache = None if cache is None else {"conv": conv_state.astype(cache["conv"].dtype),
                                                    "ssm": ssm_state}
        y = core.gated_rms_norm(y, z, self.norm.weight[...], n_groups=g, eps=cfg.norm_eps)
        return self.out_proj(y), new_cache


class Block(nnx.Module):
    """Pre-norm residual block: a mixer (attention or Mamba-2) then a SwiGLU MLP, a mixture of experts, or
    both summed (experts + shared MLP, Granite-4.0-H)."""

    def __init__(self, cfg: ModelConfig, layer_type: str, *, rngs: nnx.Rngs):
        pd = _dtype(cfg.param_dtype)
        self.layer_type = layer_type
        self.residual_multiplier = cfg.residual_multiplier
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype=pd)
        self.mixer = Attention(cfg, rngs=rngs) if layer_type == "attention" else Mamba2Mixer(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype=pd)
        self.ffn = MLP(cfg, rngs=rngs) if (cfg.n_experts == 0 or cfg.shared_mlp) else None
        self.moe = MoEFFN(cfg, rngs=rngs) if cfg.n_experts else None

    def __call__(self, x, *, positions, segment_ids=None, cache=None, cache_pos=None, paged=None,
                 step_states=False):
        """Returns ``(x, new_cache, moe_aux)``; ``moe_aux`` is :class:`MoEFFN`'s aux dict, or None (dense).
        ``step_states`` goes to :class:`Mamba2Mixer`."""
        h = self.mixer_norm(x)
        if self.layer_type == "attention":
            h, new_cache = self.mixer(h, positions=positions, segment_ids=segment_ids, cache=cache,
                                      cache_pos=cache_pos, paged=paged)
        else:
            h, new_cache = self.mixer(h, segment_ids=segment_ids, cache=cache, step_states=step_states)
        x = x + self.residual_multiplier * h
        h = self.ffn_norm(x)
        aux = None
        if self.moe is None:
            out = self.ffn(h)
        else:
            out, aux = self.moe(h)
            if self.ffn is not None:
                out = out + self.ffn(h)
        x = x + self.residual_multiplier * out
        return x, new_cache, aux


class HybridLM(nnx.Module):
    """Decoder-only LM whose layer pattern (attention / Mamba-2) comes from :class:`ModelConfig`.

    Call ``model(tokens, segment_ids=..., positions=...) -> logits`` for training; use
    :meth:`init_cache`, :meth:`prefill` and :meth:`decode_step` for generation.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        pd = _dtype(cfg.param_dtype)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=_normal(cfg.initializer_range),
                               param_dtype=pd, rngs=rngs)
        self.layers = nnx.List([Block(cfg, t, rngs=rngs) for t in cfg.layer_types])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype=pd)
        self.lm_head = None if cfg.tie_embeddings else nnx.Linear(
            cfg.d_model, cfg.vocab_size, use_bias=False, kernel_init=_normal(cfg.initializer_range),
            param_dtype=pd, rngs=rngs)

    def _check_tokens(self, tokens: Array, ndim: int, name: str = "tokens"):
        if tokens.ndim != ndim:
            raise ValueError(f"{name}: expected {ndim}-d int array, got shape {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"{name}: expected an integer dtype, got {tokens.dtype}")

    def _logits(self, x: Array) -> Array:
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
        return logits.astype(jnp.float32) / self.config.logits_scaling

    def _embed(self, tokens: Array) -> Array:
        return self.embed(tokens) * jnp.asarray(self.config.embedding_multiplier, self.embed.embedding.dtype)

    def __call__(self, tokens: Array, *, segment_ids: Array | None = None,
                 positions: Array | None = None, return_aux: bool = False):
        """Logits for every position.

        Args:
          tokens: int ``[batch, seq]``.
          segment_ids: int ``[batch, seq]`` for packed documents (no attention or SSM state crosses a change
            of id); None = one document per row.
          positions: int ``[batch, seq]`` RoPE positions; default: position within the segment.
          return_aux: also return the MoE routing aux (see below).

        Returns:
          float32 logits ``[batch, seq, vocab_size]``; with ``return_aux``, ``(logits, aux)`` where ``aux``
          holds ``load_balancing_loss`` and ``router_z_loss`` (float32 scalars, unscaled, averaged over the
          MoE layers; 0 for a dense model) and ``layers``: the per-layer :class:`MoEFFN` aux dicts stacked
          along a leading ``[n_moe_layers]`` axis (empty dict for a dense model). The training objective is
          ``lm_loss + router_aux_loss_coef * load_balancing_loss + router_z_loss_coef * router_z_loss``.

        Raises:
          ValueError: if ``tokens`` is not a 2-d integer array or the other arrays' shapes differ from it.
        """
        self._check_tokens(tokens, 2)
        for name, arr in (("segment_ids", segment_ids), ("positions", positions)):
            if arr is not None and arr.shape != tokens.shape:
                raise ValueError(f"{name}: expected shape {tokens.shape}, got {arr.shape}")
        return self.forward_embeddings(self._embed(tokens), segment_ids=segment_ids, positions=positions,
                                       return_aux=return_aux)

    def forward_embeddings(self, x: Array, *, segment_ids: Array | None = None,
                           positions: Array | None = None, return_aux: bool = False):
        """Logits from already-embedded inputs ``x [batch, seq, d_model]`` (after ``embedding_multiplier``).

        Same as :meth:`__call__` otherwise (Hugging Face's ``inputs_embeds``); useful for gradients with
        respect to the inputs.
        """
        b, t = x.shape[:2]
        if positions is None:
            positions = (core.positions_from_segments(segment_ids) if segment_ids is not None else
                         jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
        auxes = []
        residual = ("batch", "act_seq", "act_embed")  # sharding hint, a no-op outside mani_jax.parallel
        x = constrain(x, residual)
        for layer, policy in zip(self.layers, self.config.remat_policies):  # remat: config.remat per block
            x, _, aux = remat_call(layer, policy, x, positions=positions, segment_ids=segment_ids)
            x = constrain(x, residual)
            if aux is not None:
                auxes.append(aux)
        logits = self._logits(x)
        if not return_aux:
            return logits
        zero = jnp.zeros((), jnp.float32)
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *auxes) if auxes else {}
        return logits, {
            "load_balancing_loss": jnp.mean(stacked["load_balancing_loss"]) if auxes else zero,
            "router_z_loss": jnp.mean(stacked["router_z_loss"]) if auxes else zero,
            "layers": stacked,
        }

    def init_cache(self, batch: int, max_len: int | None = None, dtype=None) -> Cache:
        """An empty cache for ``batch`` rows of up to ``max_len`` tokens (default ``config.max_seq_len``)."""
        max_len = self.config.max_seq_len if max_len is None else max_len
        dtype = self.embed.embedding.dtype if dtype is None else dtype
        layers = [l.mixer.init_cache(batch, max_len, dtype) if l.layer_type == "attention"
                  else l.mixer.init_cache(batch, dtype) for l in self.layers]
        return {"pos": jnp.zeros((), jnp.int32), "layers": layers}

    def prefill(self, tokens: Array, cache: Cache) -> tuple[Array, Cache]:
        """Run ``tokens [batch, t]`` after what ``cache`` holds; returns ``(logits [batch, t, vocab], cache)``.

        Raises ValueError if ``tokens`` is not 2-d integer or would overflow an attention cache.
        """
        self._check_tokens(tokens, 2)
        b, t = tokens.shape
        pos = cache["pos"]
        attn_caches = [c for c, l in zip(cache["layers"], self.layers) if l.layer_type == "attention"]
        if attn_caches and not isinstance(pos, jax.core.Tracer):  # under jit the caller owns the bound
            size = attn_caches[0]["k"].shape[1]
            if int(pos) + t > size:
                raise ValueError(f"tokens: {int(pos)} cached + {t} new tokens overflow the cache of {size} slots")
        positions = jnp.broadcast_to(pos + jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self._embed(tokens)
        new_layers = []
        for layer, c in zip(self.layers, cache["layers"]):
            x, nc, _ = layer(x, positions=positions, cache=c, cache_pos=pos)
            new_layers.append(nc)
        return self._logits(x), {"pos": pos + t, "layers": new_layers}

    def init_paged_cache(self, n_pages: int, page_size: int, n_slots: int, dtype=None) -> list[Cache]:
        """Per-layer state for :meth:`forward_paged`: attention layers ``{"k_pages", "v_pages"}`` of
        ``[n_pages, page_size, n_kv_heads, head_dim]``; Mamba-2 layers ``{"conv", "ssm"}`` with one row per
        sequence slot (``[n_slots, ...]`` as in :meth:`init_cache`)."""
        dtype = self.embed.embedding.dtype if dtype is None else dtype
        cfg = self.config
        shape = (n_pages, page_size, cfg.n_kv_heads, cfg.head_dim)
        return [{"k_pages": jnp.zeros(shape, dtype), "v_pages": jnp.zeros(shape, dtype)}
                if l.layer_type == "attention" else l.mixer.init_cache(n_slots, dtype) for l in self.layers]

    def forward_paged(self, tokens: Array, positions: Array, cache: list[Cache], block_tables: Array,
                      lengths: Array, slots: Array, *, step_states: bool = False):
        """One engine step over a paged KV cache: logits for ``tokens`` and the updated per-layer state.

        Args:
          tokens: int ``[B, T]``; row ``b`` continues the sequence whose pages are ``block_tables[b]`` and
            whose recurrent state is slot ``slots[b]``. Every row's tokens are consecutive.
          positions: int ``[B, T]`` absolute positions (the keys are written there).
          cache: :meth:`init_paged_cache` state.
          block_tables: int ``[B, max_pages]``; lengths: int ``[B]`` tokens cached after this step's writes.
          slots: int ``[B]`` rows of the Mamba-2 state (distinct within a call).

          step_states: also return every Mamba-2 layer's state after each of the ``T`` tokens (the layers run
            their recurrences token by token): for speculative decoding, which keeps the state after the last
            accepted token.

        Returns:
          ``(logits float32 [B, T, vocab], new cache)``, plus with ``step_states`` a list with, per Mamba-2
          layer (in layer order), ``{"conv": [B, T, d_conv - 1, conv_dim], "ssm": [B, T, n_heads, head_dim,
          d_state]}``. The new cache holds the state after all ``T`` tokens. Equals :meth:`prefill` /
          :meth:`decode_step` on a contiguous cache holding the same tokens.
        """
        self._check_tokens(tokens, 2)
        x = self._embed(tokens)
        new, steps = [], []
        for layer, c in zip(self.layers, cache):
            if layer.layer_type == "attention":
                x, nc, _ = layer(x, positions=positions, cache=c, paged=(block_tables, lengths))
            else:
                sc = {"conv": c["conv"][slots], "ssm": c["ssm"][slots]}
                x, nsc, _ = layer(x, positions=positions, cache=sc, step_states=step_states)
                if step_states:
                    steps.append(nsc)
                    nsc = {"conv": nsc["conv"][:, -1], "ssm": nsc["ssm"][:, -1]}
                nc = {"conv": c["conv"].at[slots].set(nsc["conv"]), "ssm": c["ssm"].at[slots].set(nsc["ssm"])}
            new.append(nc)
        if step_states:
            return self._logits(x), new, steps
        return self._logits(x), new

    def decode_step(self, token: Array, cache: Cache) -> tuple[Array, Cache]:
        """One token per row: ``token [batch]`` -> ``(logits [batch, vocab], cache)``."""
        self._check_tokens(token, 1, "token")
        logits, cache = self.prefill(token[:, None], cache)
        return logits[:, 0], cache


def abstract_params(cfg: ModelConfig) -> tuple[HybridLM, dict[tuple, nnx.Variable]]:
    """An allocation-free ``HybridLM(cfg)`` (``nnx.eval_shape``) and its parameters keyed by path tuple.

    Loaders fill each variable with ``set_value`` and then call :func:`assemble_model`; :func:`count_params`
    reads the shapes.
    """
    abstract = nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0)))
    flat = {tuple(k): v for k, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    return abstract, flat


def assemble_model(abstract: HybridLM, flat: dict[tuple, nnx.Variable]) -> HybridLM:
    """The concrete model from :func:`abstract_params` output whose parameters have all been set."""
    graphdef, _ = nnx.split(abstract, nnx.Param)
    rest = nnx.state(abstract, nnx.Not(nnx.Param))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def count_params(cfg: ModelConfig, *, active: bool = False) -> int:
    """Number of parameters of ``HybridLM(cfg)``, from ``nnx.eval_shape`` (nothing is allocated).

    ``active=True`` counts what one token uses: of each layer's ``n_experts`` routed experts only ``top_k``
    (the router and any shared MLP count in full), the usual "active parameters" of an MoE.
    """
    total = 0
    for path, x in abstract_params(cfg)[1].items():
        n = int(math.prod(x.shape))
        if active and cfg.n_experts and "moe" in path and path[-1] in ("w_gate", "w_up", "w_down"):
            n = n * cfg.top_k // cfg.n_experts
        total += n
    return total
