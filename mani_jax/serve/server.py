"""Build a served model and run it under uvicorn (the ``python -m mani_jax.serve`` entry point)."""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path

log = logging.getLogger("mani_jax.serve")


def build_state(model, tokenizer, *, model_name: str, draft=None, api_key: str | None = None,
                max_batch: int = 8, page_size: int = 16, max_seq_len: int | None = None,
                prefill_budget: int = 64, prefix_caching: bool = True, max_waiting: int = 64,
                gamma: int | str = 4, warmup: bool = True):
    """A :class:`~mani_jax.serve.app.ServerState`: engine (speculative when ``draft`` is given), its thread,
    the text codec.

    Args:
      model, tokenizer: the served model and its tokenizer (:func:`mani_jax.serve.loading.load_model`).
      model_name: the id clients send as ``model``.
      draft: optional draft :class:`~mani_jax.models.HybridLM` (same vocabulary) for speculative decoding.
      gamma: draft tokens per step, or ``"adaptive"``.
      Others: :class:`~mani_jax.inference.engine.Engine` and :class:`~mani_jax.serve.async_engine.AsyncEngine`.

    Raises:
      ValueError: the tokenizer has more ids than the model embeds, or the draft's vocabulary differs.
    """
    from mani_jax.inference.engine import Engine
    from mani_jax.serve.app import ServerState
    from mani_jax.serve.async_engine import AsyncEngine
    from mani_jax.serve.text import TextCodec

    codec = TextCodec(tokenizer)
    if codec.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer: {codec.vocab_size} ids but the model embeds {model.config.vocab_size}")
    kwargs = dict(max_batch=max_batch, page_size=page_size, max_seq_len=max_seq_len, prefill_budget=prefill_budget,
                  prefix_caching=prefix_caching)
    if draft is not None:
        if draft.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"draft: vocab_size {draft.config.vocab_size} differs from the model's "
                             f"{model.config.vocab_size}")
        engine = Engine(model, draft=draft, gamma=gamma, **kwargs)
    else:
        engine = Engine(model, **kwargs)
    if warmup:
        engine.warmup()
    digest = hashlib.sha256(f"{model_name}:{model.config}".encode()).hexdigest()[:10]
    return ServerState(AsyncEngine(engine, max_waiting=max_waiting), codec, model_name, api_key=api_key,
                       speculative=draft is not None, fingerprint=f"fp_{digest}")


def serve(argv=None) -> None:
    """Parse the command line, load the model(s), serve until interrupted."""
    p = argparse.ArgumentParser(prog="python -m mani_jax.serve",
                                description="OpenAI-compatible server (/v1/models, /v1/completions, "
                                            "/v1/chat/completions) for a mani_jax model.")
    p.add_argument("--model", required=True, help="chimera run directory, .gguf file or Hugging Face directory")
    p.add_argument("--draft", help="draft model (same formats, same tokenizer) for speculative decoding")
    p.add_argument("--gamma", default="4", help="draft tokens per step, or 'adaptive' (default 4)")
    p.add_argument("--served-model-name", help="model id clients send (default: the model path's name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: no key)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, help="longest prompt + completion (default: the model's)")
    p.add_argument("--prefill-budget", type=int, default=64, help="prompt tokens prefilled per step")
    p.add_argument("--max-waiting", type=int, default=64, help="queued requests before answering 429")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)

    import uvicorn

    from mani_jax.serve.app import create_app
    from mani_jax.serve.loading import load_model

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gamma = args.gamma if args.gamma == "adaptive" else int(args.gamma)
    log.info("loading %s", args.model)
    model, tokenizer, kind = load_model(args.model)
    draft = None
    if args.draft:
        log.info("loading draft %s", args.draft)
        draft = load_model(args.draft)[0]
    name = args.served_model_name or Path(args.model).name
    log.info("building the engine (%s model, compiling its programs)", kind)
    state = build_state(model, tokenizer, model_name=name, draft=draft, api_key=args.api_key,
                        max_batch=args.max_batch, page_size=args.page_size, max_seq_len=args.max_seq_len,
                        prefill_budget=args.prefill_budget, prefix_caching=not args.no_prefix_caching,
                        max_waiting=args.max_waiting, gamma=gamma)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the model",
                    args.host)
    log.info("serving %r on http://%s:%d/v1", name, args.host, args.port)
    try:
        uvicorn.run(create_app(state), host=args.host, port=args.port, log_level=args.log_level.lower())
    finally:
        state.engine.close()
