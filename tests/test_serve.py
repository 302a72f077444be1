"""The OpenAI-compatible server, exercised with the official ``openai`` client against a live uvicorn server
on 127.0.0.1: every endpoint, streaming and not, stop strings, usage (prefix-cache hits, speculative
accept/reject counts), logprobs, n, seeds, errors with OpenAI's body, a client disconnecting mid-stream,
32 concurrent streaming clients. The served model is a random hybrid (Mamba-2 + attention) with a draft model
for speculative decoding, so greedy outputs are checked against target-only decoding as well."""

import asyncio
import dataclasses
import json
import socket
import threading
import time

import httpx2 as httpx  # the HTTP client the openai SDK ships with
import numpy as np
import pytest
from flax import nnx

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from mani_jax.inference import generate  # noqa: E402
from mani_jax.models import HybridLM, get_config  # noqa: E402
from mani_jax.serve import TextCodec, TextStream, build_state, create_app  # noqa: E402
from mani_jax.tokenizer import train_tokenizer  # noqa: E402

KEY = "sk-test-key"
WORDS = ("the king and queen walk to the castle where a knight waits with seven horses while rain falls on "
         "green hills and the river runs to the sea so every morning bread and honey come to the table").split()


def _corpus(n_lines=400, seed=0):
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, rng.integers(4, 14))) + "." for _ in range(n_lines))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tok = train_tokenizer([_corpus()], 400, tmp_path_factory.mktemp("tok") / "spm")
    cfg = dataclasses.replace(get_config("smoke", {"n_layers": 4, "vocab_size": tok.vocab_size}),
                              initializer_range=0.2, max_seq_len=128)
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    draft = HybridLM(dataclasses.replace(cfg, n_layers=2, layer_types=("mamba", "attention")), rngs=nnx.Rngs(1))
    state = build_state(model, tok, model_name="chimera-test", draft=draft, gamma=3, api_key=KEY, max_batch=8,
                        page_size=8, prefill_budget=32, max_waiting=64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}/v1"
    yield {"base": base, "state": state, "model": model, "tok": tok,
           "client": openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=120)}
    srv.should_exit = True
    thread.join(timeout=10)
    state.engine.close()


def _greedy_text(srv, prompt_ids, n):
    """Target-only greedy decoding (no engine, no draft), cut at the first end-of-turn token."""
    out = generate(srv["model"], prompt_ids, n, temperature=0.0)
    codec = srv["state"].codec
    out = [int(t) for t in out]
    reason = "length"
    for i, t in enumerate(out):
        if t in codec.eos_ids:
            out, reason = out[:i], "stop"
            break
    s = TextStream(codec, context=prompt_ids)
    return "".join(s.push(t) for t in out) + s.flush(), reason


def test_models_endpoint(server):
    models = server["client"].models.list()
    assert [m.id for m in models.data] == ["chimera-test"]
    assert server["client"].models.retrieve("chimera-test").id == "chimera-test"


def test_completion_greedy_equals_target_only_decoding_streaming_or_not(server):
    c = server["client"]
    prompt = "the king and queen walk to"
    ids = server["state"].codec.encode(prompt)
    ref, reason = _greedy_text(server, ids, 12)
    r = c.completions.create(model="chimera-test", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == ref and r.choices[0].finish_reason == reason
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    details = r.usage.completion_tokens_details
    assert details.accepted_prediction_tokens + details.rejected_prediction_tokens > 0  # a draft is serving
    chunks = list(c.completions.create(model="chimera-test", prompt=prompt, max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ref
    assert all(ch.usage is None for ch in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_chat_stream_and_non_stream_agree(server):
    c = server["client"]
    msgs = [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": "where is the knight"}]
    r = c.chat.completions.create(model="chimera-test", messages=msgs, max_completion_tokens=10, temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    ids = server["state"].codec.encode_chat(msgs)
    assert r.usage.prompt_tokens == len(ids)
    assert (text, r.choices[0].finish_reason) == _greedy_text(server, ids, 10)
    chunks = list(c.chat.completions.create(model="chimera-test", messages=msgs, max_tokens=10, temperature=0,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert len({ch.id for ch in chunks}) == 1 and all(ch.usage is None for ch in chunks)


def test_stop_strings_are_cut_and_never_streamed(server):
    c = server["client"]
    prompt = "rain falls on green"
    full = c.completions.create(model="chimera-test", prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    assert len(full) > 12, full
    stop = full[5:8]  # a stop string from inside the greedy text
    cut = full[:full.index(stop)]
    r = c.completions.create(model="chimera-test", prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = [ch.choices[0].text for ch in c.completions.create(
        model="chimera-test", prompt=prompt, max_tokens=24, temperature=0, stop=stop, stream=True)]
    assert "".join(streamed) == cut
    chat = c.chat.completions.create(model="chimera-test", messages=[{"role": "user", "content": prompt}],
                                     max_tokens=24, temperature=0)
    text = chat.choices[0].message.content
    if len(text) > 8:
        stop = text[4:7]
        parts = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="chimera-test", messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0,
            stop=[stop], stream=True)]
        assert "".join(parts) == text[:text.index(stop)]


def test_text_stream_holds_back_partial_stop_strings_and_utf8(server):
    codec = server["state"].codec
    ids = codec.encode("the king walks to the castle")[1:]
    s = TextStream(codec, stop=["walks to the ca"])
    sent = "".join(s.push(t) for t in ids)
    assert sent == "the king " and s.stopped
    s = TextStream(codec)
    ids = server["tok"].encode("horses \u0915\u093f\u0902\u0917 🐎")  # Devanagari + emoji: byte-fallback pieces
    pieces = [s.push(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + s.flush() == "horses \u0915\u093f\u0902\u0917 🐎"


def test_n_choices_seed_and_logprobs(server):
    c = server["client"]
    kw = dict(model="chimera-test", messages=[{"role": "user", "content": "the queen"}], max_tokens=6,
              temperature=1.0, seed=1234, n=3)
    a = c.chat.completions.create(**kw)
    b = c.chat.completions.create(**kw)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.message.content for ch in a.choices] == [ch.message.content for ch in b.choices]
    r = c.chat.completions.create(model="chimera-test", messages=[{"role": "user", "content": "the queen"}],
                                  max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) >= 1
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        tops = [t.logprob for t in item.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert item.logprob == pytest.approx(tops[0], abs=1e-5)  # greedy picks the most likely token
    cr = c.completions.create(model="chimera-test", prompt="the queen", max_tokens=4, temperature=0, logprobs=2)
    lp = cr.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) >= 1
    assert "".join(lp.tokens).startswith(cr.choices[0].text[:1])


def test_prefix_cache_hits_are_reported(server):
    c = server["client"]
    prompt = " ".join(WORDS[:40])
    c.completions.create(model="chimera-test", prompt=prompt, max_tokens=2, temperature=0)
    r = c.completions.create(model="chimera-test", prompt=prompt, max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens >= 8


def test_errors_use_openai_bodies_and_statuses(server):
    c = server["client"]
    bad_key = openai.OpenAI(base_url=server["base"], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    for kwargs, param in [(dict(max_tokens=-3), "max_tokens"), (dict(n=1000), "n"),
                          (dict(temperature="hot"), "temperature"), (dict(extra_body={"frobnicate": 1}), "frobnicate"),
                          (dict(stop=["a", "b", "c", "d", "e"]), "stop")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="chimera-test", prompt="the king", **{"max_tokens": 2, **kwargs})
        assert set(e.value.body) == {"message", "type", "param", "code"}
        assert param in (e.value.body["param"] or "") or param in e.value.body["message"], e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="chimera-test", prompt="the king " * 200, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    raw = httpx.post(server["base"] + "/chat/completions", content=b"{not json",
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    raw = httpx.post(server["base"] + "/chat/completions", json={"model": "chimera-test", "messages": "hi"},
                     headers={"Authorization": f"Bearer {KEY}"})
    assert raw.status_code == 400 and raw.json()["error"]["param"].startswith("messages")
    huge = httpx.post(server["base"] + "/completions", content=b"x" * (5 << 20),
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert huge.status_code == 413 and "error" in huge.json()
    assert httpx.get(server["base"] + "/nope").status_code == 404
    # the server keeps serving
    assert c.completions.create(model="chimera-test", prompt="the king", max_tokens=2, temperature=0).choices


def test_queue_full_gives_429(server):
    engine = server["state"].engine
    old = engine.max_waiting
    engine.max_waiting = 0
    try:
        with pytest.raises(openai.RateLimitError) as e:
            server["client"].completions.create(model="chimera-test", prompt="the king", max_tokens=2)
        assert e.value.status_code == 429
    finally:
        engine.max_waiting = old


def _wait_idle(state, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = state.engine.stats()
        if st["running"] == 0 and st["waiting"] == 0 and st["requests"] == 0:
            return st
        time.sleep(0.05)
    raise AssertionError(f"engine not idle: {state.engine.stats()}")


def test_disconnect_mid_stream_frees_pages(server):
    state = server["state"]
    _wait_idle(state)
    body = {"model": "chimera-test", "prompt": "the king", "max_tokens": 100, "temperature": 0, "stream": True}
    with httpx.stream("POST", server["base"] + "/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as resp:
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(4)]
        assert any(line.startswith("data: {") for line in got)
        assert state.engine.stats()["running"] == 1
    st = _wait_idle(state)  # the closed connection cancelled the request
    assert st["pages_in_use"] == 0  # its pages went back to the pool (full prompt pages stay cached)


def test_32_concurrent_streaming_clients(server):
    prompts = [" ".join(WORDS[i:i + 3 + i % 5]) for i in range(32)]
    refs = [server["client"].completions.create(model="chimera-test", prompt=p, max_tokens=8, temperature=0)
            .choices[0].text for p in prompts[:4]]

    async def one(client, p):
        stream = await client.completions.create(model="chimera-test", prompt=p, max_tokens=8, temperature=0,
                                                 stream=True)
        return "".join([ch.choices[0].text async for ch in stream])

    async def main():
        async with openai.AsyncOpenAI(base_url=server["base"], api_key=KEY, max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    outs = asyncio.run(main())
    assert outs[:4] == refs
    for p, o in zip(prompts, outs):  # every one equals target-only greedy decoding
        assert o == _greedy_text(server, server["state"].codec.encode(p), 8)[0]
    _wait_idle(server["state"])


def test_codec_rejects_bad_messages(server):
    codec: TextCodec = server["state"].codec
    with pytest.raises(ValueError):
        codec.encode_chat([{"role": "wizard", "content": "x"}])
    assert json.loads(json.dumps(codec.eos_ids)) == list(codec.eos_ids)


def test_hugging_face_qwen2_directory_serves_chat(tmp_path):
    """``load_model`` on a Qwen2 directory (the tiny golden checkpoint plus a Qwen2-style byte-level tokenizer):
    chat prompts go through its ChatML template, generation stops at ``<|im_end|>``, and the text codec
    detokenizes byte-level BPE."""
    from mani_jax.inference.engine import Engine, SamplingParams
    from mani_jax.serve import load_model
    from test_hf_tokenizer import _golden_dir

    model, tok, kind = load_model(_golden_dir(tmp_path, tokenizer_vocab=120, full_alphabet=False))
    assert kind == "hf"
    codec = TextCodec(tok)
    msgs = [{"role": "user", "content": "What is two plus two?"}]
    ids = codec.encode_chat(msgs)
    assert codec.decode(ids).endswith("What is two plus two?\nassistant\n")  # specials skipped
    assert set(codec.eos_ids) == {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")}
    out = Engine(model, max_batch=1, page_size=8, prefill_budget=32).generate(
        [ids], SamplingParams(max_new_tokens=6, stop_token_ids=codec.eos_ids))[0]
    ref = [int(t) for t in generate(model, ids, 6, temperature=0.0)]
    assert out == ref[:len(out)]
    s = TextStream(codec, context=ids)
    assert "".join(s.push(t) for t in out if t not in codec.eos_ids) + s.flush() == codec.decode(
        [t for t in out if t not in codec.eos_ids])
