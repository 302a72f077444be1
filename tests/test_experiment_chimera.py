"""python -m experiments.chimera --preset smoke: runs end to end, beats the unigram baseline, resumes."""

import json

import pytest

from experiments import chimera


@pytest.mark.slow
def test_smoke_preset_end_to_end_and_resume(tmp_path):
    out = tmp_path / "run"
    s = chimera.main(["--preset", "smoke", "--out", str(out)])
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("preset", "params", "train_tokens", "tokens_per_second", "val_loss", "unigram_val_loss", "samples",
                "mfu"):
        assert key in on_disk, key
    assert on_disk["preset"] == "smoke" and on_disk["params"] == s["params"]
    assert s["val_loss"] < s["unigram_val_loss"]
    assert s["train_tokens"] == s["steps"] * s["config"]["train"]["batch_size"] * s["config"]["train"]["seq_len"]
    assert 0 < s["mfu"] < 1.5
    assert len(s["samples"]) == 2 and all(isinstance(x["completion"], str) for x in s["samples"])
    assert (out / "loss_curve.png").stat().st_size > 0 and (out / "tokenizer.model").exists()
    # The export stage: each GGUF file ran in llama.cpp; F16 reproduces JAX's greedy continuation exactly.
    by_quant = {g["quant"]: g for g in s["gguf"]}
    assert set(by_quant) == {"f16", "q8_0", "q4_0"}
    for g in s["gguf"]:
        assert (out / g["path"]).stat().st_size == g["size_bytes"] > 0
        assert g["time_to_first_token_s"] > 0 and g["decode_tokens_per_second"] > 0
    assert by_quant["f16"]["greedy_match_tokens"] == by_quant["f16"]["n_greedy"] == 64
    assert by_quant["f16"]["max_rel_logit_diff"] < 2e-3
    assert by_quant["q8_0"]["top1_agreement"] >= 0.95
    assert by_quant["q4_0"]["size_bytes"] < by_quant["q8_0"]["size_bytes"] < by_quant["f16"]["size_bytes"]
    # Refuses to clobber a finished run; --resume continues it to a larger step count.
    with pytest.raises(ValueError, match="resume"):
        chimera.main(["--preset", "smoke", "--out", str(out)])
    s2 = chimera.main(["--preset", "smoke", "--out", str(out), "--resume", "--steps", str(s["steps"] + 10),
                         "--set", "gguf_quants="])
    assert s2["steps"] == s["steps"] + 10
    assert s2["train_tokens"] == s2["steps"] * s["config"]["train"]["batch_size"] * s["config"]["train"]["seq_len"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown experiment preset"):
        chimera.main(["--preset", "huge"])
    with pytest.raises(ValueError, match="no such field"):
        chimera.main(["--preset", "smoke", "--set", "learning_rat=1"])
    with pytest.raises(ValueError, match="no such field"):
        chimera.main(["--preset", "smoke", "--set", "model.d_modle=3"])
