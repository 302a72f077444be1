"""Training losses.

``lm_loss`` is the next-token cross entropy used for pretraining and (with a prompt-masking
``loss_mask``) for supervised fine-tuning.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["lm_loss"]


def lm_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Token-weighted mean next-token cross entropy, in nats.

    ``loss = sum_{b,t} mask[b,t] * (-log softmax(logits[b,t])[targets[b,t]]) / sum_{b,t} mask[b,t]``

    The log-softmax is computed in float32 whatever the dtype of ``logits`` (bfloat16 logits are upcast
    first), so the loss does not lose precision under mixed-precision training.

    Args:
      logits: float array ``[batch, seq, vocab]`` (any float dtype), the model's unnormalised scores.
      targets: int array ``[batch, seq]``, the token ids to predict; values at positions where
        ``loss_mask == 0`` are ignored (they may be any integer, e.g. padding id), elsewhere they must lie
        in ``[0, vocab)`` (not checked inside ``jit``).
      loss_mask: float or bool array ``[batch, seq]``, 1 where the target counts, 0 elsewhere
        (fractional weights are allowed and act as per-token weights).

    Returns:
      ``(mean_loss, n_tokens)``: float32 scalars; ``n_tokens = sum(loss_mask)``. When ``n_tokens == 0``
      the loss is exactly 0 and its gradient is 0 (no NaN).

    Raises:
      ValueError: ``logits`` is not 3-D, or ``targets`` / ``loss_mask`` are not ``[batch, seq]`` matching
        ``logits``, or ``targets`` is not an integer array.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be [batch, seq, vocab], got shape {logits.shape}")
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"targets must be [batch, seq] = {logits.shape[:2]}, got shape {targets.shape}")
    if loss_mask.shape != logits.shape[:2]:
        raise ValueError(f"loss_mask must be [batch, seq] = {logits.shape[:2]}, got shape {loss_mask.shape}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be an integer array, got dtype {targets.dtype}")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    safe_targets = jnp.clip(targets, 0, logits.shape[-1] - 1).astype(jnp.int32)
    nll = -jnp.take_along_axis(logp, safe_targets[..., None], axis=-1)[..., 0]
    mask = loss_mask.astype(jnp.float32)
    n_tokens = jnp.sum(mask)
    total = jnp.sum(nll * mask)
    # Divide by a denominator that is never 0, so neither the value nor the gradient can be NaN.
    loss = total / jnp.where(n_tokens > 0, n_tokens, 1.0)
    return loss, n_tokens
