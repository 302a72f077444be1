"""``python -m mani_jax.export``: write a GGUF file for llama.cpp from a training run or a Hugging Face directory.

Examples::

    python -m mani_jax.export --checkpoint runs/chimera --out chimera-q4_0.gguf --quant q4_0
    python -m mani_jax.export --hf ~/models/granite-4.0-h-tiny --tokenizer spm.model --out g.gguf --quant q8_0

A run directory (``python -m experiments.chimera --out RUN_DIR``) holds ``model_config.json``,
``tokenizer.model`` and ``checkpoints/``; the newest checkpoint is exported unless ``--step`` says otherwise.
A Hugging Face directory (Granite-4.0-H / GraniteMoeHybrid dense, or Qwen2) is read by
:func:`mani_jax.models.load_hf`; its SentencePiece ``tokenizer.model`` is used when present, else ``--tokenizer``;
``--no-tokenizer`` writes a placeholder vocabulary (token ids only). The file is written to a temporary name
beside ``--out`` and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    from mani_jax.export.gguf import QUANT_TYPES

    p = argparse.ArgumentParser(prog="python -m mani_jax.export",
                                description="Write a GGUF file for llama.cpp from a training run or a Hugging "
                                            "Face directory.",
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="RUN_DIR", help="training run directory (model_config.json, "
                     "tokenizer.model, checkpoints/)")
    src.add_argument("--hf", metavar="HF_DIR", help="Hugging Face checkpoint directory (config.json + safetensors)")
    p.add_argument("--out", required=True, metavar="FILE.gguf", help="output GGUF file")
    p.add_argument("--quant", default="f16", choices=list(QUANT_TYPES), help="tensor type (default f16)")
    p.add_argument("--tokenizer", metavar="SPM_MODEL", help="SentencePiece .model to embed (default: the run's or "
                   "the HF directory's tokenizer.model)")
    p.add_argument("--no-tokenizer", action="store_true", help="write a placeholder vocabulary instead")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to export (default: newest)")
    p.add_argument("--name", default=None, help="general.name (default: the source directory's name)")
    p.add_argument("--chat-template", metavar="FILE", default=None, help="Jinja chat template file to embed")
    p.add_argument("--arch", default=None, choices=["granitehybrid", "granite", "llama"],
                   help="force the llama.cpp architecture (default: chosen from the model)")
    p.add_argument("--threads", type=int, default=0, help="threads for llama.cpp's K-quantizer (0 = all)")
    return p


def _load_checkpoint(run_dir: Path, step: int | None):
    from flax import nnx

    from mani_jax.models import HybridLM, config_from_dict
    from mani_jax.train import restore_checkpoint

    if not run_dir.is_dir():
        raise FileNotFoundError(f"--checkpoint: run directory {str(run_dir)!r} does not exist")
    cfg_file = run_dir / "model_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"--checkpoint: {str(cfg_file)!r} not found (expected a run directory written by "
                                "python -m experiments.chimera)")
    try:
        cfg = config_from_dict(json.loads(cfg_file.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"--checkpoint: {str(cfg_file)!r} is not valid JSON ({e})") from e
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    restore_checkpoint(run_dir, model, step=step)
    return model


def main(argv: list[str] | None = None) -> Path:
    """Run the exporter; returns the written path.

    Raises:
      FileNotFoundError: a missing run/HF directory, checkpoint or tokenizer file.
      ValueError: bad arguments or a model the exporter cannot write (see :func:`export_gguf`).
    """
    args = _parser().parse_args(argv)
    from mani_jax.export.gguf import export_gguf, select_arch
    from mani_jax.tokenizer import Tokenizer

    if args.tokenizer and args.no_tokenizer:
        raise ValueError("--tokenizer and --no-tokenizer are mutually exclusive")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out: directory {str(out.parent)!r} does not exist")
    if args.checkpoint:
        src = Path(args.checkpoint)
        model = _load_checkpoint(src, args.step)
    else:
        from mani_jax.models import load_hf

        src = Path(args.hf)
        if not src.is_dir():
            raise FileNotFoundError(f"--hf: directory {str(src)!r} does not exist")
        if args.step is not None:
            raise ValueError("--step applies to --checkpoint only")
        model = load_hf(src)
    tokenizer = None
    if not args.no_tokenizer:
        tok_path = Path(args.tokenizer) if args.tokenizer else src / "tokenizer.model"
        if not tok_path.is_file():
            flag = "--tokenizer" if args.tokenizer else ("--checkpoint" if args.checkpoint else "--hf")
            raise FileNotFoundError(f"{flag}: SentencePiece model {str(tok_path)!r} not found; pass --tokenizer "
                                    "SPM_MODEL, or --no-tokenizer for a placeholder vocabulary")
        tokenizer = Tokenizer.load(tok_path)
    chat_template = None
    if args.chat_template:
        ct = Path(args.chat_template)
        if not ct.is_file():
            raise FileNotFoundError(f"--chat-template: {str(ct)!r} not found")
        chat_template = ct.read_text()
    name = args.name or src.resolve().name
    path = export_gguf(model, tokenizer, out, quant=args.quant, name=name, chat_template=chat_template,
                       arch=args.arch, n_threads=args.threads)
    arch = args.arch or select_arch(model.config)
    print(f"wrote {path} ({path.stat().st_size:,} bytes; arch={arch}, quant={args.quant}, "
          f"layers={''.join('A' if t == 'attention' else 'M' for t in model.config.layer_types)})")
    return path


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
