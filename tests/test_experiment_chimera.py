"""python -m experiments.chimera --preset smoke: every stage (pretrain, SFT, DPO, export) runs end to end, the
pretrained model beats the unigram baseline, the chat GGUF answers in llama.cpp like JAX, pretraining resumes
and later stages refuse a stale parent."""

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
    assert all(g["model_stage"] == "dpo" for g in s["gguf"])  # the export stage ships the last trained model

    # Post-training stages: accuracy by difficulty per stage, checkpoints, per-problem replies, the plot.
    assert s["stages_completed"] == ["pretrain", "sft", "dpo", "export"]
    n = s["heldout"]["n"]
    assert n == 8 and s["heldout"]["per_difficulty"] == {"1": 4, "2": 4}
    for stage in ("base_few_shot", "sft", "dpo", "llama_cpp"):
        t = s["accuracy"][stage]
        assert t["n"] == n and set(t["by_steps"]) == {"1", "2"} and 0 <= t["accuracy"] <= 1, stage
        assert t["mean_length"] > 0
        lines = (out / "evals" / f"{stage}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) == n and all(isinstance(json.loads(x)["reply"], str) for x in lines)
    assert (out / "accuracy_by_difficulty.png").stat().st_size > 0
    assert any((out / "sft" / "checkpoints").iterdir()) and any((out / "dpo" / "checkpoints").iterdir())
    sft = s["sft"]
    assert sft["assistant_targets"] > 0 and sft["heldout_assistant_loss"] < sft["heldout_assistant_loss_before"]
    # DPO (smoke: the SFT model is never right, so every pair has the reference solution as chosen).
    d = s["dpo"]
    assert d["beta"] == 0.1 and d["pairs"]["pairs"] == d["pairs"]["gold_pairs"] > 0
    assert d["loss_final"] < d["loss_first"] and d["reward_margin"] > 0 and d["reward_accuracy"] > 0.5
    assert d["kl_to_reference"]["kl_mean"] >= 0 and d["kl_to_reference"]["n"] == 2
    assert d["vs_sft"]["n"] == n and d["vs_sft"]["ci_low"] <= d["vs_sft"]["difference"] <= d["vs_sft"]["ci_high"]
    # The chat GGUF carries the template and answers through create_chat_completion like JAX does.
    c = s["chat_export"]
    assert c["chat_format"] == "chat_template.default" and c["model_stage"] == "dpo"
    assert c["same_verdict"] == 1.0 or abs(c["llama_cpp_accuracy"] - c["jax_accuracy"]) <= 2 / n
    assert c["identical_replies"] >= 0.75
    gguf = pytest.importorskip("gguf")
    field = gguf.GGUFReader(out / c["path"]).fields["tokenizer.chat_template"]
    from mani_jax.chat import CHAT_TEMPLATE
    assert field.contents() == CHAT_TEMPLATE

    # Refuses to clobber a finished run; --resume continues pretraining to a larger step count, which drops the
    # later stages' results (they no longer follow from it) ...
    with pytest.raises(ValueError, match="resume"):
        chimera.main(["--preset", "smoke", "--out", str(out)])
    s2 = chimera.main(["--preset", "smoke", "--out", str(out), "--resume", "--steps", str(s["steps"] + 10),
                       "--stages", "pretrain"])
    assert s2["steps"] == s["steps"] + 10
    assert s2["train_tokens"] == s2["steps"] * s["config"]["train"]["batch_size"] * s["config"]["train"]["seq_len"]
    assert s2["stages_completed"] == ["pretrain"] and set(s2["accuracy"]) == {"base_few_shot"}
    assert "sft" not in s2 and "dpo" not in s2 and "chat_export" not in s2
    # ... so DPO now refuses to start from the stale SFT checkpoint.
    with pytest.raises(ValueError, match="sft stage has not finished"):
        chimera.main(["--preset", "smoke", "--out", str(out), "--stages", "dpo"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown experiment preset"):
        chimera.main(["--preset", "huge"])
    with pytest.raises(ValueError, match="no such field"):
        chimera.main(["--preset", "smoke", "--set", "learning_rat=1"])
    with pytest.raises(ValueError, match="no such field"):
        chimera.main(["--preset", "smoke", "--set", "model.d_modle=3"])
    with pytest.raises(ValueError, match="no such field"):
        chimera.main(["--preset", "smoke", "--set", "sft.stepz=3"])
    with pytest.raises(ValueError, match="--stages"):
        chimera.main(["--preset", "smoke", "--stages", "pretrain,rlhf"])


def test_stage_parsing_and_overrides():
    assert chimera.parse_stages("export,sft") == ("sft", "export")
    with pytest.raises(ValueError, match="--stages"):
        chimera.parse_stages("sft,sft")
    with pytest.raises(ValueError, match="--stages"):
        chimera.parse_stages("")
    model, exp, train, stage = chimera._split_overrides(
        ["model.d_state=16", "dpo_beta=0.2", "learning_rate=1e-3", "sft.steps=7", "dpo.learning_rate=1e-6"])
    assert (model, exp, train) == (["d_state=16"], ["dpo_beta=0.2"], ["learning_rate=1e-3"])
    assert stage == {"sft": ["steps=7"], "dpo": ["learning_rate=1e-6"]}
