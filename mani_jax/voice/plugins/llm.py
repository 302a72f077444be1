"""Optional local-LLM fallback for open questions no intent matched (not one of the eight plugins).

Uses llama-cpp-python (``llama_cpp.Llama(model_path=...).create_chat_completion``) on a chat GGUF file;
pass an instance as ``PluginHost(..., fallback=LLMFallback(path))``. The model is loaded lazily on first use.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["LLMFallback"]

SYSTEM_PROMPT = "तुम वाणी हो, एक मददगार आवाज़ सहायक। हिंदी में एक-दो छोटे वाक्यों में जवाब दो।"


class LLMFallback:
    """``callable(text) -> str | None`` answering with a local chat model.

    Args:
        gguf_path: path of a chat GGUF model file.
        max_tokens: reply length cap (tokens).
        n_ctx: context window (tokens).
        system_prompt: system message (Hindi by default).

    Raises:
        FileNotFoundError: if ``gguf_path`` does not exist.
    """

    def __init__(self, gguf_path: str | Path, *, max_tokens: int = 96, n_ctx: int = 1024,
                 system_prompt: str = SYSTEM_PROMPT):
        self.gguf_path = Path(gguf_path)
        if not self.gguf_path.is_file():
            raise FileNotFoundError(f"gguf_path does not exist: {self.gguf_path}")
        self.max_tokens, self.n_ctx, self.system_prompt = max_tokens, n_ctx, system_prompt
        self._llm = None

    def __call__(self, text: str) -> str | None:
        """Answer ``text``; ``None`` for empty input or an empty completion."""
        if not text or not text.strip():
            return None
        if self._llm is None:
            from llama_cpp import Llama

            self._llm = Llama(model_path=str(self.gguf_path), n_ctx=self.n_ctx, verbose=False)
        out = self._llm.create_chat_completion(
            messages=[{"role": "system", "content": self.system_prompt}, {"role": "user", "content": text}],
            max_tokens=self.max_tokens, temperature=0.0)
        answer = (out["choices"][0]["message"].get("content") or "").strip()
        return answer or None
