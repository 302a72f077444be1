"""HFTokenizer (tokenizer.json + tokenizer_config.json + generation_config.json) and load_hf_with_tokenizer.

Nothing can be downloaded, so each test builds a Qwen2-style tokenizer directory: a byte-level BPE trained with the
`tokenizers` library using Qwen2's normalizer, split regex, ByteLevel pre-tokenizer and decoder, with Qwen2's special
tokens added after the learned vocabulary, and Qwen2.5's ChatML chat template.
"""

import json
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import jinja2
import numpy as np
import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from mani_jax.hf_tokenizer import HFTokenizer
from mani_jax.models import HybridLM
from mani_jax.models.hf import load_hf_with_tokenizer

GOLDEN = Path(__file__).parent / "golden"

# Qwen2's pre-tokenizer regex (tokenizer.json of Qwen2/Qwen2.5).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The ChatML structure Qwen2 / Qwen2.5 use (their real template adds tool-calling branches around this core):
# a default system prompt when the conversation has none, <|im_start|>role\ncontent<|im_end|>\n per message, and
# "<|im_start|>assistant\n" as the generation prompt.
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away into the forest.",
    "You are a helpful assistant. What is two plus two? Two plus two is four. Hello! Hello there, how are you?",
    "Language models read text as tokens. A byte-level tokenizer never meets an unknown character, because every "
    "string is a sequence of bytes, and merges join frequent byte pairs into longer tokens.\n\nNew paragraphs too.",
    "नमस्ते दुनिया! यह एक छोटा परीक्षण है। भारत में बहुत सी भाषाएँ बोली जाती हैं।",
    "Emoji are bytes as well: 👋 🚀 🙂 and numbers 12345 67890.",
]


def _train(vocab_size: int, full_alphabet: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if full_alphabet else [])
    tok.train_from_iterator(CORPUS if full_alphabet else CORPUS[:3], trainer=trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


def write_tokenizer_dir(d: Path, *, vocab_size: int = 400, full_alphabet: bool = True, chat_template=CHATML,
                        eos_token="<|im_end|>", generation_eos="list") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    tok = _train(vocab_size, full_alphabet)
    tok.save(str(d / "tokenizer.json"))
    cfg = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": eos_token,
           "pad_token": "<|endoftext|>", "unk_token": None, "add_bos_token": False, "model_max_length": 32768}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    if generation_eos == "list":  # as Qwen2.5-Instruct: [<|im_end|>, <|endoftext|>]
        gen = {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"]}
    elif generation_eos == "int":
        gen = {"eos_token_id": ids["<|endoftext|>"]}
    else:
        gen = None
    if gen is not None:
        (d / "generation_config.json").write_text(json.dumps(gen))
    return d


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_tokenizer_dir(tmp_path_factory.mktemp("qwen2_tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return HFTokenizer.load(tok_dir)


def test_vocab_and_special_ids(tok, tok_dir):
    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert tok.vocab_size == len(tok) == raw.get_vocab_size(with_added_tokens=True) == 403
    im_start, im_end, eot = (tok.token_to_id(s) for s in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    assert {eot, im_start, im_end} == {400, 401, 402}  # added after the learned vocabulary, as in Qwen2
    assert tok.bos_id is None and tok.eos_id == im_end and tok.pad_id == eot
    assert tok.eos_ids == [im_end, eot]
    for s in SPECIALS:
        assert tok.encode(s) == [tok.token_to_id(s)]
        assert tok.decode([tok.token_to_id(s)]) == s
    ids = tok.encode("hi<|im_end|>there")
    assert ids.count(im_end) == 1 and len(ids) >= 3
    assert tok.encode("hi", add_bos=True) == tok.encode("hi")  # Qwen2 has no BOS: nothing to add
    assert tok.encode("hi", add_eos=True) == tok.encode("hi") + [im_end]


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, tabs\tand\nnew lines\n\n",
    "नमस्ते दुनिया! यह एक छोटा परीक्षण है।",
    "Hello 👋🏽 world 🚀🙂 — unseen: Ωμέγα 漢字",
])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, np.int32)) == text
    assert len(ids) < len(text.encode("utf-8"))  # merges were learned and used
    assert tok.encode([text, "x"]) == [ids, tok.encode("x")]
    assert tok.decode([ids, ids]) == [text, text]


def test_chat_template_renders_chatml_exactly(tok):
    messages = [{"role": "user", "content": "What is two plus two?"}]
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert tok.apply_chat_template(messages) == expected
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected[:-len("<|im_start|>assistant\n")]
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "नमस्ते"}]
    assert tok.apply_chat_template(conv) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nनमस्ते<|im_end|>\n<|im_start|>assistant\n")

    ids = tok.encode_chat(messages)
    assert ids == tok.encode(expected)
    # Each special token is one id; the text between them is encoded on its own (added tokens split first).
    special = {s: tok.token_to_id(s) for s in SPECIALS}
    want = []
    for part in re.split(r"(<\|im_start\|>|<\|im_end\|>)", expected):
        if part:
            want += [special[part]] if part in special else tok.encode(part)
    assert ids == want
    assert ids.count(special["<|im_start|>"]) == 3 and ids.count(special["<|im_end|>"]) == 2
    assert tok.decode(ids) == expected


def test_template_environment_like_transformers(tmp_path):
    # trim_blocks + lstrip_blocks, a tojson that does not escape HTML, raise_exception, special tokens as variables
    # (bos_token is null for Qwen2, so undefined -> ""), loop controls and extra template kwargs.
    template = ("{% for m in messages %}\n"
                "    {% if m['role'] == 'tool' %}\n"
                "        {{- raise_exception('tool messages are not supported') }}\n"
                "    {% endif %}\n"
                "    {% if m['content'] == 'skip' %}{% continue %}{% endif %}\n"
                "{{ m['role'] }}={{ m['content'] | tojson }}\n"
                "{% endfor %}\n"
                "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ tools }}|{{ enable_thinking | default('-') }}")
    tok = HFTokenizer.load(write_tokenizer_dir(tmp_path / "t", chat_template=template))
    msgs = [{"role": "user", "content": 'a<b>&"é'}, {"role": "user", "content": "skip"}]
    assert tok.apply_chat_template(msgs) == 'user="a<b>&\\"é"\n|<|im_end|>|<|endoftext|>|None|-'
    assert tok.apply_chat_template(msgs, enable_thinking=False).endswith("|False")
    with pytest.raises(jinja2.TemplateError, match="tool messages are not supported"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_template_variants(tmp_path):
    # A list of named templates (the 'default' one is used), an AddedToken dict for eos, an int generation eos.
    d = write_tokenizer_dir(tmp_path / "t", chat_template=[{"name": "tool_use", "template": "T"},
                                                           {"name": "default", "template": "D{{ eos_token }}"}],
                            eos_token={"content": "<|im_end|>", "special": True, "lstrip": False},
                            generation_eos="int")
    tok = HFTokenizer.load(d)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "D<|im_end|>"
    assert tok.eos_ids == [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    (d / "chat_template.jinja").write_text("J")  # newer transformers save the template beside the config
    assert HFTokenizer.load(d).apply_chat_template([{"role": "user", "content": "x"}]) == "J"


def test_errors(tmp_path, tok):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no tokenizer.json"):
        HFTokenizer.load(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        HFTokenizer.load(tmp_path / "missing")
    no_template = HFTokenizer.load(write_tokenizer_dir(tmp_path / "base", chat_template=None, generation_eos=None))
    assert no_template.eos_ids == [no_template.eos_id]
    assert no_template.encode("plain text still works") != []
    with pytest.raises(ValueError, match="no chat_template"):
        no_template.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="no chat_template"):
        no_template.encode_chat([{"role": "user", "content": "hi"}])
    bad = [("hello", "expected a list"), ([], "at least one message"), (["hi"], r"messages\[0\]: expected a dict"),
           ([{"role": "user"}], r"messages\[0\]: missing 'content'"),
           ([{"content": "x"}], r"messages\[0\]: missing 'role'"),
           ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}], r"messages\[1\]\['content'\]")]
    for messages, match in bad:
        with pytest.raises(ValueError, match=match):
            tok.encode_chat(messages)
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TypeError):
        tok.encode(3)
    d = write_tokenizer_dir(tmp_path / "badeos", eos_token="<|not_a_token|>")
    with pytest.raises(ValueError, match="not in tokenizer.json's vocabulary"):
        HFTokenizer.load(d)


def _golden_dir(tmp_path: Path, tokenizer_vocab: int, full_alphabet: bool) -> Path:
    d = tmp_path / "qwen2"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(GOLDEN / "qwen2" / f, d / f)
    return write_tokenizer_dir(d, vocab_size=tokenizer_vocab, full_alphabet=full_alphabet)


def test_load_hf_with_tokenizer_runs_chat(tmp_path):
    # The golden tiny Qwen2 has 128 embedding rows: a byte-level BPE over only the corpus' own characters (not all
    # 256 bytes) with 3 special tokens fits in it, so chat ids can go through the real loaded model.
    d = _golden_dir(tmp_path, tokenizer_vocab=120, full_alphabet=False)
    model, tok = load_hf_with_tokenizer(d)
    assert isinstance(model, HybridLM) and isinstance(tok, HFTokenizer)
    assert tok.vocab_size <= model.config.vocab_size == 128
    ids = tok.encode_chat([{"role": "user", "content": "What is two plus two?"}])
    assert tok.decode(ids) == tok.apply_chat_template([{"role": "user", "content": "What is two plus two?"}])
    logits = np.asarray(model(jnp.asarray([ids], jnp.int32)))
    assert logits.shape == (1, len(ids), 128) and np.isfinite(logits).all()


def test_load_hf_with_tokenizer_rejects_bigger_vocab(tmp_path):
    d = _golden_dir(tmp_path, tokenizer_vocab=400, full_alphabet=True)  # 403 ids > 128 embedding rows
    with pytest.raises(ValueError, match="403 ids but the model's vocab_size is 128"):
        load_hf_with_tokenizer(d)


def test_qwen25_style_whitespace_controlled_template(tmp_path):
    # The system/user/assistant part of Qwen2.5-Instruct's own template (its tool-calling branches left out), written
    # with {%- -%} whitespace control over several indented lines as the real file is. The expected string is what
    # transformers gives for Qwen2.5-Instruct with add_generation_prompt=False.
    template = (
        "{%- if messages[0]['role'] == 'system' %}\n"
        "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
        "{%- else %}\n"
        "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
        "{%- endif %}\n"
        "{%- for message in messages %}\n"
        "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
        "(message.role == \"assistant\" and not message.tool_calls) %}\n"
        "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
        "    {%- endif %}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n"
        "    {{- '<|im_start|>assistant\\n' }}\n"
        "{%- endif %}\n")
    tok = HFTokenizer.load(write_tokenizer_dir(tmp_path / "t", chat_template=template))
    q = "What is 2 + 2?"
    assert tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{q}<|im_end|>\n")
    assert tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": q}]) == (
        f"<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
