"""OpenAI-compatible HTTP server for mani_jax models: ``python -m mani_jax.serve --model PATH``.

:func:`build_state` loads a model (chimera run directory, GGUF file or Hugging Face directory), builds and
warms the :class:`~mani_jax.inference.engine.Engine` and starts its thread; :func:`create_app` returns the
FastAPI application (:mod:`mani_jax.serve.app` documents the API).
"""

from mani_jax.serve.app import APIError, ServerState, create_app
from mani_jax.serve.async_engine import AsyncEngine, QueueFull
from mani_jax.serve.loading import load_model, load_run
from mani_jax.serve.server import build_state, serve
from mani_jax.serve.text import TextCodec, TextStream

__all__ = ["APIError", "AsyncEngine", "QueueFull", "ServerState", "TextCodec", "TextStream", "build_state",
           "create_app", "load_model", "load_run", "serve"]
