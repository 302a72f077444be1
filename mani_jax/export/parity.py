"""Run a GGUF file in llama.cpp (llama-cpp-python) and compare it with the JAX model it came from.

Recipe (``notes/gguf-llamacpp.md`` section 6): ``Llama(..., logits_all=True)``, ``reset()``, ``eval(ids)``,
``llm.scores`` (row ``t`` predicts token ``t+1``); greedy decoding with ``generate(ids, temp=0.0, top_k=1,
repeat_penalty=1.0)``; ``close()`` when done. The logit comparison runs with an F32 KV cache (it measures the
export, not llama.cpp's F16 cache); greedy decoding and the timings use a second ``Llama`` with llama.cpp's
defaults (F16 KV cache, no ``logits_all``, so the prompt pass computes only the last position's logits, as in
real use), after one warm-up call.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

__all__ = ["compare_with_llama_cpp", "llama_cpp_logits", "llama_cpp_greedy", "open_llama", "logit_metrics"]


def _import_llama():
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise ImportError("running GGUF files needs llama-cpp-python==0.3.36 (pip install 'mani_jax[gguf]')") from e
    return Llama


@contextlib.contextmanager
def open_llama(gguf_path, *, n_ctx: int = 512, n_threads: int = 2, logits_all: bool = True,
               n_batch: int = 512, kv_cache_f32: bool = True) -> Iterator:
    """A ``llama_cpp.Llama`` on the CPU for ``gguf_path``, closed on exit.

    ``kv_cache_f32``: keep the attention KV cache in F32 (llama.cpp's default is F16, which alone moves the
    logits of an F32 export by ~1e-3 relative); set it False to measure the default configuration.

    Raises:
      FileNotFoundError: no such file.
      ImportError: llama-cpp-python is not installed.
      ValueError: llama.cpp could not load the file (its message is in the exception chain).
    """
    Llama = _import_llama()
    p = Path(gguf_path)
    if not p.is_file():
        raise FileNotFoundError(f"gguf_path: {str(p)!r} does not exist")
    try:
        llm = Llama(model_path=str(p), n_ctx=int(n_ctx), n_batch=int(n_batch), n_ubatch=int(n_batch),
                    n_threads=int(n_threads), n_threads_batch=int(n_threads), n_gpu_layers=0,
                    logits_all=bool(logits_all), verbose=False,
                    **(dict(type_k=0, type_v=0) if kv_cache_f32 else {}))  # 0 = GGML_TYPE_F32
    except ValueError as e:
        raise ValueError(f"llama.cpp could not load {str(p)!r}: {e}") from e
    try:
        yield llm
    finally:
        llm.close()


def _check_ids(token_ids: Sequence[int], n_vocab: int | None = None) -> list[int]:
    ids = [int(t) for t in token_ids]
    if not ids:
        raise ValueError("token_ids: expected at least one token id")
    if n_vocab is not None:
        bad = [t for t in ids if not 0 <= t < n_vocab]
        if bad:
            raise ValueError(f"token_ids: id {bad[0]} outside [0, {n_vocab})")
    return ids


def llama_cpp_logits(llm_or_path, token_ids: Sequence[int], *, n_threads: int = 2) -> np.ndarray:
    """llama.cpp logits ``float32 [T, n_vocab]`` for ``token_ids`` (row ``t`` predicts token ``t+1``).

    ``llm_or_path``: an open ``Llama`` made with ``logits_all=True`` or a GGUF path (opened and closed here).
    """
    ids = _check_ids(token_ids)
    if isinstance(llm_or_path, (str, Path)):
        with open_llama(llm_or_path, n_ctx=len(ids) + 16, n_threads=n_threads) as llm:
            return llama_cpp_logits(llm, ids)
    llm = llm_or_path
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: llm.n_tokens], dtype=np.float32)


def llama_cpp_greedy(llm, token_ids: Sequence[int], n: int) -> tuple[list[int], float, float]:
    """``n`` greedy tokens after ``token_ids``; returns ``(tokens, time_to_first_token_s, decode_seconds)``.

    ``decode_seconds`` covers tokens 2..n (0.0 when ``n <= 1``).
    """
    ids = _check_ids(token_ids)
    out: list[int] = []
    if n <= 0:
        return out, 0.0, 0.0
    llm.reset()
    t0 = time.perf_counter()
    gen = llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True)
    t_first = t0
    for tok in gen:
        out.append(int(tok))
        if len(out) == 1:
            t_first = time.perf_counter()
        if len(out) >= n:
            break
    t_end = time.perf_counter()
    gen.close()
    return out, t_first - t0, (t_end - t_first) if n > 1 else 0.0


def logit_metrics(ref: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Agreement of two logit arrays ``[T, V]``: ``ref`` (JAX) against ``test`` (llama.cpp).

    ``max_rel_logit_diff = max|ref - test| / max|ref|``; ``top1_agreement`` = fraction of rows with the same
    argmax; ``mean_kl`` = mean over rows of ``KL(softmax(ref) || softmax(test))`` in nats.
    """
    ref = np.asarray(ref, np.float64)
    test = np.asarray(test, np.float64)
    if ref.shape != test.shape:
        raise ValueError(f"logits: shapes differ, {ref.shape} vs {test.shape}")
    lp = ref - ref.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = test - test.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {
        "max_rel_logit_diff": float(np.abs(ref - test).max() / max(np.abs(ref).max(), 1e-30)),
        "top1_agreement": float((ref.argmax(-1) == test.argmax(-1)).mean()),
        "mean_kl": float(max(kl.mean(), 0.0)),
    }


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare_with_llama_cpp(model, gguf_path, token_ids: Sequence[int], *, n_greedy: int = 64,
                           n_threads: int = 2) -> dict:
    """Compare a JAX model with its GGUF export run by llama.cpp on the CPU.

    Args:
      model: the :class:`~mani_jax.models.HybridLM` that was exported.
      gguf_path: the exported file.
      token_ids: a passage (include BOS yourself); logits are compared at every position, and greedy decoding
        continues it.
      n_greedy: greedy tokens to generate with both (``len(token_ids) + n_greedy <= model.config.max_seq_len``).
      n_threads: llama.cpp threads.

    Returns:
      ``{"max_rel_logit_diff", "top1_agreement", "mean_kl"}`` (see :func:`logit_metrics`; KL(jax || llama.cpp)
      per position, nats), ``"greedy_match_tokens"`` (length of the common prefix of the two greedy
      continuations, out of ``n_greedy``), ``"prompt_tokens_per_second"`` (llama.cpp prompt pass),
      ``"decode_tokens_per_second"`` (greedy tokens 2..n), ``"time_to_first_token_s"`` (prompt pass + first
      sample, after a warm-up call), and ``"n_prompt_tokens"``, ``"n_greedy"``, ``"jax_greedy_tokens"``,
      ``"llama_greedy_tokens"``.

    Raises:
      ValueError: empty or out-of-range ``token_ids``, a prompt + ``n_greedy`` beyond ``max_seq_len``, a file
        llama.cpp cannot load, or a vocabulary size that differs from the model's.
      ImportError: llama-cpp-python is not installed.
    """
    import jax.numpy as jnp

    from mani_jax.inference import generate

    cfg = model.config
    ids = _check_ids(token_ids, cfg.vocab_size)
    n_greedy = int(n_greedy)
    if n_greedy < 0:
        raise ValueError(f"n_greedy: expected >= 0, got {n_greedy}")
    if len(ids) + n_greedy > cfg.max_seq_len:
        raise ValueError(f"token_ids: {len(ids)} tokens + n_greedy={n_greedy} exceed max_seq_len={cfg.max_seq_len}")
    ref = np.asarray(model(jnp.asarray([ids], jnp.int32))[0], np.float32)
    jax_tokens = generate(model, ids, n_greedy, temperature=0.0) if n_greedy else []

    n_ctx = len(ids) + n_greedy + 16
    with open_llama(gguf_path, n_ctx=n_ctx, n_threads=n_threads, logits_all=True) as llm:
        if llm.n_vocab() != cfg.vocab_size:
            raise ValueError(f"gguf_path: llama.cpp vocabulary has {llm.n_vocab()} tokens, the model {cfg.vocab_size}")
        got = llama_cpp_logits(llm, ids)
    out = logit_metrics(ref, got)

    with open_llama(gguf_path, n_ctx=n_ctx, n_threads=n_threads, logits_all=False, kv_cache_f32=False) as llm:
        llama_cpp_greedy(llm, ids[: min(len(ids), 8)], 2)  # warm-up: thread pool, graph allocation
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        prompt_s = time.perf_counter() - t0
        llama_tokens, ttft, decode_s = llama_cpp_greedy(llm, ids, n_greedy)
    out.update(
        greedy_match_tokens=_common_prefix(jax_tokens, llama_tokens),
        prompt_tokens_per_second=len(ids) / prompt_s if prompt_s > 0 else float("inf"),
        decode_tokens_per_second=(len(llama_tokens) - 1) / decode_s if decode_s > 0 else 0.0,
        time_to_first_token_s=ttft,
        n_prompt_tokens=len(ids),
        n_greedy=n_greedy,
        jax_greedy_tokens=[int(t) for t in jax_tokens],
        llama_greedy_tokens=llama_tokens,
    )
    return out
