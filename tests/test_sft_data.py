"""Supervised fine-tuning batches (mani_jax.data.pipeline with target_masks, tokenize_chats) and the masked LM loss:
the loss mask is the assistant mask shifted onto the targets, packing never crosses conversations, the batches are
otherwise the pretraining batches, and the loss ignores every non-assistant position."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from mani_jax.chat import END_TOKEN, detokenize_with_special
from mani_jax.data import count_targets, make_eval_batches, make_train_dataset, make_train_iterator, tokenize_chats
from mani_jax.data.reasoning import generate_problems
from mani_jax.tokenizer import train_tokenizer
from mani_jax.train import lm_loss

SEQ = 192


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    ps = (generate_problems(200, seed=99) + generate_problems(100, family="countdown", seed=99)
          + generate_problems(100, lang="hi", seed=99))
    return train_tokenizer([p.question + "\n" + p.solution for p in ps], 600, tmp_path_factory.mktemp("tok") / "spm")


@pytest.fixture(scope="module")
def chats(tok):
    problems = (generate_problems(24, seed=1, steps=(1, 2, 3)) + generate_problems(12, family="countdown", seed=1)
                + generate_problems(12, lang="hi", seed=1, steps=(1, 2)))
    convs = [p.messages(system="Think step by step." if i % 3 == 0 else None) for i, p in enumerate(problems)]
    docs, masks = tokenize_chats(tok, convs, max_tokens=SEQ + 1, overflow="drop")
    assert len(docs) == len(convs) > 40  # all fit: every packed segment is one whole conversation
    return problems, docs, masks


def _segments(batch, b):
    """``[(start, end)]`` input-position ranges of the segments of row ``b`` (pieces are whole conversations)."""
    seg = batch["segment_ids"][b]
    out = []
    for s in range(1, int(seg.max()) + 1):
        where = np.flatnonzero(seg == s)
        assert (np.diff(where) == 1).all()  # contiguous
        out.append((int(where[0]), int(where[-1]) + 1))
    return out


def _check_rows(batches, docs, masks):
    """Every segment is one conversation, and its loss mask is that conversation's assistant mask shifted by one."""
    by_tokens = {tuple(d.tolist()): m for d, m in zip(docs, masks)}
    seen = []
    for batch in batches:
        for b in range(batch["tokens"].shape[0]):
            full = np.append(batch["tokens"][b], batch["targets"][b][-1])
            covered = np.zeros(SEQ, bool)
            for a, e in _segments(batch, b):
                # input positions a..e-1 hold the conversation; its last token sits at e (a target) when the
                # conversation ends at the row end, otherwise the next segment or padding starts at e
                n_in = e - a
                cand = [tuple(full[a: a + k].tolist()) for k in (n_in, n_in + 1)]
                key = next((c for c in cand if c in by_tokens), None)
                assert key is not None, "a segment is not exactly one conversation"
                mask = by_tokens[key]
                np.testing.assert_array_equal(batch["positions"][b][a:e], np.arange(e - a))
                n_targets = len(key) - 1
                np.testing.assert_array_equal(batch["loss_mask"][b][a: a + n_targets], mask[1:].astype(np.float32))
                # the position whose target is the next conversation's BOS (or padding) is never trained
                if a + n_targets < SEQ:
                    assert batch["loss_mask"][b][a + n_targets] == 0
                covered[a: a + n_targets] = True
                seen.append(key)
            assert not batch["loss_mask"][b][~covered].any()  # padding and boundaries
    return seen


def test_loss_mask_is_the_shifted_assistant_mask(tok, chats):
    problems, docs, masks = chats
    batches = make_eval_batches(docs, seq_len=SEQ, batch_size=4, target_masks=masks)
    seen = _check_rows(batches, docs, masks)
    assert sorted(seen) == sorted(tuple(d.tolist()) for d in docs)  # each conversation exactly once
    assert sum(b["loss_mask"].sum() for b in batches) == count_targets(docs, masks)
    assert count_targets(docs, masks) == sum(int(m.sum()) for m in masks)  # the first token is never trained
    # read in text: the trained targets of each segment are the worked solution and its <|end|>
    texts = []
    for batch in batches:
        for b in range(batch["tokens"].shape[0]):
            for a, e in _segments(batch, b):
                sel = batch["loss_mask"][b][a:e] > 0
                texts.append(detokenize_with_special(tok, batch["targets"][b][a:e][sel]))
    assert sorted(texts) == sorted(p.solution + END_TOKEN for p in problems)


def test_shuffled_training_rows_and_unchanged_pretraining_batches(chats):
    _, docs, masks = chats
    kw = dict(seq_len=SEQ, batch_size=4, seed=3, num_epochs=2)
    with_m = list(make_train_dataset(docs, target_masks=masks, **kw))
    without = list(make_train_dataset(docs, **kw))
    assert len(with_m) == len(without) > 5
    _check_rows(with_m, docs, masks)
    by_tokens = {tuple(d.tolist()): m for d, m in zip(docs, masks)}
    for x, y in zip(with_m, without):
        for key in ("tokens", "targets", "segment_ids", "positions"):  # same pieces, order and packing
            np.testing.assert_array_equal(x[key], y[key])
        assert (x["loss_mask"] <= y["loss_mask"]).all() and x["loss_mask"].sum() < y["loss_mask"].sum()
    assert len(by_tokens) == len(docs)
    # the iterator state restores the SFT stream exactly
    it = make_train_iterator(docs, target_masks=masks, **kw)
    next(it)
    state = it.get_state()
    expect = next(it)
    it2 = make_train_iterator(docs, target_masks=masks, **kw)
    it2.set_state(state)
    got = next(it2)
    for key in expect:
        np.testing.assert_array_equal(expect[key], got[key])


def test_masked_loss_ignores_non_assistant_positions(chats):
    _, docs, masks = chats
    batch = make_eval_batches(docs, seq_len=SEQ, batch_size=4, target_masks=masks)[0]
    rng = np.random.default_rng(0)
    vocab = 600
    logits = rng.normal(size=(4, SEQ, vocab)).astype(np.float32)
    lm = batch["loss_mask"]
    loss, n = lm_loss(jnp.asarray(logits), jnp.asarray(batch["targets"]), jnp.asarray(lm))
    # float64 reference: mean NLL over the assistant targets only
    lf = logits.astype(np.float64)
    logp = lf - np.log(np.exp(lf - lf.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lf.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, batch["targets"][..., None].astype(np.int64), -1)[..., 0]
    assert float(n) == lm.sum() > 0
    np.testing.assert_allclose(float(loss), (nll * lm).sum() / lm.sum(), rtol=1e-5)
    # scrambling the logits of every non-assistant position changes nothing ...
    noisy = logits + 30.0 * rng.normal(size=logits.shape).astype(np.float32) * (lm == 0)[..., None]
    loss2, _ = lm_loss(jnp.asarray(noisy), jnp.asarray(batch["targets"]), jnp.asarray(lm))
    assert float(loss2) == float(loss)
    # ... while touching one assistant position does
    b, t = np.argwhere(lm > 0)[0]
    poked = logits.copy()
    poked[b, t, batch["targets"][b, t]] += 3.0
    loss3, _ = lm_loss(jnp.asarray(poked), jnp.asarray(batch["targets"]), jnp.asarray(lm))
    assert float(loss3) < float(loss)


def test_tokenize_chats_overflow_and_mask_validation(tok, chats):
    problems, docs, masks = chats
    convs = [p.messages() for p in problems[:6]]
    longest = max(len(d) for d in docs[:6])
    limit = longest - 3
    with pytest.raises(ValueError, match=r"conversations\[\d+\]: \d+ tokens > max_tokens"):
        tokenize_chats(tok, convs, max_tokens=limit)
    cut, cut_m = tokenize_chats(tok, convs, max_tokens=limit, overflow="truncate")
    assert len(cut) == 6 and max(len(d) for d in cut) == limit
    assert all(len(d) == len(m) for d, m in zip(cut, cut_m))
    kept, _ = tokenize_chats(tok, convs, max_tokens=limit, overflow="drop")
    assert len(kept) == sum(len(d) <= limit for d in docs[:6]) < 6
    with pytest.raises(ValueError, match=r"conversations\[1\]: messages\[0\]\['role'\]"):
        tokenize_chats(tok, [convs[0], [{"role": "robot", "content": "x"}]])
    with pytest.raises(ValueError, match="overflow"):
        tokenize_chats(tok, convs, overflow="wrap")
    with pytest.raises(ValueError, match="max_tokens"):
        tokenize_chats(tok, convs, max_tokens=1)
    with pytest.raises(ValueError, match="one mask per document"):
        make_train_dataset(docs, target_masks=masks[:-1], seq_len=SEQ, batch_size=2, seed=0)
    with pytest.raises(ValueError, match=r"target_masks\[2\]: expected shape"):
        make_eval_batches(docs, target_masks=masks[:2] + [masks[2][:-1]] + masks[3:], seq_len=SEQ, batch_size=2)
    with pytest.raises(ValueError, match="only 0 and 1"):
        count_targets(docs[:1], [masks[0].astype(np.int32) * 2])
