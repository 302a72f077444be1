"""DPO training (mani_jax.train.preference) and the post-training helpers of experiments.chimera
(experiments.posttrain): pair layout, padding-invariant reference log-probs, a DPO run that separates a toy
preference, paired statistics against hand-computed values, and pair sampling / few-shot scoring with a
scripted engine."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import posttrain
from mani_jax.chat import END_TOKEN, encode_prompt
from mani_jax.data.reasoning import FEW_SHOT_STOP, generate_problems
from mani_jax.models import HybridLM, ModelConfig
from mani_jax.tokenizer import train_tokenizer
from mani_jax.train import TrainConfig, sequence_logprobs
from mani_jax.train.preference import PreferencePair, pair_arrays, reference_logprobs, train_dpo

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, layer_types=("mamba", "attention"), n_heads=2,
                  n_kv_heads=1, head_dim=16, d_ff=64, mamba_n_heads=4, mamba_head_dim=16, d_state=8, chunk_size=8,
                  max_seq_len=64)


def _model(seed=0):
    return HybridLM(CFG, rngs=nnx.Rngs(seed))


# ---------------------------------------------------------------------------------------------- pair layout
def test_pair_arrays_layout():
    pairs = [PreferencePair((1, 5, 6), (7, 8, 9), (10,)), PreferencePair((1, 4), (11, 12), (13, 14, 15, 16))]
    a = pair_arrays(pairs, seq_len=8, pad_id=0)
    assert {k: v.shape for k, v in a.items()} == {k: (4, 8) for k in a}
    assert a["tokens"].dtype == np.int32 and a["response_mask"].dtype == np.float32
    # rows: chosen 0, chosen 1, rejected 0, rejected 1
    np.testing.assert_array_equal(a["tokens"][0], [1, 5, 6, 7, 8, 0, 0, 0])
    np.testing.assert_array_equal(a["targets"][0], [5, 6, 7, 8, 9, 0, 0, 0])
    np.testing.assert_array_equal(a["response_mask"][0], [0, 0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(a["targets"][3][a["response_mask"][3] > 0], [13, 14, 15, 16])
    np.testing.assert_array_equal(a["segment_ids"][2], [1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(a["positions"][1], [0, 1, 2, 0, 0, 0, 0, 0])
    # every response token is a target exactly once, nothing of the prompt is
    for row, (p, resp) in enumerate([(q.prompt, r) for kind in ("chosen", "rejected") for q in pairs
                                     for r in [getattr(q, kind)]]):
        assert a["response_mask"][row].sum() == len(resp)
    with pytest.raises(ValueError, match="does not fit seq_len"):
        pair_arrays(pairs, seq_len=4)
    with pytest.raises(ValueError, match="at least one"):
        pair_arrays([], seq_len=5)
    with pytest.raises(ValueError, match="chosen"):
        PreferencePair((1,), (), (2,))


def test_reference_logprobs_equal_unpadded_forward():
    model = _model()
    rng = np.random.default_rng(0)
    # prompt + response = 10 tokens in every row, so the unpadded reference is one compiled shape
    pairs = []
    for n_prompt, n_c in ((2, 8), (5, 5), (7, 3)):
        prompt, chosen, rejected = (tuple(int(x) for x in rng.integers(1, 64, size=k))
                                    for k in (n_prompt, n_c, 10 - n_prompt))
        pairs.append(PreferencePair(prompt, chosen, rejected))
    c, r = reference_logprobs(model, pairs, seq_len=24, batch_size=2)  # padded to 24, last batch topped up
    assert c.shape == r.shape == (3,) and c.dtype == np.float32
    forward = jax.jit(lambda s: model(s))
    for i, p in enumerate(pairs):
        for resp, got in ((p.chosen, c[i]), (p.rejected, r[i])):
            seq = jnp.asarray([list(p.prompt) + list(resp)], jnp.int32)
            mask = jnp.zeros(seq[:, 1:].shape).at[:, len(p.prompt) - 1:].set(1.0)
            want = sequence_logprobs(forward(seq[:, :-1]), seq[:, 1:], mask)[0]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


# -------------------------------------------------------------------------------------------------- training
def test_dpo_separates_a_toy_preference(tmp_path):
    """Prefer responses ending in token 3 over those ending in token 4: the loss starts at log 2 (policy ==
    reference), falls, and the policy's log-probability of the chosen responses rises relative to the rejected."""
    model = _model(1)
    rng = np.random.default_rng(1)
    pairs = []
    for _ in range(16):
        prompt = (1,) + tuple(int(x) for x in rng.integers(5, 60, size=4))
        body = tuple(int(x) for x in rng.integers(5, 60, size=3))
        pairs.append(PreferencePair(prompt, body + (3,), body + (4,)))
    ref = nnx.clone(model, arrays=True)
    rc, rr = reference_logprobs(ref, pairs, seq_len=16, batch_size=8)
    tc = TrainConfig(steps=20, batch_size=8, seq_len=16, learning_rate=1e-2, warmup_steps=2, weight_decay=0.0,
                     log_every=5, progress=False)
    res = train_dpo(model, pairs, rc, rr, tc, out_dir=tmp_path, beta=0.1)
    assert res["first"]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert res["first"]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    assert res["final"]["loss"] < 0.75 * math.log(2)
    assert res["final"]["reward_accuracy"] == 1.0 and res["final"]["reward_margin"] > 0.3
    pc, pr = reference_logprobs(model, pairs, seq_len=16, batch_size=8)
    assert np.all((pc - rc) - (pr - rr) > 0)
    # the reference copy is untouched (its buffers were not donated)
    rc2, _ = reference_logprobs(ref, pairs, seq_len=16, batch_size=8)
    np.testing.assert_allclose(rc2, rc, rtol=1e-6)
    assert (tmp_path / "metrics.jsonl").stat().st_size > 0 and (tmp_path / "dpo_curve.png").stat().st_size > 0
    with pytest.raises(ValueError, match="fewer than config.batch_size"):
        train_dpo(model, pairs[:3], rc[:3], rr[:3], tc, out_dir=tmp_path)
    with pytest.raises(ValueError, match="expected shape"):
        train_dpo(model, pairs, rc[:3], rr, tc, out_dir=tmp_path)


# ------------------------------------------------------------------------------------------------ statistics
def test_paired_difference_hand_computed():
    a = [1, 1, 0, 0, 0, 0, 0, 1, 1, 0]
    b = [1, 1, 1, 1, 1, 1, 1, 1, 1, 0]  # 5 fixed, 0 broken
    d = posttrain.paired_difference(a, b, n_boot=4000)
    assert d["difference"] == pytest.approx(0.5)
    assert (d["b_only"], d["a_only"], d["n"]) == (5, 0, 10)
    assert d["mcnemar_p"] == pytest.approx(2 / 2**5)  # exact binomial, two-sided
    assert 0.1 < d["ci_low"] < 0.5 < d["ci_high"] <= 0.8
    same = posttrain.paired_difference(a, a)
    assert same["difference"] == same["ci_low"] == same["ci_high"] == 0.0 and same["mcnemar_p"] == 1.0
    p = posttrain.paired_difference([1, 0, 1, 0, 1, 1], [0, 1, 1, 0, 0, 1])  # 1 fixed, 2 broken
    assert (p["b_only"], p["a_only"]) == (1, 2) and p["mcnemar_p"] == pytest.approx(1.0)  # 2 * (1 + 3) / 8, capped
    with pytest.raises(ValueError, match="one length"):
        posttrain.paired_difference([1, 0], [1])


def test_accuracy_table_groups():
    probs = generate_problems(6, steps=(1, 2), digits=(1, 2), seed=3)
    t = posttrain.accuracy_table(probs, [True, False, True, True, False, False], [3, 4, 5, 6, 7, 8])
    assert t["n"] == 6 and t["accuracy"] == pytest.approx(0.5) and t["mean_length"] == pytest.approx(5.5)
    assert t["by_steps"]["1"] == {"accuracy": pytest.approx(2 / 3), "n": 3}
    assert t["by_steps_digits"]["1x1"]["n"] == 2 and t["by_steps_digits"]["2x2"]["n"] == 1


def test_accuracy_plot_at_zero_and_full_accuracy(tmp_path):
    # Wilson bounds at accuracy 0 or 1 can round a hair inside the point (the default run crashed on 100/100).
    stages = {"sft": {"accuracy": 1.0, "by_steps": {"1": {"accuracy": 1.0, "n": 100}, "2": {"accuracy": 0.0, "n": 7}}},
              "dpo": {"accuracy": 0.5, "by_steps": {"1": {"accuracy": 1.0, "n": 10}, "2": {"accuracy": 0.5, "n": 2}}}}
    posttrain.plot_accuracy(stages, tmp_path / "acc.png")
    assert (tmp_path / "acc.png").stat().st_size > 0


# ------------------------------------------------------------------------------- sampling with a fake engine
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"{p.question}\n{p.solution}" for p in generate_problems(200, steps=(1, 2), seed=0)]
    return train_tokenizer(texts, 400, tmp_path_factory.mktemp("tok") / "spm")


class _ScriptedEngine:
    """Answers request ``i`` with ``replies[i]`` (token lists) and records what it was asked."""

    def __init__(self, replies):
        self.replies, self.calls = replies, []

    def reset(self):
        pass

    def generate(self, prompts, params):
        self.calls.append((prompts, params))
        return [list(r) for r in self.replies[: len(prompts)]]


def test_sample_preference_pairs_pick_correct_over_wrong(tok):
    probs = generate_problems(3, steps=(1,), digits=(1,), seed=7)
    end = tok.piece_to_id(END_TOKEN)
    right = [tok.encode(p.solution) + [end] for p in probs]
    wrong = [tok.encode(p.solution.rsplit(":", 1)[0] + f": {p.answer + 1}") + [end] for p in probs]
    unfinished = tok.encode(probs[2].solution)  # correct text but no <|end|>: counts as wrong
    replies = [right[0], wrong[0],      # problem 0: mixed -> one pair
               right[1], right[1],      # problem 1: all correct -> none
               unfinished, wrong[2]]    # problem 2: all wrong -> none
    eng = _ScriptedEngine(replies)
    pairs, stats = posttrain.sample_preference_pairs(eng, tok, probs, n_samples=2, temperature=1.0, seed=5)
    assert len(pairs) == 1 and stats["pairs"] == 1
    assert (stats["mixed"], stats["all_correct"], stats["all_wrong"]) == (1, 1, 1)
    assert stats["sample_accuracy"] == pytest.approx(3 / 6)
    assert pairs[0].chosen == tuple(right[0]) and pairs[0].rejected == tuple(wrong[0])
    assert pairs[0].prompt == tuple(encode_prompt(tok, probs[0].messages(with_solution=False)).tolist())
    prompts, params = eng.calls[0]
    assert [sp.seed for sp in params] == [5, 6, 7, 8, 9, 10]  # one seed per request
    assert all(sp.temperature == 1.0 and sp.stop_token_ids == (end,) for sp in params)
    assert prompts[0] == prompts[1] != prompts[2]


def test_few_shot_eval_cuts_at_blank_line(tok):
    probs = generate_problems(2, steps=(1,), digits=(1,), seed=8)
    shots = generate_problems(1, steps=(2,), digits=(1,), seed=9)
    good = tok.encode(probs[0].solution + FEW_SHOT_STOP + "Problem: x\nAnswer: 0")
    bad = tok.encode(f"Answer: {probs[1].answer + 1}" + FEW_SHOT_STOP + f"Answer: {probs[1].answer}")
    res = posttrain.few_shot_eval(_ScriptedEngine([good, bad]), tok, probs, shots, max_new_tokens=40)
    assert res["correct"] == [True, False]  # the answer after the blank line does not count
    assert res["completions"][0] == probs[0].solution and all(res["ended"])
