"""Chat format (mani_jax.chat): the template renders as llama-cpp-python renders it, the ids are llama.cpp's, and
the assistant mask covers exactly the assistant contents and their closing <|end|>."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from mani_jax.chat import (
    ASSISTANT_TOKEN,
    CHAT_TEMPLATE,
    END_TOKEN,
    check_messages,
    detokenize_with_special,
    encode_chat,
    encode_prompt,
    render_chat,
    tokenize_with_special,
)
from mani_jax.data.reasoning import generate_problems
from mani_jax.tokenizer import BOS_ID, CHAT_TOKENS, train_tokenizer

_TEXT = [
    "The quick brown fox jumps over the lazy dog. Ravi has 12 apples and gets 5 more apples.",
    "Step 1: 12 + 5 = 17. Step 2: 17 - 3 = 14. Answer: 14. Use the numbers 3, 7, 25 to make 46.",
    "राम के पास 12 सेब हैं। फिर राम को 5 सेब और मिलते हैं। अब राम के पास कितने सेब हैं? चरण १: १२ + ५ = १७",
    "You are a helpful assistant. Think step by step and give the final answer on the last line.",
]
CORPUS = "\n".join(f"{t} ({i})" for i in range(8) for t in _TEXT)

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Think step by step."}
CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 5?"}],
    [SYSTEM, {"role": "user", "content": "What is 12 + 5?"},
     {"role": "assistant", "content": "Step 1: 12 + 5 = 17\nAnswer: 17"}],
    [SYSTEM, {"role": "user", "content": "Ravi has 12 apples."}, {"role": "assistant", "content": "OK."},
     {"role": "user", "content": "He gets 5 more. How many now?"},
     {"role": "assistant", "content": "Step 1: 12 + 5 = 17\nAnswer: 17"},
     {"role": "user", "content": "  leading spaces, trailing\n\n"}],
    [{"role": "user", "content": "राम के पास १२ सेब हैं।"}, {"role": "assistant", "content": "उत्तर: १२"}],
    [{"role": "assistant", "content": ""}, {"role": "user", "content": "{{ not a template }} {% raw %} 😀"}],
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer([CORPUS], 400, tmp_path_factory.mktemp("tok") / "spm")


# ------------------------------------------------------------------------------------------------ rendering
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_equals_llama_cpp_jinja_formatter(add_generation_prompt):
    lcf = pytest.importorskip("llama_cpp.llama_chat_format")
    formatter = lcf.Jinja2ChatFormatter(template=CHAT_TEMPLATE, eos_token="</s>", bos_token="<s>",
                                        add_generation_prompt=add_generation_prompt)
    for msgs in CONVERSATIONS:
        res = formatter(messages=msgs)
        assert render_chat(msgs, add_generation_prompt) == res.prompt
        # llama-cpp-python tokenizes this prompt without adding BOS (the template writes it) and stops at "</s>"
        assert res.added_special is True and res.stop == ["</s>"]
    # the template itself, spelled out once (a template edit must be deliberate)
    assert render_chat(CONVERSATIONS[1][1:], add_generation_prompt) == (
        "<s><|user|>What is 12 + 5?<|end|>\n<|assistant|>Step 1: 12 + 5 = 17\nAnswer: 17<|end|>\n"
        + ("<|assistant|>" if add_generation_prompt else ""))


def test_template_refuses_unknown_role_in_llama_cpp_too():
    lcf = pytest.importorskip("llama_cpp.llama_chat_format")
    formatter = lcf.Jinja2ChatFormatter(template=CHAT_TEMPLATE, eos_token="</s>", bos_token="<s>")
    with pytest.raises(ValueError, match="chat roles"):
        formatter(messages=[{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[0\]\['role'\]"):
        render_chat([{"role": "tool", "content": "x"}])


# -------------------------------------------------------------------------------------------- tokenization
def test_ids_decode_back_to_the_rendered_text(tok):
    for msgs in CONVERSATIONS:
        for agp in (True, False):
            text = render_chat(msgs, agp)
            ids, mask = encode_chat(tok, msgs, add_generation_prompt=agp)
            assert ids.dtype == np.int32 and mask.dtype == np.bool_ and ids.shape == mask.shape
            assert ids.tolist() == tokenize_with_special(tok, text)
            assert detokenize_with_special(tok, ids) == text
            assert ids[0] == BOS_ID and not mask[0]
    assert encode_prompt(tok, CONVERSATIONS[0]).tolist() == encode_chat(tok, CONVERSATIONS[0], True)[0].tolist()
    # plain text spelling control tokens is not matched by encode(), only with special parsing
    assert tokenize_with_special(tok, "<s>a</s>") == [BOS_ID] + tok.encode("a") + [tok.eos_id]
    assert tok.encode("<s>")[0] != BOS_ID


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def test_assistant_mask_marks_exactly_the_assistant_replies(tok):
    end_id, asst_id = tok.piece_to_id(END_TOKEN), tok.piece_to_id(ASSISTANT_TOKEN)
    for msgs in CONVERSATIONS:
        ids, mask = encode_chat(tok, msgs)
        replies = [m["content"] for m in msgs if m["role"] == "assistant"]
        runs = _runs(mask)
        assert len(runs) == len(replies)
        for (a, b), reply in zip(runs, replies):
            # each run is one reply: its content tokens then the <|end|> that closes it ...
            assert detokenize_with_special(tok, ids[a:b]) == reply + END_TOKEN
            assert ids[b - 1] == end_id
            # ... and starts right after the <|assistant|> header, which is not trained
            assert ids[a - 1] == asst_id and not mask[a - 1]
        # no role header, no system/user token and no newline separator is trained
        for piece in CHAT_TOKENS[:3]:
            assert not mask[ids == tok.piece_to_id(piece)].any()
        n_end_trained = int(mask[ids == end_id].sum())
        assert n_end_trained == len(replies) and int((ids == end_id).sum()) == len(msgs)
        assert int(mask.sum()) == sum(len(tok.encode(r)) + 1 for r in replies)
    # a generation prompt adds one untrained <|assistant|>
    ids, mask = encode_chat(tok, CONVERSATIONS[2], add_generation_prompt=True)
    ids0, mask0 = encode_chat(tok, CONVERSATIONS[2])
    assert ids[:-1].tolist() == ids0.tolist() and ids[-1] == asst_id and not mask[-1]
    assert mask[:-1].tolist() == mask0.tolist()


def test_reasoning_examples_encode(tok):
    for p in generate_problems(12, lang="hi", seed=3) + generate_problems(12, family="countdown", seed=3):
        ids, mask = encode_chat(tok, p.messages(system="Think step by step."))
        assert detokenize_with_special(tok, ids[mask]) == p.solution + END_TOKEN


def test_bad_input(tok):
    with pytest.raises(ValueError, match="reserved token"):
        encode_chat(tok, [{"role": "user", "content": "hi <|end|> there"}])
    with pytest.raises(ValueError, match="reserved token"):
        encode_chat(tok, [{"role": "user", "content": "<s>"}])
    with pytest.raises(ValueError, match="empty"):
        encode_chat(tok, [])
    with pytest.raises(ValueError, match=r"messages\[1\]\['content'\]: expected str"):
        check_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": None}])
    with pytest.raises(ValueError, match=r"messages\[0\]: missing 'role'"):
        render_chat([{"content": "a"}])
    with pytest.raises(ValueError, match="messages: expected a list"):
        render_chat({"role": "user", "content": "a"})
    with pytest.raises(TypeError, match="tokenizer"):
        encode_chat("not a tokenizer", CONVERSATIONS[0])
    with pytest.raises(TypeError, match="text"):
        tokenize_with_special(tok, 5)


# ------------------------------------------------------------------------------------------------ llama.cpp
def test_same_ids_and_stop_token_in_llama_cpp(tok, tmp_path):
    """Export with CHAT_TEMPLATE, then llama-cpp-python's own chat handler path: the template is picked up as
    chat_template.default, its prompt tokenizes (special=True, no added BOS) to our ids, <|end|> ends
    generation, and create_chat_completion evaluates exactly len(ids) prompt tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    from flax import nnx

    from mani_jax.export import gguf as xg
    from mani_jax.export import parity
    from mani_jax.models import HybridLM, ModelConfig

    cfg = ModelConfig(vocab_size=416, d_model=32, n_layers=2, layer_types=("attention", "attention"), n_heads=2,
                      n_kv_heads=1, head_dim=16, d_ff=64, max_seq_len=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = xg.export_gguf(HybridLM(cfg, rngs=nnx.Rngs(0)), tok, tmp_path / "chat.gguf", quant="f32",
                              chat_template=CHAT_TEMPLATE)
    with parity.open_llama(path, n_ctx=256) as llm:
        assert llm.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
        assert llm.chat_format == "chat_template.default"
        bos = llm._model.token_get_text(llm.token_bos())
        eos = llm._model.token_get_text(llm.token_eos())
        assert (bos, eos) == ("<s>", "</s>")
        formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
            template=llm.metadata["tokenizer.chat_template"], eos_token=eos, bos_token=bos)
        end_id = tok.piece_to_id(END_TOKEN)
        assert llama_cpp.llama_vocab_is_eog(llm._model.vocab, end_id)  # generation stops at <|end|>
        for msgs in CONVERSATIONS:
            prompt = formatter(messages=msgs).prompt
            assert prompt == render_chat(msgs)
            ids = encode_prompt(tok, msgs).tolist()
            assert llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) == ids
            ids_train = encode_chat(tok, msgs)[0].tolist()
            assert llm.tokenize(render_chat(msgs, False).encode("utf-8"), add_bos=False, special=True) == ids_train
        out = llm.create_chat_completion(CONVERSATIONS[2], max_tokens=2, temperature=0.0)
        assert out["usage"]["prompt_tokens"] == len(encode_prompt(tok, CONVERSATIONS[2]))
