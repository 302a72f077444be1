"""Export to llama.cpp's GGUF (and back), and parity checks against llama.cpp.

Public API (needs the ``gguf`` extra: ``pip install 'mani_jax[gguf]'``)::

    from mani_jax.export import export_gguf, load, inspect, compare_with_llama_cpp, QUANT_TYPES

    path = export_gguf(model, tokenizer, "model.gguf", quant="q4_0")   # granitehybrid / granite / llama
    model2, tokenizer2 = load("model.gguf")                             # GGUF -> HybridLM (dequantized)
    stats = compare_with_llama_cpp(model, "model.gguf", ids)            # logits, KL, greedy, speed

Command line: ``python -m mani_jax.export --checkpoint RUN_DIR --out FILE.gguf --quant q4_0`` (see
``python -m mani_jax.export --help``). Names are resolved lazily so ``import mani_jax.export`` works without
gguf-py installed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["QUANT_TYPES", "SUPPORTED_ARCHS", "compare_with_llama_cpp", "export_gguf", "inspect", "llama_cpp_logits",
           "load", "logit_metrics", "select_arch"]

_GGUF_NAMES = {"QUANT_TYPES", "SUPPORTED_ARCHS", "export_gguf", "inspect", "load", "select_arch"}
_PARITY_NAMES = {"compare_with_llama_cpp", "llama_cpp_logits", "logit_metrics"}


def __getattr__(name: str) -> Any:
    if name in _GGUF_NAMES:
        from mani_jax.export import gguf as _gguf

        return getattr(_gguf, name)
    if name in _PARITY_NAMES:
        from mani_jax.export import parity as _parity

        return getattr(_parity, name)
    raise AttributeError(f"module 'mani_jax.export' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
