"""Wake word "हे वाणी": front end, model, save/load, a small training run, the shipped model on held-out synthetic
(espeak-ng) voices and speeds, the streaming detector and its argument checks."""
import shutil
import time

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")

from flax import nnx  # noqa: E402

from mani_jax.voice import wake as w  # noqa: E402
from mani_jax.voice.audio import FRAME_SAMPLES  # noqa: E402


@pytest.fixture(scope="module")
def shipped():
    return w.load_wake_model()


@pytest.fixture(scope="module")
def detector(shipped):
    return w.WakeWordDetector(shipped)


def test_splits_are_disjoint_and_cover_espeak():
    from mani_jax.voice.tts import espeak_variants

    assert not set(w.TRAIN_VARIANTS) & set(w.HELDOUT_VARIANTS)
    assert set(w.TRAIN_VARIANTS) | set(w.HELDOUT_VARIANTS) == set(espeak_variants())
    assert len(w.HELDOUT_VARIANTS) == 20
    assert not set(w.TRAIN_SPEEDS) & set(w.HELDOUT_SPEEDS)
    assert not set(w.TRAIN_SENTENCES) & set(w.HELDOUT_SENTENCES)
    assert w.WAKE_PHRASE not in w.TRAIN_SENTENCES + w.HELDOUT_SENTENCES


def test_front_end_shape_dtype_determinism_and_streaming():
    rng = np.random.default_rng(0)
    a = (0.1 * rng.standard_normal(16000)).astype(np.float32)
    f = w.wake_features(a)
    assert f.shape == (1 + (16000 - 400) // 160, 40) and f.dtype == np.float32
    assert np.array_equal(f, w.wake_features(a.copy()))
    assert w.wake_features(np.zeros(399, np.float32)).shape == (0, 40)
    np.testing.assert_allclose(w.silence_feature(), -1.0, atol=1e-5)  # log10(1e-8) + 5 = -3 -> -1
    s = w.WakeFeatureStream()
    rows = np.stack([s.push(a[i:i + 160]) for i in range(0, 16000, 160)])
    np.testing.assert_allclose(rows, w.stream_features(a), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="audio16k"):
        w.wake_features(np.zeros((2, 400), np.float32))
    with pytest.raises(ValueError, match="audio16k"):
        w.wake_features(np.zeros(400, np.int16))


def test_model_shape_and_size():
    m = w.WakeNet(rngs=nnx.Rngs(0))
    x = np.zeros((3, m.cfg.window_frames, 40), np.float32)
    assert m(x).shape == (3,)
    assert 20_000 <= w.param_count(m) <= 60_000
    p = w.wake_probs(m, x)
    assert p.shape == (3,) and p.dtype == np.float32 and np.all((p > 0) & (p < 1))


def test_save_load_round_trip_and_atomic(tmp_path, monkeypatch):
    m = w.WakeNet(rngs=nnx.Rngs(3))
    x = np.random.default_rng(1).standard_normal((4, m.cfg.window_frames, 40)).astype(np.float32)
    path = w.save_wake_model(m, tmp_path / "m.npz", meta={"note": "test"})
    assert (tmp_path / "m.json").exists()
    m2 = w.load_wake_model(path)
    assert m2.cfg == m.cfg
    np.testing.assert_array_equal(w.wake_probs(m, x), w.wake_probs(m2, x))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(w.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        w.save_wake_model(m, tmp_path / "new.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.npz"]  # no partial or temp file
    with pytest.raises(ValueError, match="not a wake model"):
        np.savez(tmp_path / "bad.npz", a=np.zeros(1))
        w.load_wake_model(tmp_path / "bad.npz")


def test_small_training_run_beats_chance_on_heldout():
    train = w.synth_wake_dataset("train", n_pos=120, n_neg=160, seed=5)
    val = w.synth_wake_dataset("heldout", n_pos=40, n_neg=40, seed=5)
    model, m = w.train_wake_model(steps=120, batch=32, seed=5, train_ds=train, val_ds=val, n_val=64)
    assert m["val_auc"] > 0.9, m  # chance is 0.5


def test_shipped_model_detects_heldout_phrase_and_ignores_heldout_sentences(detector):
    pos = w.heldout_positive_clips(12, seed=7)
    hits = [detector.score_clip(c) >= detector.threshold for c in pos]
    assert np.mean(hits) >= 0.8, hits
    rng = np.random.default_rng(8)
    fired = []
    for i, s in enumerate(w.HELDOUT_SENTENCES[:12]):
        a = w._synth(s, w.HELDOUT_VARIANTS[i], w.HELDOUT_SPEEDS[i % 4], 50)
        a = np.concatenate([np.zeros(8000, np.float32), 0.3 * a / np.abs(a).max(), np.zeros(8000, np.float32)])
        a = a + 0.003 * w.colored_noise(len(a), "pink", rng)
        if detector.score_clip(a) >= detector.threshold:
            fired.append(s)
    assert len(fired) <= 1, fired


def test_streaming_matches_batch_scores_and_emits_detection(shipped):
    det = w.WakeWordDetector(shipped, threshold=0.5, smoothing=3, min_hits=2, refractory_s=2.0)
    clip = next(c for c in w.heldout_positive_clips(6, seed=3) if det.score_clip(c) >= 0.6)
    scores, events = [], []
    for i in range(0, len(clip) // FRAME_SAMPLES * FRAME_SAMPLES, FRAME_SAMPLES):
        e = det.process(clip[i:i + FRAME_SAMPLES])
        if (i // FRAME_SAMPLES + 1) % det.score_every == 0:
            scores.append(det.last_score)
        if e is not None:
            events.append(e)
    det.reset()
    np.testing.assert_allclose(scores, det.raw_scores(clip), atol=1e-4)
    assert len(events) == 1 and events[0].name == "hey_vaani"
    assert 0 < events[0].timestamp <= len(clip) / 16
    # cheap scoring: one jitted fixed-shape call, well under 5 ms
    det.reset()
    frame = np.zeros(FRAME_SAMPLES, np.float32)
    for _ in range(20):
        det.process(frame)
    t = time.perf_counter()
    for _ in range(50):
        det.process(frame)
    per_score = (time.perf_counter() - t) / 10
    assert per_score < 0.005, per_score


def test_threshold_and_smoothing_change_behaviour(shipped):
    clip = w.heldout_positive_clips(2, seed=4)[1]
    raw = w.WakeWordDetector(shipped).raw_scores(clip)
    peak = float(raw.max())
    assert w.WakeWordDetector(shipped, threshold=min(peak + 1e-3, 0.999)).score_clip(clip) < min(peak + 1e-3, 0.999)
    loose = w.WakeWordDetector(shipped, threshold=0.5, smoothing=1, min_hits=1)
    assert loose.score_clip(clip) == pytest.approx(peak)
    # K-of-N: the smoothed score never exceeds the single-score one and falls as K grows
    k = [w.WakeWordDetector(shipped, smoothing=5, min_hits=j).score_clip(clip) for j in (1, 3, 5)]
    assert k[0] >= k[1] >= k[2] and k[0] == pytest.approx(peak)
    s = np.array([0.9, 0.1, 0.9, 0.1, 0.1])
    np.testing.assert_allclose(w.kth_largest_smooth(s, 3, 2), [0, 0.1, 0.9, 0.1, 0.1])
    assert w.count_detections(np.array([0.9, 0.9, 0.1, 0.9, 0.9, 0.9]), 0.5, 3) == 2
    # refractory: a long refractory period allows one detection for two phrases 1 s apart
    two = np.concatenate([clip, clip])
    assert len(w.WakeWordDetector(shipped, refractory_s=60.0).process_audio(two)) <= 1


@pytest.mark.parametrize("kw, name", [({"threshold": 0.0}, "threshold"), ({"threshold": 1.0}, "threshold"),
                                      ({"threshold": 1.5}, "threshold"), ({"smoothing": 0}, "smoothing"),
                                      ({"smoothing": 2, "min_hits": 3}, "min_hits"),
                                      ({"refractory_s": -1.0}, "refractory_s"), ({"score_every": 0}, "score_every")])
def test_bad_arguments_raise_naming_them(shipped, kw, name):
    with pytest.raises(ValueError, match=name):
        w.WakeWordDetector(shipped, **kw)


def test_wrong_frame_size_raises(detector):
    with pytest.raises(ValueError, match="frame_10ms"):
        detector.process(np.zeros(320, np.float32))
