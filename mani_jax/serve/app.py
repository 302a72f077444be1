"""The OpenAI-compatible HTTP API (FastAPI): ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

The request and response shapes follow OpenAI's API reference (and what its Python SDK parses): streaming as
server-sent events ``data: {chunk}`` ending with ``data: [DONE]``; with ``stream_options.include_usage`` every
chunk carries ``"usage": null`` and one extra final chunk with ``"choices": []`` carries the usage; stop strings
are cut from the text (streamed text never contains any part of one); errors are
``{"error": {"message", "type", "param", "code"}}`` with status 400 (bad parameter, malformed JSON, prompt too
long: ``code = "context_length_exceeded"``), 401 (API key), 404 (unknown model or route), 413 (body too large),
429 (too many waiting requests), 500 (engine failure).

Extensions, as vLLM names them: ``top_k`` (int, 0 = off). Prefix-cache hits are reported in
``usage.prompt_tokens_details.cached_tokens``; with a draft model, ``usage.completion_tokens_details`` has
``accepted_prediction_tokens`` and ``rejected_prediction_tokens``. Logprobs are the model's own distribution
(log-softmax of the logits before temperature and top-k/top-p).

Not supported (a clear 400): ``echo`` with ``logprobs``, ``suffix``, ``logit_bias``, non-zero
``presence_penalty`` / ``frequency_penalty``, ``best_of`` other than ``n``, tools and response formats.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from mani_jax.inference.engine import MAX_TOP_LOGPROBS, SamplingParams
from mani_jax.serve.async_engine import AsyncEngine, QueueFull, TokenEvent
from mani_jax.serve.text import TextCodec, TextStream

#: Largest ``n`` (choices per request) accepted.
MAX_N = 16
#: Largest request body accepted, bytes (413 above).
MAX_BODY_BYTES = 4 << 20


class APIError(Exception):
    """An error returned to the client as OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------- schemas
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


Stop = str | Annotated[list[str], Field(max_length=4)] | None


class _Common(_Strict):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    logit_bias: dict[str, float] | None = None


# ---------------------------------------------------------------------------------------------- server state
class ServerState:
    """What the routes need: the model's name, text codec, async engine, settings."""

    def __init__(self, engine: AsyncEngine, codec: TextCodec, model_name: str, *, api_key: str | None = None,
                 speculative: bool = False, fingerprint: str | None = None):
        self.engine, self.codec, self.model_name = engine, codec, model_name
        self.api_key, self.speculative = api_key, speculative
        self.created = int(time.time())
        self.fingerprint = fingerprint or f"fp_mani_jax_{uuid.uuid4().hex[:10]}"
        self.max_seq_len = engine.engine.max_seq_len


def _check_common(req: _Common, state: ServerState) -> list[str]:
    if req.model != state.model_name:
        raise APIError(404, f"The model `{req.model}` does not exist (this server serves `{state.model_name}`)",
                       param="model", code="model_not_found")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise APIError(400, f"{name} is not supported (only 0)", param=name, code="unsupported_parameter")
    if getattr(req, "logit_bias", None):
        raise APIError(400, "logit_bias is not supported", param="logit_bias", code="unsupported_parameter")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return stop


def _check_length(prompt: list[int], max_tokens: int | None, state: ServerState, param: str) -> int:
    """The number of tokens to generate; raises 400 ``context_length_exceeded`` when they do not fit."""
    limit = state.max_seq_len
    if len(prompt) >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your prompt has "
                       f"{len(prompt)} tokens.", param=param, code="context_length_exceeded")
    if max_tokens is None:
        return limit - len(prompt)
    if len(prompt) + max_tokens > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} for the "
                       "completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                       code="context_length_exceeded")
    return max_tokens


def _sampling(req: _Common, state: ServerState, max_new: int, index: int, logprobs: int | None) -> SamplingParams:
    seed = (req.seed + index) % 2**32 if req.seed is not None else secrets.randbits(32)
    return SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=seed,
                          max_new_tokens=max_new, stop_token_ids=state.codec.eos_ids, logprobs=logprobs)


class _Choice:
    """One generated sequence: its detokenizer, counters and collected logprobs."""

    def __init__(self, index: int, prompt: list[int], stop: list[str], state: ServerState):
        self.index, self.prompt = index, prompt
        self.stream = TextStream(state.codec, stop, context=prompt)
        self.n_tokens = 0
        self.finish_reason: str | None = None
        self.logprobs: list[tuple[int, tuple]] = []  # (token, (lp, ids, lps)) of tokens whose text was produced
        self.prefix_hit = 0
        self.accepted = self.rejected = 0

    def feed(self, ev: TokenEvent, codec: TextCodec) -> tuple[str, list]:
        """Apply one event; returns (text delta, new logprob entries)."""
        self.prefix_hit = ev.prefix_hit_tokens
        self.accepted, self.rejected = ev.accepted, ev.rejected
        delta, new_lp = "", []
        if ev.token is not None and not self.stream.stopped:
            self.n_tokens += 1
            is_eos = ev.finish_reason == "stop" and ev.token in codec.eos_ids
            if not is_eos:
                delta = self.stream.push(ev.token)
                if ev.logprobs is not None:
                    new_lp.append((ev.token, ev.logprobs))
            self.logprobs.extend(new_lp)
        if self.stream.stopped:
            self.finish_reason = "stop"
        elif ev.finish_reason is not None:
            self.finish_reason = {"stop": "stop", "length": "length"}.get(ev.finish_reason, ev.finish_reason)
            delta += self.stream.flush()
        return delta, new_lp

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def _chat_logprobs(entries, codec: TextCodec) -> dict:
    def item(tok, lp):
        b = codec.token_bytes(tok)
        return {"token": b.decode("utf-8", "replace"), "logprob": lp, "bytes": list(b)}

    content = []
    for tok, (lp, ids, lps) in entries:
        content.append({**item(tok, lp), "top_logprobs": [item(i, p) for i, p in zip(ids, lps)]})
    return {"content": content, "refusal": None}


def _completion_logprobs(entries, codec: TextCodec, offset0: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    off = offset0
    for tok, (lp, ids, lps) in entries:
        s = codec.token_str(tok)
        tokens.append(s)
        token_lps.append(lp)
        tops.append({codec.token_str(i): p for i, p in zip(ids, lps)})
        offsets.append(off)
        off += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _usage(choices: list[_Choice], n_prompt_tokens: int, state: ServerState) -> dict:
    completion = sum(c.n_tokens for c in choices)
    usage: dict[str, Any] = {"prompt_tokens": n_prompt_tokens, "completion_tokens": completion,
                             "total_tokens": n_prompt_tokens + completion,
                             "prompt_tokens_details": {"cached_tokens": sum(c.prefix_hit for c in choices)}}
    if state.speculative:
        usage["completion_tokens_details"] = {"accepted_prediction_tokens": sum(c.accepted for c in choices),
                                              "rejected_prediction_tokens": sum(c.rejected for c in choices)}
    return usage


async def _submit_all(state: ServerState, jobs: list[tuple[list[int], SamplingParams]]):
    """Submit every choice; one shared queue receives ``(choice index, event)``. Cancels all on failure."""
    merged: asyncio.Queue = asyncio.Queue()
    rids: list[int] = []

    async def pump(i: int, q: asyncio.Queue):
        while True:
            ev = await q.get()
            await merged.put((i, ev))
            if ev.finish_reason is not None:
                return

    tasks = []
    try:
        for i, (prompt, params) in enumerate(jobs):
            rid, q = state.engine.submit(prompt, params)
            rids.append(rid)
            tasks.append(asyncio.ensure_future(pump(i, q)))
    except QueueFull as exc:
        _cancel(state, rids, tasks)
        raise APIError(429, f"Too many requests are waiting ({exc}); retry later", type="rate_limit_exceeded",
                       code="rate_limit_exceeded") from None
    except ValueError as exc:
        _cancel(state, rids, tasks)
        raise APIError(400, str(exc), code="context_length_exceeded" if "exceeds" in str(exc) else None) from None
    return merged, rids, tasks


def _cancel(state: ServerState, rids: list[int], tasks: list) -> None:
    for rid in rids:
        state.engine.cancel(rid)
    for t in tasks:
        t.cancel()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ---------------------------------------------------------------------------------------------- the app
def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application serving ``state``'s model (see the module docstring for the API)."""
    app = FastAPI(title="mani_jax", docs_url=None, redoc_url=None)
    app.state.server = state

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return JSONResponse(APIError(400, f"Invalid JSON body: {first.get('msg', '')}",
                                         code="invalid_json").body(), status_code=400)
        param = ".".join(loc) or None
        msg = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            msg = f"Unrecognized request argument supplied: {param}"
        return JSONResponse(APIError(400, msg, param=param, code=first.get("type")).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(APIError(exc.status_code, str(exc.detail), code=code).body(),
                            status_code=exc.status_code)

    @app.middleware("http")
    async def _limits(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            return JSONResponse(APIError(413, f"Request body of {size} bytes exceeds {MAX_BODY_BYTES} bytes",
                                         code="request_too_large").body(), status_code=413)
        try:
            return await call_next(request)
        except APIError as exc:  # raised outside a route (should not happen) still gets OpenAI's body
            return JSONResponse(exc.body(), status_code=exc.status)

    async def auth(request: Request):
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {state.api_key}":
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def list_models():
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(auth)])
    async def get_model(model_id: str):
        if model_id != state.model_name:
            raise APIError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")
        return _model_card(state)

    @app.get("/health")
    async def health():
        return {"status": "ok", **state.engine.stats()}

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(req: CompletionRequest, request: Request):
        stop = _check_common(req, state)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix", code="unsupported_parameter")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of other than n is not supported", param="best_of",
                           code="unsupported_parameter")
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported", param="echo", code="unsupported_parameter")
        prompts = _completion_prompts(req.prompt, state)
        if len(prompts) * req.n > MAX_N:
            raise APIError(400, f"len(prompt) * n = {len(prompts) * req.n} exceeds {MAX_N}", param="n")
        jobs, meta = [], []
        for p_i, prompt in enumerate(prompts):
            max_new = _check_length(prompt, req.max_tokens, state, "prompt")
            for j in range(req.n):
                jobs.append((prompt, _sampling(req, state, max_new, len(jobs), req.logprobs)))
                meta.append(p_i)
        n_prompt = sum(len(p) for p in prompts)
        choices = [_Choice(i, jobs[i][0], stop, state) for i in range(len(jobs))]
        echo = [state.codec.decode(p) if req.echo else "" for p in prompts]
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        merged, rids, tasks = await _submit_all(state, jobs)

        def chunk(i, text, lp_entries, finish):
            c = choices[i]
            lp = None
            if req.logprobs is not None:
                lp = _completion_logprobs(lp_entries, state.codec, len(c.stream.text) - len(text))
            return {"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                    "system_fingerprint": state.fingerprint,
                    "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def events():
                try:
                    for i, c in enumerate(choices):
                        if echo[meta[i]]:
                            yield _sse({**chunk(i, echo[meta[i]], [], None)} | _null_usage(include_usage))
                    while not all(c.done for c in choices):
                        i, ev = await merged.get()
                        if ev.error:
                            yield _sse(APIError(500, ev.error, type="server_error").body())
                            return
                        delta, lp = choices[i].feed(ev, state.codec)
                        if choices[i].stream.stopped and ev.finish_reason is None:
                            state.engine.cancel(rids[i])  # a stop string: generate no further
                        if delta or lp or choices[i].done:
                            yield _sse(chunk(i, delta, lp, choices[i].finish_reason) | _null_usage(include_usage))
                    if include_usage:
                        yield _sse({"id": cid, "object": "text_completion", "created": created,
                                    "model": state.model_name, "system_fingerprint": state.fingerprint,
                                    "choices": [], "usage": _usage(choices, n_prompt, state)})
                    yield "data: [DONE]\n\n"
                finally:
                    _cancel(state, rids, tasks)

            return StreamingResponse(events(), media_type="text/event-stream")

        await _collect(choices, merged, rids, state, request)
        _cancel(state, rids, tasks)
        out = []
        for i, c in enumerate(choices):
            lp = _completion_logprobs(c.logprobs, state.codec, len(echo[meta[i]])) if req.logprobs is not None \
                else None
            out.append({"index": i, "text": echo[meta[i]] + c.stream.text, "logprobs": lp,
                        "finish_reason": c.finish_reason})
        return {"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                "system_fingerprint": state.fingerprint, "choices": out, "usage": _usage(choices, n_prompt, state)}

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        stop = _check_common(req, state)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens disagree; send one",
                           param="max_completion_tokens")
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in req.messages]
        try:
            prompt = state.codec.encode_chat(messages)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        max_new = _check_length(prompt, req.max_completion_tokens or req.max_tokens, state, "messages")
        n_lp = (req.top_logprobs or 0) if req.logprobs else None
        jobs = [(prompt, _sampling(req, state, max_new, i, n_lp)) for i in range(req.n)]
        choices = [_Choice(i, prompt, stop, state) for i in range(req.n)]
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        merged, rids, tasks = await _submit_all(state, jobs)

        def chunk(i, delta, lp_entries, finish):
            lp = _chat_logprobs(lp_entries, state.codec) if req.logprobs and lp_entries else None
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                    "system_fingerprint": state.fingerprint,
                    "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def events():
                try:
                    for i in range(req.n):
                        yield _sse(chunk(i, {"role": "assistant", "content": ""}, [], None)
                                   | _null_usage(include_usage))
                    while not all(c.done for c in choices):
                        i, ev = await merged.get()
                        if ev.error:
                            yield _sse(APIError(500, ev.error, type="server_error").body())
                            return
                        text, lp = choices[i].feed(ev, state.codec)
                        if choices[i].stream.stopped and ev.finish_reason is None:
                            state.engine.cancel(rids[i])  # a stop string: generate no further
                        if text or lp:
                            yield _sse(chunk(i, {"content": text}, lp, None) | _null_usage(include_usage))
                        if choices[i].done:
                            yield _sse(chunk(i, {}, [], choices[i].finish_reason) | _null_usage(include_usage))
                    if include_usage:
                        yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                    "model": state.model_name, "system_fingerprint": state.fingerprint,
                                    "choices": [], "usage": _usage(choices, len(prompt), state)})
                    yield "data: [DONE]\n\n"
                finally:
                    _cancel(state, rids, tasks)

            return StreamingResponse(events(), media_type="text/event-stream")

        await _collect(choices, merged, rids, state, request)
        _cancel(state, rids, tasks)
        out = [{"index": i, "message": {"role": "assistant", "content": c.stream.text, "refusal": None},
                "logprobs": _chat_logprobs(c.logprobs, state.codec) if req.logprobs else None,
                "finish_reason": c.finish_reason} for i, c in enumerate(choices)]
        return {"id": cid, "object": "chat.completion", "created": created, "model": state.model_name,
                "system_fingerprint": state.fingerprint, "choices": out,
                "usage": _usage(choices, len(prompt), state)}

    return app


def _null_usage(include_usage: bool) -> dict:
    return {"usage": None} if include_usage else {}


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "mani_jax",
            "max_model_len": state.max_seq_len}


def _completion_prompts(prompt, state: ServerState) -> list[list[int]]:
    """``prompt`` as OpenAI allows it (a string, strings, token ids, lists of token ids) -> token-id lists."""
    if isinstance(prompt, str):
        prompts = [state.codec.encode(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [state.codec.encode(p) for p in prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    elif prompt and all(isinstance(p, list) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise APIError(400, "prompt: expected a non-empty string, list of strings, or list(s) of token ids",
                       param="prompt")
    for p in prompts:
        if not p:
            raise APIError(400, "prompt: an empty prompt has no token to continue from", param="prompt")
        if min(p) < 0 or max(p) >= state.engine.engine.config.vocab_size:
            raise APIError(400, f"prompt: token ids must lie in [0, {state.engine.engine.config.vocab_size})",
                           param="prompt")
    return prompts


async def _collect(choices: list[_Choice], merged: asyncio.Queue, rids: list[int], state: ServerState,
                   request: Request) -> None:
    """Run every choice to completion (non-streaming); cancels the work if the client disconnects."""
    while not all(c.done for c in choices):
        try:
            i, ev = await asyncio.wait_for(merged.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise APIError(499, "client disconnected") from None
            continue
        if ev.error:
            raise APIError(500, ev.error, type="server_error")
        choices[i].feed(ev, state.codec)
        if choices[i].stream.stopped and ev.finish_reason is None:
            state.engine.cancel(rids[i])
            choices[i].finish_reason = "stop"
