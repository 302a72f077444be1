"""Load a model and its tokenizer from any of the formats the project writes or reads.

* a ``python -m experiments.chimera`` run directory (``model_config.json``, ``tokenizer.model``, orbax
  checkpoints under ``checkpoints/``);
* a GGUF file written by :func:`mani_jax.export.export_gguf` (or a dense ``qwen2`` / ``llama`` GGUF), read
  back with :func:`mani_jax.export.gguf.load`;
* a Hugging Face directory (``config.json`` + safetensors + ``tokenizer.json``) of an architecture
  :func:`mani_jax.models.hf.load_hf` supports (Qwen2, GraniteMoeHybrid, Mixtral).
"""

from __future__ import annotations

import json
from pathlib import Path


def load_run(run_dir: str | Path):
    """The trained model and tokenizer of a chimera run directory (its latest checkpoint).

    Returns:
      ``(model, tokenizer)``: a :class:`~mani_jax.models.HybridLM` and a :class:`~mani_jax.tokenizer.Tokenizer`.

    Raises:
      FileNotFoundError: the directory lacks ``model_config.json`` or ``tokenizer.model``.
    """
    from flax import nnx

    from mani_jax.models import HybridLM, config_from_dict
    from mani_jax.tokenizer import Tokenizer
    from mani_jax.train import restore_checkpoint

    run_dir = Path(run_dir)
    for name in ("model_config.json", "tokenizer.model"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{str(run_dir)!r}: no {name} (expected a chimera run directory)")
    model = HybridLM(config_from_dict(json.loads((run_dir / "model_config.json").read_text())), rngs=nnx.Rngs(0))
    restore_checkpoint(run_dir, model)
    return model, Tokenizer.load(run_dir / "tokenizer.model")


def load_model(path: str | Path):
    """``(model, tokenizer, kind)`` from a run directory, a ``.gguf`` file or a Hugging Face directory.

    ``kind`` is ``"run"``, ``"gguf"`` or ``"hf"``.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: ``path`` is none of the three formats, or the file has no usable tokenizer (a GGUF without
        a vocabulary, or with one that is not SentencePiece: serve such a model from its HF directory).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model: {str(path)!r} does not exist")
    if path.is_file():
        from mani_jax.export.gguf import load

        model, tok = load(path)
        if tok is None or isinstance(tok, list):
            raise ValueError(f"model: {str(path)!r} has no SentencePiece vocabulary the server can encode with")
        return model, tok, "gguf"
    if (path / "model_config.json").is_file():
        model, tok = load_run(path)
        return model, tok, "run"
    if (path / "config.json").is_file():
        from mani_jax.models.hf import load_hf_with_tokenizer

        model, tok = load_hf_with_tokenizer(path)
        return model, tok, "hf"
    raise ValueError(f"model: {str(path)!r} is not a chimera run directory (model_config.json), a Hugging Face "
                     "directory (config.json) or a .gguf file")
