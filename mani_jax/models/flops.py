"""Model FLOPs per token and a matmul-peak probe, for model FLOPs utilisation (MFU).

Convention (Chowdhery et al. 2022, PaLM, App. B): training FLOPs = 3 x forward FLOPs (forward + backward
at twice the forward); a matmul of ``[m, k] x [k, n]`` costs ``2 m k n``; attention costs its two
sequence matmuls ``QK^T`` and ``PV`` over the full (not causally halved) ``seq x seq`` square; elementwise
work (norms, activations, softmax) is not counted. For Mamba-2 layers the SSD chunked algorithm's matmuls
are counted as the algorithm performs them (Dao & Gu 2024, Sec. 6): per token ``2 Q g n`` (``C B^T``
within the chunk), ``2 Q h p`` (its product with ``X``), ``2 h p n`` (chunk state) and ``2 h p n``
(state to output), plus the depthwise conv ``2 conv_dim d_conv``.

Mixture-of-experts FFNs count **active** FLOPs: each token runs ``top_k`` experts of width ``d_ff_expert``
(``top_k * 3 d d_ff_expert`` multiply-adds), the router ``d * n_experts`` and any shared MLP ``3 d d_ff``;
the dispatch itself (sorting, gathers, one-hot einsums of the capacity path) and capacity padding are
not model FLOPs and are not counted (they show up as lower MFU / tokens per second instead).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from mani_jax.models.config import ModelConfig


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token by component (``"dense"``, ``"attention"``, ``"ssd"``, ``"lm_head"``, ``"total"``).

    Args:
      cfg: the model.
      seq_len: training sequence length ``T`` (attention and SSD costs depend on it).
    """
    d = cfg.d_model
    if cfg.n_experts:
        mlp = cfg.top_k * 3 * d * cfg.d_ff_expert + d * cfg.n_experts + (3 * d * cfg.d_ff if cfg.shared_mlp else 0)
    else:
        mlp = 3 * d * cfg.d_ff
    attn_proj = d * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mamba_proj = d * (2 * cfg.d_inner + 2 * cfg.n_groups * cfg.d_state + cfg.mamba_n_heads) + cfg.d_inner * d
    dense = 2 * (cfg.n_layers * mlp + cfg.n_attention_layers * attn_proj + cfg.n_mamba_layers * mamba_proj)
    attention = cfg.n_attention_layers * 4 * seq_len * cfg.n_heads * cfg.head_dim
    q = min(cfg.chunk_size, seq_len)
    h, p, n, g = cfg.mamba_n_heads, cfg.mamba_head_dim, cfg.d_state, cfg.n_groups
    ssd = cfg.n_mamba_layers * (2 * q * g * n + 2 * q * h * p + 4 * h * p * n + 2 * cfg.conv_dim * cfg.d_conv)
    lm_head = 2 * d * cfg.vocab_size
    return {"dense": float(dense), "attention": float(attention), "ssd": float(ssd), "lm_head": float(lm_head),
            "total": float(dense + attention + ssd + lm_head)}


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: ``3 x`` :func:`forward_flops_per_token` total."""
    return 3.0 * forward_flops_per_token(cfg, seq_len)["total"]


def measure_matmul_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """Best achieved FLOP/s of a jitted ``[n, n] x [n, n]`` ``jnp.dot`` on the default device.

    This is the denominator of MFU on machines with no published peak (a CPU): what a large, well-shaped
    matmul actually reaches here, now. Returns FLOP/s (float).
    """
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (n, n), dtype)
    b = jax.random.normal(key_b, (n, n), dtype)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best
