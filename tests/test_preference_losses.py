"""Post-training losses (mani_jax.train.losses): sequence log-probs, DPO (Rafailov et al. 2023, eq. 7), KL estimators
and GRPO, against float64 numpy references of the formulas, with gradient-direction and limit checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mani_jax.train import (
    dpo_loss,
    group_advantages,
    grpo_loss,
    kl_estimate,
    sequence_kl,
    sequence_logprobs,
    token_logprobs,
)


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _log_sigmoid64(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def _dpo_ref(pc, pr, rc, rr, beta, eps=0.0):
    h = beta * ((pc - rc) - (pr - rr))
    return np.mean(-(1 - eps) * _log_sigmoid64(h) - eps * _log_sigmoid64(-h)), h


def test_sequence_logprobs_match_numpy():
    rng = np.random.default_rng(0)
    B, T, V = 3, 7, 11
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
    targets = rng.integers(0, V, size=(B, T))
    mask = rng.random((B, T)) < 0.6
    mask[2] = False  # an empty row gives 0
    lp = _log_softmax64(logits)
    tok_ref = np.take_along_axis(lp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_logprobs(jnp.asarray(logits), jnp.asarray(targets)), tok_ref, rtol=1e-5,
                               atol=1e-6)
    got = sequence_logprobs(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), jnp.asarray(targets),
                            jnp.asarray(mask))
    ref = (np.take_along_axis(_log_softmax64(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))),
                              targets[..., None], -1)[..., 0] * mask).sum(-1)
    assert got.dtype == jnp.float32 and got.shape == (B,) and float(got[2]) == 0.0
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mask must be"):
        sequence_logprobs(jnp.asarray(logits), jnp.asarray(targets), jnp.ones((B, T + 1)))
    with pytest.raises(ValueError, match="targets must be an integer"):
        sequence_logprobs(jnp.asarray(logits), jnp.asarray(targets, jnp.float32), jnp.asarray(mask))


def test_dpo_hand_computed_toy_value():
    # h = 0.1 * ((-1 - -1.5) - (-2 - -1.5)) = 0.1; loss = -log sigmoid(0.1) = log(1 + e^-0.1)
    loss, m = dpo_loss(jnp.array([-1.0]), jnp.array([-2.0]), jnp.array([-1.5]), jnp.array([-1.5]), beta=0.1)
    assert abs(float(loss) - 0.6443966600735709) < 1e-6
    assert abs(float(m["rewards_chosen"]) - 0.05) < 1e-7 and abs(float(m["rewards_rejected"]) + 0.05) < 1e-7
    assert abs(float(m["reward_margin"]) - 0.1) < 1e-7 and float(m["reward_accuracy"]) == 1.0


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2), (2.0, 0.1)])
def test_dpo_matches_float64_reference(beta, eps):
    rng = np.random.default_rng(1)
    pc, pr, rc, rr = (rng.normal(-30, 8, size=64) for _ in range(4))
    loss, m = dpo_loss(*(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)), beta=beta, label_smoothing=eps)
    x32 = [np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (pc, pr, rc, rr)]
    ref, h = _dpo_ref(*x32, beta, eps)
    np.testing.assert_allclose(float(loss), ref, rtol=2e-5)
    np.testing.assert_allclose(float(m["reward_margin"]), h.mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(m["rewards_chosen"]), (beta * (x32[0] - x32[2])).mean(), rtol=1e-4, atol=1e-5)
    assert float(m["reward_accuracy"]) == np.mean(h > 0)
    np.testing.assert_allclose(float(m["logps_chosen"]), x32[0].mean(), rtol=1e-6)
    # gradient of the loss against the analytic one: dL/dpc = -beta/N * ((1-eps) sigmoid(-h) - eps sigmoid(h))
    g = jax.grad(lambda a: dpo_loss(a, *(jnp.asarray(x, jnp.float32) for x in (pr, rc, rr)), beta=beta,
                                    label_smoothing=eps)[0])(jnp.asarray(pc, jnp.float32))
    sig = 1 / (1 + np.exp(-h))
    np.testing.assert_allclose(g, -beta / len(h) * ((1 - eps) * (1 - sig) - eps * sig), rtol=1e-4, atol=1e-9)


def test_dpo_gradient_directions_and_reference_is_frozen():
    args = [jnp.array([-10.0, -3.0]), jnp.array([-9.0, -4.0]), jnp.array([-10.5, -3.2]), jnp.array([-8.0, -4.1])]
    grads = jax.grad(lambda *a: dpo_loss(*a)[0], argnums=(0, 1, 2, 3))(*args)
    assert (grads[0] < 0).all()  # raising the chosen log-prob lowers the loss
    assert (grads[1] > 0).all()  # raising the rejected log-prob raises it
    assert (grads[2] == 0).all() and (grads[3] == 0).all()  # no gradient into the reference

    # end to end through sequence_logprobs: one gradient step on the policy logits raises chosen, lowers rejected
    rng = np.random.default_rng(2)
    B, T, V = 2, 6, 9
    logits = jnp.asarray(rng.normal(size=(2 * B, T, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, size=(2 * B, T)))
    mask = jnp.asarray(np.arange(T)[None].repeat(2 * B, 0) >= 2)  # response = last 4 positions
    ref = sequence_logprobs(logits, targets, mask)

    def loss_fn(lg):
        lp = sequence_logprobs(lg, targets, mask)
        return dpo_loss(lp[:B], lp[B:], ref[:B], ref[B:], beta=0.1)[0]

    g = jax.grad(loss_fn)(logits)
    assert float(jnp.abs(g[:, :2]).max()) == 0.0  # prompt positions get no gradient
    new = logits - 5.0 * g
    lp_new = sequence_logprobs(new, targets, mask)
    assert (lp_new[:B] > ref[:B]).all() and (lp_new[B:] < ref[B:]).all()
    assert float(loss_fn(new)) < float(loss_fn(logits)) and abs(float(loss_fn(logits)) - np.log(2)) < 1e-6


def test_dpo_beta_limits():
    pc, pr, rc, rr = jnp.array([-5.0, -7.0]), jnp.array([-6.0, -5.0]), jnp.array([-6.0, -6.0]), jnp.array([-6.0, -6.0])
    # margins h/beta = (1 - 0) and (-1 - 1) = +1 and -2
    small, _ = dpo_loss(pc, pr, rc, rr, beta=1e-8)
    assert abs(float(small) - np.log(2)) < 1e-7  # beta -> 0: log 2, whatever the log-probs
    big, m = dpo_loss(pc, pr, rc, rr, beta=1e4)
    # beta -> inf: -log sigmoid(beta*z) -> 0 for z > 0 and -> beta*|z| for z < 0 (no overflow, finite gradient)
    np.testing.assert_allclose(float(big), (0.0 + 1e4 * 2.0) / 2, rtol=1e-6)
    assert float(m["reward_accuracy"]) == 0.5
    g = jax.grad(lambda a: dpo_loss(a, pr, rc, rr, beta=1e4)[0])(pc)
    assert np.isfinite(np.asarray(g)).all() and float(g[0]) == 0.0 and float(g[1]) == pytest.approx(-5e3)
    # the loss decreases monotonically in beta when every margin is positive
    vals = [float(dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=b)[0]) for b in (0.01, 0.1, 1.0, 10.0)]
    assert all(x > y for x, y in zip(vals, vals[1:]))


def test_dpo_bad_input():
    v = jnp.zeros(3)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(v, v, v, v, beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(v, v, v, v, beta=float("inf"))
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(v, v, v, v, label_smoothing=0.5)
    with pytest.raises(ValueError, match="ref_rejected_logps: shape"):
        dpo_loss(v, v, v, jnp.zeros(4))
    with pytest.raises(ValueError, match="policy_chosen_logps must be a 1-D"):
        dpo_loss(jnp.zeros((3, 2)), v, v, v)
    with pytest.raises(ValueError, match="float"):
        dpo_loss(jnp.zeros(3, jnp.int32), v, v, v)


def test_kl_estimators():
    rng = np.random.default_rng(3)
    V = 6
    p = np.exp(_log_softmax64(rng.normal(size=V)))
    q = np.exp(_log_softmax64(rng.normal(size=V)))
    exact = float((p * np.log(p / q)).sum())
    x = rng.choice(V, size=(4000, 1), p=p)  # tokens sampled from the policy
    lp, lq = np.log(p)[x], np.log(q)[x]
    for est in ("k1", "k3"):  # unbiased
        mc = float(np.mean(kl_estimate(jnp.asarray(lp), jnp.asarray(lq), estimator=est)))
        assert abs(mc - exact) < 0.1 * exact + 0.02, (est, mc, exact)
    k3 = np.asarray(kl_estimate(jnp.asarray(lp), jnp.asarray(lq)))
    assert (k3 >= 0).all()
    lr = (lq - lp)[:, 0]
    np.testing.assert_allclose(k3, np.expm1(lr) - lr, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(kl_estimate(jnp.asarray(lp), jnp.asarray(lq), estimator="k2"), 0.5 * lr ** 2,
                               rtol=1e-5, atol=1e-7)
    # per-token values summed over the mask, [batch]
    lpt = jnp.asarray(rng.normal(size=(2, 5)))
    lqt = jnp.asarray(rng.normal(size=(2, 5)))
    mask = jnp.asarray([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    k1 = kl_estimate(lpt, lqt, mask, "k1")
    np.testing.assert_allclose(k1, ((np.asarray(lpt) - np.asarray(lqt)) * np.asarray(mask)).sum(-1), rtol=1e-5)
    with pytest.raises(ValueError, match="estimator"):
        kl_estimate(lpt, lqt, estimator="k4")
    with pytest.raises(ValueError, match="mask must"):
        kl_estimate(lpt, lqt, mask[:, :3])


def test_sequence_kl_exact():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(2, 4, 7)).astype(np.float32)
    b = rng.normal(size=(2, 4, 7)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], np.float32)
    la, lb = _log_softmax64(a), _log_softmax64(b)
    ref = ((np.exp(la) * (la - lb)).sum(-1) * mask).sum(-1)
    got = sequence_kl(jnp.asarray(a), jnp.asarray(b), jnp.asarray(mask))
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert float(jnp.abs(sequence_kl(jnp.asarray(a), jnp.asarray(a), jnp.asarray(mask))).max()) < 1e-6
    with pytest.raises(ValueError, match="ref_logits"):
        sequence_kl(jnp.asarray(a), jnp.asarray(b[:, :3]), jnp.asarray(mask))


def test_group_advantages():
    r = jnp.asarray([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 4.0, 6.0])
    a = np.asarray(group_advantages(r, 4)).reshape(3, 4)
    g = np.asarray(r, np.float64).reshape(3, 4)
    np.testing.assert_allclose(a.mean(1), 0, atol=1e-6)
    np.testing.assert_allclose(a[[0, 2]], ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-6))
                               [[0, 2]], rtol=1e-5)
    assert (a[1] == 0).all()  # equal rewards: no signal
    np.testing.assert_allclose(group_advantages(r, 4, normalize_std=False), (g - g.mean(1, keepdims=True)).ravel(),
                               atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(r, 5)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r, 1)


def test_grpo_on_policy_is_reinforce_with_group_baseline():
    rng = np.random.default_rng(5)
    B, T = 4, 5
    lp = jnp.asarray(rng.normal(-2, 0.5, size=(B, T)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], jnp.float32)
    adv = group_advantages(jnp.asarray([1.0, 0.0, 0.0, 1.0]), 2)

    def loss_fn(x):
        return grpo_loss(x, jax.lax.stop_gradient(x), adv, mask)[0]

    loss, m = grpo_loss(lp, lp, adv, mask)
    g = np.asarray(jax.grad(loss_fn)(lp))
    n = np.asarray(mask).sum(1, keepdims=True)
    # REINFORCE: d loss / d logp[i, t] = -A_i / (B * |o_i|) on response tokens
    np.testing.assert_allclose(g, -np.asarray(adv)[:, None] / (B * n) * np.asarray(mask), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(float(loss), -np.mean(np.asarray(adv)), atol=1e-6)
    assert float(m["clip_fraction"]) == 0.0 and abs(float(m["ratio_mean"]) - 1.0) < 1e-6
    assert (g[np.asarray(adv) > 0] <= 0).all()  # gradient descent raises log-probs of better-than-average answers


def test_grpo_clipping_and_kl_term():
    lp = jnp.asarray([[0.0, 0.0], [0.0, 0.0]])
    old = jnp.asarray([[-1.0, 0.0], [1.0, 0.0]])  # ratios e and 1/e on the first token
    adv = jnp.asarray([1.0, -1.0])
    mask = jnp.ones((2, 2))
    loss, m = grpo_loss(lp, old, adv, mask, clip_eps=0.2)
    # sequence 0: min(e*1, 1.2*1) = 1.2 and 1; sequence 1: min(-1/e, -0.8) = -0.8 and -1
    np.testing.assert_allclose(float(loss), -np.mean([(1.2 + 1) / 2, (-0.8 - 1) / 2]), rtol=1e-6)
    assert float(m["clip_fraction"]) == 0.5  # 2 of 4 tokens
    g = np.asarray(jax.grad(lambda x: grpo_loss(x, old, adv, mask, clip_eps=0.2)[0])(lp))
    assert g[0, 0] == 0.0 and g[1, 0] == 0.0 and g[0, 1] != 0.0  # clipped tokens carry no gradient
    # KL penalty: k3 against the reference, weighted by kl_coef
    ref = jnp.asarray([[-0.5, 0.3], [0.2, -0.1]])
    loss_kl, m2 = grpo_loss(lp, old, adv, mask, clip_eps=0.2, ref_logps=ref, kl_coef=0.5)
    lr = np.asarray(ref) - np.asarray(lp)
    k3 = np.expm1(lr) - lr
    np.testing.assert_allclose(float(loss_kl) - float(loss), 0.5 * np.mean(k3.mean(1)), rtol=1e-5)
    np.testing.assert_allclose(float(m2["kl"]), np.mean(k3.sum(1)), rtol=1e-5)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(lp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="clip_eps"):
        grpo_loss(lp, old, adv, mask, clip_eps=1.0)
    with pytest.raises(ValueError, match="advantages must be"):
        grpo_loss(lp, old, adv[:1], mask)
