"""Tests for mani_jax.train: optimizer mask/schedule, LM loss, checkpoints, the train loop and exact resume.

A tiny stand-in NNX model with the real LM call signature (``model(tokens, segment_ids=, positions=)``)
is used; the real HybridLM plugs into the same code.
"""

from __future__ import annotations

import json
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mani_jax.config import apply_overrides
from mani_jax.train import (
    Checkpointer, OptimConfig, TrainConfig, checkpoint_steps, count_params, decay_mask, evaluate, lm_loss, make_optimizer,
    make_schedule, read_metrics, restore_checkpoint, train,
)

VOCAB, B, L, D = 32, 4, 16, 24


class TinyLM(nnx.Module):
    """Embed -> (x * norm.scale) -> mixer Linear(with bias) scaled by exp(A_log) + D -> head."""

    def __init__(self, rngs: nnx.Rngs, vocab: int = VOCAB, d: int = D):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.norm = nnx.RMSNorm(d, rngs=rngs)
        self.mixer = nnx.Linear(d, d, use_bias=True, rngs=rngs)
        self.A_log = nnx.Param(jnp.zeros((d,)))
        self.D = nnx.Param(jnp.ones((d,)))
        self.head = nnx.Linear(d, vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens, *, segment_ids=None, positions=None):
        x = self.embed(tokens)
        h = self.norm(x)
        # a causal "mixer": cumulative mean over previous positions, so context matters
        csum = jnp.cumsum(h, axis=1) / jnp.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        y = self.mixer(csum) * jnp.exp(self.A_log) + h * self.D
        logits = self.head(jax.nn.gelu(y))
        return logits.astype(jnp.float32)


def make_rows(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Synthetic token rows with learnable structure (x[t+1] = (x[t] * 3 + 1) % VOCAB, random starts)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        seq = np.empty(L + 1, np.int32)
        seq[0] = rng.integers(0, VOCAB)
        for t in range(L):
            seq[t + 1] = (seq[t] * 3 + 1) % VOCAB
        noise = rng.random(L + 1) < 0.1
        seq[noise] = rng.integers(0, VOCAB, noise.sum())
        rows.append({
            "tokens": seq[:-1].copy(), "targets": seq[1:].copy(),
            "segment_ids": np.ones(L, np.int32), "positions": np.arange(L, dtype=np.int32),
            "loss_mask": np.ones(L, np.float32),
        })
    return rows


def make_iter(seed: int = 0, n_rows: int = 64):
    ds = grain.MapDataset.source(make_rows(n_rows)).shuffle(seed=seed).repeat(None).batch(B)
    return iter(ds.to_iter_dataset())


def small_config(**kw) -> TrainConfig:
    base = dict(steps=8, batch_size=B, seq_len=L, log_every=2, learning_rate=1e-2, warmup_steps=2,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------ optimizer


def test_decay_mask_excludes_norm_bias_ssm_and_vectors():
    model = TinyLM(nnx.Rngs(0))
    mask = nnx.to_pure_dict(decay_mask(nnx.state(model, nnx.Param)))
    assert mask["embed"]["embedding"] is True
    assert mask["mixer"]["kernel"] is True
    assert mask["head"]["kernel"] is True
    assert mask["mixer"]["bias"] is False
    assert mask["norm"]["scale"] is False
    assert mask["A_log"] is False and mask["D"] is False
    # name rules apply even to matrices; 1-D rule applies whatever the name
    fake = {"final_norm": {"w": jnp.ones((3, 3))}, "dt_bias": jnp.ones((3, 3)), "bias": jnp.ones((2, 2)),
            "D": jnp.ones((2, 2)), "proj": {"w": jnp.ones((3, 3)), "vec": jnp.ones((3,))}}
    m = decay_mask(fake)
    assert m == {"final_norm": {"w": False}, "dt_bias": False, "bias": False, "D": False,
                 "proj": {"w": True, "vec": False}}


def test_weight_decay_applied_only_where_masked():
    """With zero gradients, AdamW only decays: masked params shrink, unmasked ones stay put."""
    model = TinyLM(nnx.Rngs(0))
    model.norm.scale[...] = jnp.full((D,), 2.0)
    model.mixer.bias[...] = jnp.full((D,), 2.0)
    cfg = OptimConfig(learning_rate=0.1, warmup_steps=0, total_steps=10, weight_decay=0.5, grad_clip_norm=0)
    opt = make_optimizer(cfg, model)
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    opt.update(model, grads)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    np.testing.assert_allclose(after["mixer"]["kernel"], before["mixer"]["kernel"] * (1 - 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_allclose(after["embed"]["embedding"], before["embed"]["embedding"] * 0.95, rtol=1e-6)
    for path in (("norm", "scale"), ("mixer", "bias")):
        np.testing.assert_array_equal(after[path[0]][path[1]], before[path[0]][path[1]])
    np.testing.assert_array_equal(after["A_log"], before["A_log"])
    np.testing.assert_array_equal(after["D"], before["D"])


def test_schedule_warmup_cosine_floor():
    cfg = OptimConfig(learning_rate=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    lr = make_schedule(cfg)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)
    assert float(lr(110)) == pytest.approx(0.1)
    assert float(lr(500)) == pytest.approx(0.1)


def test_optim_config_validation_names_field():
    with pytest.raises(ValueError, match="total_steps"):
        OptimConfig(warmup_steps=100, total_steps=50)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        OptimConfig(min_lr_ratio=2.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(steps=10, warmup_steps=100)
    with pytest.raises(ValueError, match="compute_dtype"):
        TrainConfig(compute_dtype="float16")


def test_train_config_overrides():
    cfg = apply_overrides(TrainConfig(), ["steps=50", "learning_rate=1e-3", "compute_dtype=bfloat16",
                                          "lr_decay_steps=none", "warmup_steps=5"])
    assert cfg.steps == 50 and cfg.learning_rate == 1e-3 and cfg.compute_dtype == "bfloat16"
    assert cfg.optim_config().total_steps == 50
    with pytest.raises(ValueError, match="compute_dtype"):
        apply_overrides(TrainConfig(), ["compute_dtype=fp8"])


# ------------------------------------------------------------------ loss


def test_lm_loss_matches_optax_and_is_token_weighted():
    k1, k2 = jax.random.split(jax.random.key(0))
    logits = jax.random.normal(k1, (2, 5, 7)) * 3
    targets = jax.random.randint(k2, (2, 5), 0, 7)
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], jnp.float32)
    loss, n = lm_loss(logits, targets, mask)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    assert float(n) == 4.0
    np.testing.assert_allclose(float(loss), float((ce * mask).sum() / 4), rtol=1e-6)
    # bf16 logits: computed in f32 after the cast, so it equals the f32 loss of the rounded logits
    lb = logits.astype(jnp.bfloat16)
    loss_b, _ = lm_loss(lb, targets, mask)
    assert loss_b.dtype == jnp.float32
    ref_b = optax.softmax_cross_entropy_with_integer_labels(lb.astype(jnp.float32), targets)
    np.testing.assert_allclose(float(loss_b), float((ref_b * mask).sum() / 4), rtol=1e-6)


def test_lm_loss_empty_mask_is_zero_without_nan():
    logits = jnp.ones((1, 3, 5))
    targets = jnp.array([[0, -1, 99]])  # garbage targets under a zero mask are fine
    mask = jnp.zeros((1, 3))
    loss, n = lm_loss(logits, targets, mask)
    assert float(loss) == 0.0 and float(n) == 0.0
    g = jax.grad(lambda x: lm_loss(x, targets, mask)[0])(logits)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) == 0.0


def test_lm_loss_shape_errors():
    with pytest.raises(ValueError, match="targets"):
        lm_loss(jnp.ones((2, 3, 5)), jnp.ones((2, 4), jnp.int32), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="loss_mask"):
        lm_loss(jnp.ones((2, 3, 5)), jnp.ones((2, 3), jnp.int32), jnp.ones((2,)))
    with pytest.raises(ValueError, match="logits"):
        lm_loss(jnp.ones((2, 3)), jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3)))


# ------------------------------------------------------------------ metrics helpers


def test_count_params_concrete_and_abstract():
    model = TinyLM(nnx.Rngs(0))
    expected = VOCAB * D + D + (D * D + D) + D + D + D * VOCAB
    assert count_params(model) == expected
    abstract = nnx.eval_shape(lambda: TinyLM(nnx.Rngs(0)))
    assert count_params(abstract) == expected


# ------------------------------------------------------------------ training loop


def test_train_learns_logs_and_plots(tmp_path):
    cfg = small_config(steps=30, log_every=5, eval_every=10, learning_rate=3e-2)
    model = TinyLM(nnx.Rngs(0))
    val = [dict(r) for r in _stack(make_rows(8, seed=123))]
    before = evaluate(model, val)
    summary = train(model, cfg, make_iter(), out_dir=tmp_path, eval_fn=lambda m: evaluate(m, val))
    assert summary["final_step"] == 30 and summary["steps_run"] == 30
    assert summary["train_tokens"] == 30 * B * L
    assert summary["tokens_per_second"] > 0
    assert summary["final_eval_loss"] < before - 0.5, (before, summary["final_eval_loss"])
    # the trained model object holds the trained arrays
    assert evaluate(model, val) == pytest.approx(summary["final_eval_loss"], rel=1e-6)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [5, 10, 15, 20, 25, 30]
    for r in recs:
        assert {"step", "loss", "lr", "grad_norm", "tokens_seen", "tokens_per_second"} <= set(r)
    assert [r["step"] for r in recs if "eval_loss" in r] == [10, 20, 30]
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    assert len(summary["losses"]) == 30


def _stack(rows, bs=B):
    out = []
    for i in range(0, len(rows), bs):
        chunk = rows[i:i + bs]
        out.append({k: np.stack([r[k] for r in chunk]) for k in chunk[0]})
    return out


def test_train_deterministic_same_seed(tmp_path):
    cfg = small_config(steps=6)
    a = train(TinyLM(nnx.Rngs(cfg.seed)), cfg, make_iter(cfg.seed), out_dir=tmp_path / "a")
    b = train(TinyLM(nnx.Rngs(cfg.seed)), cfg, make_iter(cfg.seed), out_dir=tmp_path / "b")
    assert a["losses"] == b["losses"]


def test_bf16_compute_keeps_f32_master_weights(tmp_path):
    cfg = small_config(steps=4, compute_dtype="bfloat16")
    model = TinyLM(nnx.Rngs(0))
    f32 = train(TinyLM(nnx.Rngs(0)), small_config(steps=4), make_iter(), out_dir=tmp_path / "f32")
    summary = train(model, cfg, make_iter(), out_dir=tmp_path / "bf16", optimizer=None)
    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
        assert leaf.dtype == jnp.float32
    assert all(np.isfinite(l) for _, l in summary["losses"])
    # bf16 rounding changes the numbers a little, not a lot
    np.testing.assert_allclose([l for _, l in summary["losses"]], [l for _, l in f32["losses"]], rtol=2e-2)
    assert [l for _, l in summary["losses"]] != [l for _, l in f32["losses"]]


def test_data_running_out_stops_with_warning_and_final_checkpoint(tmp_path):
    it = iter(grain.MapDataset.source(make_rows(12)).batch(B).to_iter_dataset())  # 3 batches, no repeat
    cfg = small_config(steps=10, checkpoint_every=100, log_every=2)
    with pytest.warns(UserWarning, match="ran out after step 3"):
        s = train(TinyLM(nnx.Rngs(0)), cfg, it, out_dir=tmp_path, eval_fn=lambda m: 1.0)
    assert s["final_step"] == 3 and s["final_eval_loss"] == 1.0
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [3]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [2, 3]
    with pytest.raises(TypeError, match="iterator"):
        train(TinyLM(nnx.Rngs(0)), cfg, make_rows(4), out_dir=tmp_path / "x")


def test_bad_batch_shape_is_named(tmp_path):
    cfg = small_config(seq_len=L + 1)
    with pytest.raises(ValueError, match=r"seq_len"):
        train(TinyLM(nnx.Rngs(0)), cfg, make_iter(), out_dir=tmp_path)
    bad = iter([{"tokens": np.zeros((B, L), np.int32)}])
    with pytest.raises(ValueError, match="missing keys"):
        train(TinyLM(nnx.Rngs(0)), small_config(), bad, out_dir=tmp_path / "b")


class CrashAfter:
    """Wraps an iterator (delegating get_state/set_state) and raises on the (n+1)-th ``next``."""

    def __init__(self, it, n):
        self.it, self.n = it, n

    def __iter__(self):
        return self

    def __next__(self):
        if self.n == 0:
            raise RuntimeError("simulated crash")
        self.n -= 1
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, s):
        self.it.set_state(s)


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path):
    n, k = 10, 4
    cfg = small_config(steps=n, checkpoint_every=k, log_every=1)
    full = train(TinyLM(nnx.Rngs(0)), cfg, make_iter(), out_dir=tmp_path / "full")
    assert [s for s, _ in full["losses"]] == list(range(1, n + 1))

    # interrupted run: crashes while drawing the batch for step k + 3 (after the step-k checkpoint)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(TinyLM(nnx.Rngs(0)), cfg, CrashAfter(make_iter(), k + 2), out_dir=tmp_path / "run")
    assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == [k]
    # "new process": a differently initialised model and a fresh iterator; all of it comes from disk
    resumed = train(TinyLM(nnx.Rngs(99)), cfg, make_iter(), out_dir=tmp_path / "run", resume=True)
    assert resumed["start_step"] == k and resumed["final_step"] == n
    assert resumed["losses"] == full["losses"][k:]  # bit-exact
    assert resumed["train_tokens"] == full["train_tokens"]
    steps_logged = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert steps_logged == list(range(1, n + 1))  # no duplicates from the crashed tail


class DropoutLM(TinyLM):
    """TinyLM with dropout: its RNG key/count live in the model state and must be checkpointed too."""

    def __init__(self, rngs: nnx.Rngs):
        super().__init__(rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)

    def __call__(self, tokens, *, segment_ids=None, positions=None):
        return self.head(self.norm(self.drop(self.embed(tokens)))).astype(jnp.float32)


def test_resume_exact_with_dropout_rng_and_bf16(tmp_path):
    n, k = 5, 2
    cfg = small_config(steps=n, checkpoint_every=k, log_every=1, compute_dtype="bfloat16", warmup_steps=1)
    model = DropoutLM(nnx.Rngs(0))
    full = train(model, cfg, make_iter(), out_dir=tmp_path / "full")
    assert int(nnx.state(model, nnx.RngCount)["drop"]["rngs"]["count"][...]) > 0  # RNG advanced in the step
    with pytest.raises(RuntimeError):
        train(DropoutLM(nnx.Rngs(0)), cfg, CrashAfter(make_iter(), k + 1), out_dir=tmp_path / "run")
    resumed = train(DropoutLM(nnx.Rngs(3)), cfg, make_iter(), out_dir=tmp_path / "run", resume=True)
    assert resumed["losses"] == full["losses"][k:]


def test_evaluate_rejects_empty(tmp_path):
    with pytest.raises(ValueError, match="no target tokens"):
        evaluate(TinyLM(nnx.Rngs(0)), [])


def test_fresh_run_refuses_dir_with_checkpoints(tmp_path):
    cfg = small_config(steps=2, checkpoint_every=2, warmup_steps=1)
    train(TinyLM(nnx.Rngs(0)), cfg, make_iter(), out_dir=tmp_path)
    with pytest.raises(ValueError, match="resume=True"):
        train(TinyLM(nnx.Rngs(0)), cfg, make_iter(), out_dir=tmp_path)
    # resume when already finished: nothing to do, returns immediately at the final step
    s = train(TinyLM(nnx.Rngs(0)), cfg, make_iter(), out_dir=tmp_path, resume=True)
    assert s["final_step"] == 2 and s["steps_run"] == 0


# ------------------------------------------------------------------ checkpoints


def test_checkpoint_roundtrip_atomic_and_pruned(tmp_path):
    model = TinyLM(nnx.Rngs(0))
    opt = make_optimizer(OptimConfig(warmup_steps=0, total_steps=10), model)
    it = make_iter()
    next(it), next(it)
    ck = Checkpointer(tmp_path / "ck", max_to_keep=2)
    for step in (1, 2, 3):
        ck.save(step, model, opt, it, extra={"tokens_seen": step * 10})
    assert ck.all_steps() == [2, 3]
    names = {p.name for p in (tmp_path / "ck").iterdir()}
    assert not any("tmp" in n for n in names), names  # committed by rename, no temp dirs left
    assert (tmp_path / "ck" / "3" / "commit_success.txt").exists()
    with pytest.raises(ValueError, match="already exists"):
        ck.save(3, model, opt, it)
    ck.close()

    model2 = TinyLM(nnx.Rngs(7))
    opt2 = make_optimizer(OptimConfig(warmup_steps=0, total_steps=10), model2)
    it2 = make_iter()
    info = restore_checkpoint(tmp_path / "ck", model2, opt2, it2)
    assert info == {"step": 3, "extra": {"tokens_seen": 30}, "data_iter_restored": True}
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(model2))):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(nnx.state(opt)), jax.tree.leaves(nnx.state(opt2))):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(next(it)["tokens"], next(it2)["tokens"])
    # params only (e.g. for eval / export), from the run directory form
    model3 = TinyLM(nnx.Rngs(8))
    assert restore_checkpoint(tmp_path / "ck", model3, step=2)["step"] == 2
    # a save that crashed mid-write leaves only a temp dir: never listed, cleaned when a writer opens
    stale = tmp_path / "ck" / "4.orbax-checkpoint-tmp-1234"
    stale.mkdir()
    (stale / "model").mkdir()
    assert checkpoint_steps(tmp_path / "ck") == [2, 3]
    assert restore_checkpoint(tmp_path / "ck", TinyLM(nnx.Rngs(8)))["step"] == 3
    Checkpointer(tmp_path / "ck").close()
    assert not stale.exists()


# A failed tensorstore read can leave callbacks that fire after orbax's event loop closed; harmless noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_or_missing_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        restore_checkpoint(tmp_path / "nowhere", TinyLM(nnx.Rngs(0)))
    not_ckpt = tmp_path / "not_ckpt"
    not_ckpt.mkdir()
    (not_ckpt / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match="not_ckpt"):
        restore_checkpoint(not_ckpt, TinyLM(nnx.Rngs(0)))

    model = TinyLM(nnx.Rngs(0))
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(5, model)
    # garbage in the array data files (metadata intact), then in every file of the item
    for f in (tmp_path / "ck" / "5" / "model").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"ck/5.*corrupt"):
        restore_checkpoint(tmp_path / "ck", TinyLM(nnx.Rngs(0)))
    for f in (tmp_path / "ck" / "5" / "model").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"ck/5"):
        restore_checkpoint(tmp_path / "ck", TinyLM(nnx.Rngs(0)))
    # a missing item
    shutil.rmtree(tmp_path / "ck" / "5" / "model")
    with pytest.raises(ValueError, match=r"ck/5.*missing \['model'\]"):
        restore_checkpoint(tmp_path / "ck", TinyLM(nnx.Rngs(0)))
    # a step directory full of junk
    junk = tmp_path / "junk" / "7"
    junk.mkdir(parents=True)
    (junk / "model").write_text("x")
    (junk / "meta").write_text("y")
    with pytest.raises(ValueError, match=r"junk/7"):
        restore_checkpoint(tmp_path / "junk", TinyLM(nnx.Rngs(0)))


def test_checkpoint_structure_mismatch_is_value_error(tmp_path):
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(1, TinyLM(nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"does not match the given model: A_log: checkpoint shape \(24,\)"):
        restore_checkpoint(tmp_path / "ck", TinyLM(nnx.Rngs(0), d=D + 8))
    with pytest.raises(ValueError, match=r"missing \['optimizer'\]"):
        model = TinyLM(nnx.Rngs(0))
        restore_checkpoint(tmp_path / "ck", model, make_optimizer(OptimConfig(total_steps=200), model))


def test_metrics_jsonl_is_json_per_line(tmp_path):
    train(TinyLM(nnx.Rngs(0)), small_config(steps=4), make_iter(), out_dir=tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert all(isinstance(json.loads(l), dict) for l in lines)
