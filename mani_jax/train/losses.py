"""Training losses.

``lm_loss`` is the next-token cross entropy used for pretraining and, with a ``loss_mask`` that marks only the
assistant tokens (``mani_jax.data.make_train_dataset(..., target_masks=...)``), for supervised fine-tuning: the
mean over assistant tokens only.

Preference and reinforcement objectives work on per-sequence log-probabilities:

- :func:`token_logprobs` / :func:`sequence_logprobs`: ``log pi(y_t | y_<t, x)`` of given tokens, and their sum
  over a mask (the response tokens);
- :func:`dpo_loss`: Direct Preference Optimization (Rafailov et al. 2023, eq. 7) with its implicit rewards;
- :func:`kl_estimate` (sampled tokens, Schulman's k1/k2/k3) and :func:`sequence_kl` (exact, from full logits):
  KL of the policy to the reference;
- :func:`group_advantages` and :func:`grpo_loss`: GRPO (Shao et al. 2024, eq. 3) / REINFORCE with a group
  baseline.

All of them compute in float32 whatever the input dtype.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

__all__ = [
    "lm_loss",
    "token_logprobs",
    "sequence_logprobs",
    "dpo_loss",
    "kl_estimate",
    "sequence_kl",
    "group_advantages",
    "grpo_loss",
]


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


# ----------------------------------------------------------------------------------------- log-probabilities
def _check_logits_targets(logits, targets, mask=None):
    if logits.ndim != 3:
        raise ValueError(f"logits must be [batch, seq, vocab], got shape {logits.shape}")
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"targets must be [batch, seq] = {logits.shape[:2]}, got shape {targets.shape}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be an integer array, got dtype {targets.dtype}")
    if mask is not None and mask.shape != logits.shape[:2]:
        raise ValueError(f"mask must be [batch, seq] = {logits.shape[:2]}, got shape {mask.shape}")


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``log softmax(logits[b, t])[targets[b, t]]``: the log-probability of each target token, in nats.

    Args:
      logits: float ``[batch, seq, vocab]`` (any float dtype; the log-softmax is taken in float32).
      targets: int ``[batch, seq]``; out-of-range ids are clipped (mask such positions out).

    Returns:
      float32 ``[batch, seq]``.

    Raises:
      ValueError: wrong ranks or shapes, or non-integer ``targets``.
    """
    _check_logits_targets(logits, targets)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    safe = jnp.clip(targets, 0, logits.shape[-1] - 1).astype(jnp.int32)
    return jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]


def sequence_logprobs(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """``log pi(y | x) = sum_t mask[b, t] * log softmax(logits[b, t])[targets[b, t]]``, one value per row.

    Each row holds one sequence (prompt and response, padded); ``mask`` selects the response tokens whose
    probability counts (the shifted assistant mask of a chat, see :func:`mani_jax.chat.encode_chat`).

    Args:
      logits: float ``[batch, seq, vocab]``.
      targets: int ``[batch, seq]`` (next tokens).
      mask: float or bool ``[batch, seq]``.

    Returns:
      float32 ``[batch]`` (0 for a row with an empty mask).

    Raises:
      ValueError: wrong ranks or shapes, or non-integer ``targets``.
    """
    _check_logits_targets(logits, targets, mask)
    return jnp.sum(token_logprobs(logits, targets) * mask.astype(jnp.float32), axis=-1)


# ------------------------------------------------------------------------------------------------------ DPO
def _check_number(value, name: str, lo: float, hi: float, lo_open: bool, hi_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected a real number, got {type(value).__name__}")
    v = float(value)
    ok_lo = v > lo if lo_open else v >= lo
    ok_hi = v < hi if hi_open else v <= hi
    if not (ok_lo and ok_hi):
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, "
                         f"got {value!r}")
    return v


def _as_f32_vectors(names_values) -> list[jax.Array]:
    arrays = [jnp.asarray(v) for _, v in names_values]
    shape = arrays[0].shape
    for (name, _), a in zip(names_values, arrays):
        if a.ndim != 1:
            raise ValueError(f"{name} must be a 1-D [batch] array of sequence log-probabilities, got shape {a.shape}")
        if a.shape != shape:
            raise ValueError(f"{name}: shape {a.shape} differs from {names_values[0][0]}'s {shape}")
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{name} must be a float array, got dtype {a.dtype}")
    return [a.astype(jnp.float32) for a in arrays]


def dpo_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array, ref_chosen_logps: jax.Array,
             ref_rejected_logps: jax.Array, beta: float = 0.1, label_smoothing: float = 0.0
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Direct Preference Optimization loss (Rafailov et al. 2023, "Direct Preference Optimization: Your Language
    Model is Secretly a Reward Model", eq. 7), mean over pairs::

        h = beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)))
        loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)

    ``eps = label_smoothing`` is the conservative DPO of Mitchell (2023) as in TRL's ``DPOTrainer``; 0 gives
    eq. 7. ``beta * (log pi - log ref)`` is the implicit reward of a response (eq. 5 up to ``beta log Z(x)``).
    ``log sigmoid`` is evaluated stably (``jax.nn.log_sigmoid``), so large ``|h|`` neither overflows nor
    loses the gradient.

    Args:
      policy_chosen_logps, policy_rejected_logps: float ``[batch]``: ``log pi_theta(y | x)`` of the preferred and
        dispreferred responses (e.g. :func:`sequence_logprobs`), differentiable.
      ref_chosen_logps, ref_rejected_logps: float ``[batch]``: the same under the frozen reference model
        (treated as constants: ``stop_gradient`` is applied).
      beta: inverse temperature ``> 0`` of the implicit reward (the paper's beta; 0.1 in its experiments).
      label_smoothing: assumed probability ``eps`` in ``[0, 0.5)`` that a preference label is flipped.

    Returns:
      ``(loss, metrics)``: float32 scalar, and float32 scalars ``rewards_chosen`` / ``rewards_rejected`` (mean
      implicit rewards), ``reward_margin`` (mean chosen minus rejected reward), ``reward_accuracy`` (fraction of
      pairs whose chosen reward is strictly larger), ``logps_chosen`` / ``logps_rejected`` (mean policy
      log-probabilities).

    Raises:
      ValueError: the four inputs are not float ``[batch]`` arrays of one shape, ``beta <= 0`` or not finite, or
        ``label_smoothing`` outside ``[0, 0.5)``.
    """
    beta = _check_number(beta, "beta", 0.0, float("inf"), True, True)
    eps = _check_number(label_smoothing, "label_smoothing", 0.0, 0.5, False, True)
    pc, pr, rc, rr = _as_f32_vectors([("policy_chosen_logps", policy_chosen_logps),
                                      ("policy_rejected_logps", policy_rejected_logps),
                                      ("ref_chosen_logps", ref_chosen_logps),
                                      ("ref_rejected_logps", ref_rejected_logps)])
    rc, rr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
    chosen_rewards = beta * (pc - rc)
    rejected_rewards = beta * (pr - rr)
    h = chosen_rewards - rejected_rewards
    losses = -(1.0 - eps) * jax.nn.log_sigmoid(h) - eps * jax.nn.log_sigmoid(-h)
    metrics = {
        "rewards_chosen": jnp.mean(jax.lax.stop_gradient(chosen_rewards)),
        "rewards_rejected": jnp.mean(jax.lax.stop_gradient(rejected_rewards)),
        "reward_margin": jnp.mean(jax.lax.stop_gradient(h)),
        "reward_accuracy": jnp.mean((jax.lax.stop_gradient(h) > 0).astype(jnp.float32)),
        "logps_chosen": jnp.mean(jax.lax.stop_gradient(pc)),
        "logps_rejected": jnp.mean(jax.lax.stop_gradient(pr)),
    }
    return jnp.mean(losses), metrics


# ------------------------------------------------------------------------------------------------------- KL
_KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(policy_logps: jax.Array, ref_logps: jax.Array, mask: jax.Array | None = None,
                estimator: str = "k3") -> jax.Array:
    """Monte-Carlo estimate of ``KL(pi || ref)`` per sequence from tokens **sampled from the policy**.

    With ``log_r = ref_logps - policy_logps`` per sampled token (Schulman 2020, "Approximating KL Divergence",
    http://joschu.net/blog/kl-approx.html): ``k1 = -log_r`` (unbiased, can be negative), ``k2 = log_r**2 / 2``
    (biased, low variance), ``k3 = exp(log_r) - 1 - log_r`` (unbiased and >= 0; GRPO's KL term, Shao et al.
    2024 eq. 4). The per-token values are summed over ``mask``: by the chain rule the expected sum over a
    sampled response is the sequence-level ``KL(pi(.|x) || ref(.|x))``.

    Args:
      policy_logps, ref_logps: float ``[batch, seq]`` (per-token, e.g. :func:`token_logprobs`) or ``[batch]``
        (whole sequences; then ``k1`` is the only exact choice).
      mask: float/bool of the same shape (response tokens), or ``None`` for all ones.
      estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
      float32 ``[batch]`` (the mean over the batch estimates the KL).

    Raises:
      ValueError: unknown ``estimator``, mismatched shapes, or inputs that are not 1-D or 2-D.
    """
    if estimator not in _KL_ESTIMATORS:
        raise ValueError(f"estimator: expected one of {_KL_ESTIMATORS}, got {estimator!r}")
    p, r = jnp.asarray(policy_logps), jnp.asarray(ref_logps)
    if p.ndim not in (1, 2):
        raise ValueError(f"policy_logps must be [batch, seq] or [batch], got shape {p.shape}")
    if r.shape != p.shape:
        raise ValueError(f"ref_logps must have policy_logps' shape {p.shape}, got {r.shape}")
    m = jnp.ones(p.shape, jnp.float32) if mask is None else jnp.asarray(mask).astype(jnp.float32)
    if m.shape != p.shape:
        raise ValueError(f"mask must have policy_logps' shape {p.shape}, got {m.shape}")
    log_r = r.astype(jnp.float32) - p.astype(jnp.float32)
    if estimator == "k1":
        k = -log_r
    elif estimator == "k2":
        k = 0.5 * jnp.square(log_r)
    else:
        k = jnp.expm1(log_r) - log_r
    k = k * m
    return k if p.ndim == 1 else jnp.sum(k, axis=-1)


def sequence_kl(policy_logits: jax.Array, ref_logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Exact per-position KL between the next-token distributions, summed over ``mask``::

        sum_t mask[b, t] * sum_v pi(v | y_<t) * (log pi(v | y_<t) - log ref(v | y_<t))

    On a response sampled from the policy its expectation is the sequence-level ``KL(pi || ref)``, with less
    variance than :func:`kl_estimate` (the inner sum over the vocabulary is exact).

    Args:
      policy_logits, ref_logits: float ``[batch, seq, vocab]``.
      mask: float/bool ``[batch, seq]``.

    Returns:
      float32 ``[batch]``, >= 0 up to rounding.

    Raises:
      ValueError: mismatched shapes.
    """
    if policy_logits.ndim != 3 or ref_logits.shape != policy_logits.shape:
        raise ValueError(f"policy_logits and ref_logits must both be [batch, seq, vocab]; got "
                         f"{policy_logits.shape} and {ref_logits.shape}")
    if mask.shape != policy_logits.shape[:2]:
        raise ValueError(f"mask must be [batch, seq] = {policy_logits.shape[:2]}, got shape {mask.shape}")
    lp = jax.nn.log_softmax(policy_logits.astype(jnp.float32), axis=-1)
    lq = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)
    return jnp.sum(kl * mask.astype(jnp.float32), axis=-1)


# ----------------------------------------------------------------------------------------------- GRPO
def group_advantages(rewards: jax.Array, group_size: int, *, normalize_std: bool = True,
                     eps: float = 1e-6) -> jax.Array:
    """Group-relative advantages (GRPO outcome supervision, Shao et al. 2024, "DeepSeekMath", sec. 4.1.2)::

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)

    ``rewards`` holds ``n_groups`` consecutive groups of ``group_size`` samples for the same prompt. ``std`` is
    the unbiased (``ddof=1``) standard deviation, as TRL's ``GRPOTrainer``; ``normalize_std=False`` keeps only
    the mean baseline (Dr. GRPO, Liu et al. 2025). A group whose rewards are all equal gets advantages 0.

    Args:
      rewards: float ``[n_groups * group_size]``.
      group_size: samples per prompt, >= 2.

    Returns:
      float32 ``[n_groups * group_size]``.

    Raises:
      ValueError: ``rewards`` not 1-D or its length not a multiple of ``group_size``; ``group_size < 2``.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
    r = jnp.asarray(rewards)
    if r.ndim != 1 or r.shape[0] % group_size:
        raise ValueError(f"rewards must be 1-D with a length divisible by group_size={group_size}, got shape "
                         f"{r.shape}")
    g = r.astype(jnp.float32).reshape(-1, group_size)
    a = g - jnp.mean(g, axis=1, keepdims=True)
    if normalize_std:
        a = a / (jnp.std(g, axis=1, ddof=1, keepdims=True) + eps)
    return a.reshape(-1)


def grpo_loss(logps: jax.Array, old_logps: jax.Array, advantages: jax.Array, mask: jax.Array, *,
              clip_eps: float = 0.2, ref_logps: jax.Array | None = None, kl_coef: float = 0.0
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO's clipped surrogate (Shao et al. 2024, eq. 3), negated for minimisation::

        ratio_t = exp(logps_t - old_logps_t)
        J_i = 1/|o_i| * sum_t [min(ratio_t * A_i, clip(ratio_t, 1 - c, 1 + c) * A_i) - kl_coef * k3_t]
        loss = -mean_i J_i

    where ``k3_t`` is :func:`kl_estimate`'s ``k3`` term against the reference model. With one update per batch of
    samples, ``old_logps = stop_gradient(logps)``: the ratio is 1, nothing is clipped, and the gradient is
    REINFORCE with the group baseline, ``-mean_i A_i/|o_i| sum_t grad log pi(o_i,t)``.

    Args:
      logps: float ``[batch, seq]``: per-token log-probabilities of the sampled responses under the current
        policy (differentiable).
      old_logps: float ``[batch, seq]``: the same under the policy that sampled them (constant).
      advantages: float ``[batch]``, e.g. :func:`group_advantages` of the answer checker's rewards.
      mask: float/bool ``[batch, seq]``: the response tokens.
      clip_eps: ``c`` in ``[0, 1)``.
      ref_logps: float ``[batch, seq]`` under the frozen reference, needed when ``kl_coef > 0``.
      kl_coef: the paper's beta, >= 0.

    Returns:
      ``(loss, metrics)``: float32 scalar; metrics ``clip_fraction`` (share of response tokens whose ratio was
      clipped in the objective), ``ratio_mean``, ``kl`` (mean per-sequence sum of ``k3``; 0 without
      ``ref_logps``), ``advantage_mean``, ``response_tokens`` (mean per sequence).

    Raises:
      ValueError: mismatched shapes, ``clip_eps`` outside ``[0, 1)``, ``kl_coef < 0``, or ``kl_coef > 0``
        without ``ref_logps``.
    """
    c = _check_number(clip_eps, "clip_eps", 0.0, 1.0, False, True)
    beta = _check_number(kl_coef, "kl_coef", 0.0, float("inf"), False, True)
    lp, old = jnp.asarray(logps), jnp.asarray(old_logps)
    if lp.ndim != 2:
        raise ValueError(f"logps must be [batch, seq], got shape {lp.shape}")
    if old.shape != lp.shape:
        raise ValueError(f"old_logps must have logps' shape {lp.shape}, got {old.shape}")
    m = jnp.asarray(mask).astype(jnp.float32)
    if m.shape != lp.shape:
        raise ValueError(f"mask must have logps' shape {lp.shape}, got {m.shape}")
    adv = jnp.asarray(advantages)
    if adv.shape != lp.shape[:1]:
        raise ValueError(f"advantages must be [batch] = {lp.shape[:1]}, got shape {adv.shape}")
    if beta > 0 and ref_logps is None:
        raise ValueError("ref_logps: required when kl_coef > 0")
    lp = lp.astype(jnp.float32)
    old = jax.lax.stop_gradient(old.astype(jnp.float32))
    adv = jax.lax.stop_gradient(adv.astype(jnp.float32))[:, None]
    ratio = jnp.exp(lp - old)
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - c, 1.0 + c) * adv
    per_token = jnp.minimum(unclipped, clipped)
    kl_tok = jnp.zeros_like(lp)
    if ref_logps is not None:
        ref = jnp.asarray(ref_logps)
        if ref.shape != lp.shape:
            raise ValueError(f"ref_logps must have logps' shape {lp.shape}, got {ref.shape}")
        log_r = jax.lax.stop_gradient(ref.astype(jnp.float32)) - lp
        kl_tok = jnp.expm1(log_r) - log_r
    n = jnp.sum(m, axis=-1)
    denom = jnp.where(n > 0, n, 1.0)
    j = jnp.sum((per_token - beta * kl_tok) * m, axis=-1) / denom
    was_clipped = (clipped < unclipped) & (m > 0)
    total = jnp.maximum(jnp.sum(m), 1.0)
    metrics = {
        "clip_fraction": jnp.sum(was_clipped.astype(jnp.float32)) / total,
        "ratio_mean": jnp.sum(jax.lax.stop_gradient(ratio) * m) / total,
        "kl": jnp.mean(jnp.sum(jax.lax.stop_gradient(kl_tok) * m, axis=-1)),
        "advantage_mean": jnp.mean(adv),
        "response_tokens": jnp.mean(n),
    }
    return -jnp.mean(j), metrics
