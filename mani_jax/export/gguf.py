"""GGUF export of :class:`~mani_jax.models.HybridLM` for llama.cpp, and the way back (GGUF -> JAX).

Which llama.cpp architecture holds which model (the facts are in ``notes/gguf-llamacpp.md``, checked against
the llama.cpp that llama-cpp-python 0.3.36 vendors, ``src/models/{granite-hybrid,granite,granite-moe,llama}.cpp``):

=====================================================  ===============  ==========================================
model                                                  ``arch``         why
=====================================================  ===============  ==========================================
Mamba-2 and attention layers (the Chimera hybrid)      granitehybrid    the only arch with per-layer "Mamba-2 or
                                                                        attention" + SwiGLU FFN; layer ``i`` is
                                                                        Mamba-2 iff ``head_count_kv[i] == 0``
all attention, RoPE on, default Granite scalars        llama            the general dense decoder (q/k/v/o and
                                                                        FFN biases optional, any head_dim)
all attention, NoPE or non-default Granite scalars     granite          llama's graph + ``embedding_scale``,
                                                                        ``attention.scale``, ``residual_scale``,
                                                                        ``logit_scale`` and the RoPE on/off switch
all attention + experts (Mixtral), RoPE on, default    llama            ``expert_count``/``expert_used_count``;
Granite scalars, no shared MLP                                          llama's graph has no shared expert
all attention + experts, with a shared MLP, NoPE or    granite          its graph also runs experts + an
non-default Granite scalars                                             ungated shared expert (``ffn_*_shexp``)
=====================================================  ===============  ==========================================

``granitemoe`` (what llama.cpp's converter names Granite MoE checkpoints) has the same tensors and graph as
``granite`` but ignores ``rope.scaling.finetuned`` (RoPE always on), so it is written only when asked for
(``arch="granitemoe"``) and never for a NoPE model.

Mixture of experts (``ModelConfig.n_experts > 0``; every layer's FFN is routed): ``feed_forward_length`` is the
per-expert width ``d_ff_expert`` (llama.cpp sizes ``ffn_*_exps`` with ``n_ff``), ``expert_count = n_experts``,
``expert_used_count = top_k``; the tensors are ``ffn_gate_inp`` ``(n_experts, d_model)`` (the router, always
F32 as llama.cpp's quantizer keeps it), ``ffn_gate_exps``/``ffn_up_exps`` ``(n_experts, d_ff_expert, d_model)``
and ``ffn_down_exps`` ``(n_experts, d_model, d_ff_expert)`` (numpy order; each expert's matrix is ``(out, in)``,
so quantized along the input dimension like the dense FFN). A shared MLP (``shared_mlp=True``, Granite-4.0-H)
is written as ``expert_shared_feed_forward_length = d_ff`` and ``ffn_{gate,up}_shexp`` ``(d_ff, d_model)`` /
``ffn_down_shexp`` ``(d_model, d_ff)``: ``granitehybrid``, ``granite`` and ``granitemoe`` add it to the routed
output without a gate, as the JAX model does. llama.cpp routes softmax -> top-k -> renormalise
(``build_moe_ffn`` with ``norm_w=true``, softmax gating), which is the JAX router, and never drops tokens: a
model with a ``capacity_factor`` exports with a warning and runs dropless in llama.cpp. Every layer's FFN is
routed in llama.cpp as in the JAX model (``expert_count > 0`` switches all layers to ``ffn_*_exps``).

All of them use NORM (adjacent-pair) RoPE while the JAX model rotates halves (NEOX), so the q/k projection
rows (weights and biases) are permuted per head (:func:`permute_qk`, the Hugging Face converter's ``permute``);
:func:`load` undoes it. A model with only Mamba-2 layers cannot be exported: llama.cpp's ``granitehybrid`` (like a
granitehybrid file with only attention layers) aborts on its first decode, and ``mamba2`` has no FFN. The scalars
map ``embedding_multiplier -> embedding_scale``, ``attention_multiplier ->
attention.scale`` (softmax scale; absent = ``1/sqrt(head_dim)``), ``residual_multiplier -> residual_scale``
and ``logits_scaling -> logit_scale`` (logits are divided by it); ``rope=False`` writes
``rope.scaling.finetuned = false``.

Tensor types: every 1-D tensor, every norm (including ``ssm_norm``), ``ssm_a``, ``ssm_d``, ``ssm_conv1d``,
``ssm_dt.bias`` and the expert router ``ffn_gate_inp`` stay F32 whatever ``quant`` says (F16
``ssm_a``/``ssm_d``/``ssm_conv1d`` abort llama.cpp's CPU kernels). The other matrices take ``quant``; a matrix whose
rows (the input dimension) are not a multiple of the quant block (32) is written F16 instead, with a warning.
K-quants (``q4_k_m``, ``q6_k``) are made by llama.cpp's own quantizer (``llama_model_quantize`` via
llama-cpp-python) from an F16 export.

Every file is written to a temporary name in the destination directory and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    import gguf
    from gguf import GGMLQuantizationType as _QT
except ImportError as _e:  # pragma: no cover - the extra is not installed
    raise ImportError("mani_jax.export.gguf needs gguf-py: pip install 'mani_jax[gguf]' "
                      "(gguf==0.19.0, pyyaml; llama-cpp-python==0.3.36 for K-quants and parity)") from _e

__all__ = ["QUANT_TYPES", "SUPPORTED_ARCHS", "export_gguf", "load", "inspect", "select_arch",
           "permute_qk", "unpermute_qk"]

#: ``quant`` name -> (GGML type of the quantized matrices, llama ``general.file_type``).
#: ``None`` as the GGML type marks a K-quant made by llama.cpp's quantizer from an F16 export.
QUANT_TYPES: dict[str, tuple[Any, int]] = {
    "f32": (_QT.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (_QT.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (_QT.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (_QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q5_0": (_QT.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (_QT.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (_QT.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_k_m": (None, gguf.LlamaFileType.MOSTLY_Q4_K_M),
    "q6_k": (None, gguf.LlamaFileType.MOSTLY_Q6_K),
}

#: Architectures :func:`export_gguf` writes and :func:`load` reads (``qwen2`` is read only).
SUPPORTED_ARCHS = ("granitehybrid", "granite", "granitemoe", "llama", "qwen2")
_WRITABLE_ARCHS = ("granitehybrid", "granite", "granitemoe", "llama")
_NORM_ROPE_ARCHS = ("granitehybrid", "granite", "granitemoe", "llama")  # q/k rows permuted (NEOX -> NORM)
_GRANITE_ARCHS = ("granite", "granitemoe", "granitehybrid")  # Granite scalars (all but granitemoe: RoPE switch)

#: Metadata key holding our :class:`ModelConfig` as JSON (llama.cpp ignores unknown keys). :func:`load`
#: takes the fields GGUF has no key for (``chunk_size``, ``initializer_range``, ...) from it.
CONFIG_KEY = "mani_jax.model_config"
#: Set to true when the file carries a placeholder vocabulary (exported without a tokenizer).
PLACEHOLDER_VOCAB_KEY = "mani_jax.placeholder_vocab"


# ---------------------------------------------------------------------------------------------------------
# Architecture choice and the tensor plan shared by the writer and the reader
# ---------------------------------------------------------------------------------------------------------

def _default_attention_scale(cfg) -> bool:
    m = cfg.attention_multiplier
    return m is None or math.isclose(m, 1.0 / math.sqrt(cfg.head_dim), rel_tol=1e-6)


def _has_granite_scalars(cfg) -> bool:
    return not (cfg.embedding_multiplier == 1.0 and cfg.residual_multiplier == 1.0 and cfg.logits_scaling == 1.0
                and _default_attention_scale(cfg))


def select_arch(cfg) -> str:
    """The llama.cpp architecture :func:`export_gguf` uses for ``cfg`` (see the module docstring)."""
    if cfg.n_mamba_layers:
        return "granitehybrid"
    if cfg.n_experts:
        return "llama" if (cfg.rope and not _has_granite_scalars(cfg) and not cfg.shared_mlp) else "granite"
    if cfg.rope and not _has_granite_scalars(cfg):
        return "llama"
    return "granite"


def _check_exportable(cfg, arch: str) -> None:
    """Raise ``ValueError`` naming the config field llama.cpp's ``arch`` cannot represent."""
    if arch not in _WRITABLE_ARCHS:
        raise ValueError(f"arch: expected one of {_WRITABLE_ARCHS}, got {arch!r}")
    if cfg.n_experts:
        if cfg.shared_mlp and arch == "llama":
            # llama.cpp src/models/llama.cpp: its MoE branch is build_moe_ffn only (no ffn_*_shexp in the graph).
            raise ValueError("ModelConfig.shared_mlp=True: llama.cpp's 'llama' graph has no shared expert; "
                             "use arch='granite' (the default for this config)")
        if arch == "granitemoe" and not cfg.rope:
            # llama.cpp src/models/granite-moe.cpp never reads rope.scaling.finetuned: RoPE is always applied.
            raise ValueError("ModelConfig.rope=False: llama.cpp's granitemoe always applies RoPE; use arch='granite' "
                             "(the default for this config)")
        if cfg.shared_mlp and cfg.mlp_bias:
            raise ValueError("ModelConfig.mlp_bias=True with shared_mlp: llama.cpp's shared expert (ffn_*_shexp) "
                             "has no biases")
    elif arch == "granitemoe":
        raise ValueError("arch='granitemoe' is for mixture-of-experts models (ModelConfig.n_experts > 0); "
                         "use 'granite' for this dense model")
    if cfg.sliding_window is not None:
        raise ValueError(f"ModelConfig.sliding_window={cfg.sliding_window}: llama.cpp's {arch} has no sliding-window "
                         "attention; export a model with sliding_window=None")
    if cfg.n_mamba_layers and arch != "granitehybrid":
        raise ValueError(f"arch={arch!r} cannot hold Mamba-2 layers; only 'granitehybrid' can")
    if arch == "granitehybrid" and (cfg.n_mamba_layers == 0 or cfg.n_attention_layers == 0):
        # Verified with llama-cpp-python 0.3.36: the model loads, then the first llama_decode aborts the process
        # (GGML_ASSERT(buffer) in llm_graph_input_mem_hybrid::set_input: an empty KV or recurrent cache).
        kind = "Mamba-2" if cfg.n_mamba_layers == 0 else "attention"
        raise ValueError(f"ModelConfig.layer_types has no {kind} layer: llama.cpp's granitehybrid aborts on a model "
                         "without both layer kinds" + ("" if cfg.n_mamba_layers == 0 else
                                                         " (and no other llama.cpp arch holds Mamba-2 + FFN blocks)"))
    if arch == "granitehybrid" and cfg.n_mamba_layers:
        if cfg.expand != 2:
            raise ValueError(f"ModelConfig.expand={cfg.expand}: llama.cpp granitehybrid requires expand == 2 "
                             "(GGML_ASSERT(2*n_embd == d_inner))")
        if cfg.mamba_proj_bias:
            raise ValueError("ModelConfig.mamba_proj_bias=True: llama.cpp granitehybrid has no ssm_in/ssm_out bias")
    if arch == "llama":
        if not cfg.rope:
            raise ValueError("arch='llama' always applies RoPE; a NoPE model (rope=False) needs 'granite'")
        if _has_granite_scalars(cfg):
            raise ValueError("arch='llama' has no embedding/residual/logit scales; use 'granite' for this model")
    if arch in _GRANITE_ARCHS:
        for field in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            if getattr(cfg, field) == 0.0:
                raise ValueError(f"ModelConfig.{field}=0.0: llama.cpp reads a zero scale as 'unset' (1.0)")
        if cfg.attention_multiplier == 0.0:
            raise ValueError("ModelConfig.attention_multiplier=0.0: llama.cpp reads 0 as 'unset' (1/sqrt(head_dim))")
    if cfg.n_experts and cfg.capacity_factor is not None:
        warnings.warn(f"ModelConfig.capacity_factor={cfg.capacity_factor}: llama.cpp routes every token to its "
                      "top-k experts (dropless); the exported model drops no tokens", stacklevel=3)


@dataclass(frozen=True)
class _TensorSpec:
    """One GGUF tensor: its name, the model parameter it comes from, and how it is laid out.

    ``kind``: ``"T"`` (a Dense kernel ``[in, out]`` written ``(out, in)``), ``"q"``/``"k"`` (the same, rows
    permuted NEOX -> NORM), ``"E"`` (stacked expert kernels ``[n_experts, in, out]`` written
    ``(n_experts, out, in)``), ``"qb"``/``"kb"`` (permuted biases), ``"id"`` (as is), ``"ssm_a"`` (``-exp(A_log)``
    as ``(nh, 1)``), ``"col"`` (``(n, 1)``), ``"ssm_norm"`` (``(ng, d_inner/ng)``), ``"zeros"`` (no parameter:
    the conv bias llama.cpp needs when the model has none).
    """

    name: str
    path: tuple | None
    kind: str
    shape: tuple[int, ...]  # numpy shape in the file
    keep_f32: bool


def _tensor_plan(cfg, arch: str) -> list[_TensorSpec]:
    """Every tensor of the GGUF file for ``cfg`` in ``arch``, in file order."""
    d, V = cfg.d_model, cfg.vocab_size
    specs = [_TensorSpec("token_embd.weight", ("embed", "embedding"), "id", (V, d), False)]
    for i, lt in enumerate(cfg.layer_types):
        L, b = ("layers", i), f"blk.{i}."
        specs.append(_TensorSpec(b + "attn_norm.weight", L + ("mixer_norm", "weight"), "id", (d,), True))
        if lt == "attention":
            nq, nkv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
            permute = arch in _NORM_ROPE_ARCHS
            for proj, short, rows in (("q_proj", "q", nq), ("k_proj", "k", nkv), ("v_proj", "v", nkv)):
                kind = short if (permute and short in "qk") else "T"
                specs.append(_TensorSpec(f"{b}attn_{short}.weight", L + ("mixer", proj, "kernel"), kind, (rows, d),
                                         False))
                if cfg.attention_bias:
                    bkind = short + "b" if (permute and short in "qk") else "id"
                    specs.append(_TensorSpec(f"{b}attn_{short}.bias", L + ("mixer", proj, "bias"), bkind, (rows,),
                                             True))
            specs.append(_TensorSpec(b + "attn_output.weight", L + ("mixer", "o_proj", "kernel"), "T", (d, nq), False))
            if cfg.attention_out_bias:
                specs.append(_TensorSpec(b + "attn_output.bias", L + ("mixer", "o_proj", "bias"), "id", (d,), True))
        else:
            M = L + ("mixer",)
            nh, ng, di = cfg.mamba_n_heads, cfg.n_groups, cfg.d_inner
            d_in_proj = 2 * di + 2 * ng * cfg.d_state + nh
            specs += [
                _TensorSpec(b + "ssm_in.weight", M + ("in_proj", "kernel"), "T", (d_in_proj, d), False),
                _TensorSpec(b + "ssm_conv1d.weight", M + ("conv_weight",), "id", (cfg.conv_dim, cfg.d_conv), True),
                _TensorSpec(b + "ssm_conv1d.bias", M + ("conv_bias",) if cfg.mamba_conv_bias else None,
                            "id" if cfg.mamba_conv_bias else "zeros", (cfg.conv_dim,), True),
                _TensorSpec(b + "ssm_dt.bias", M + ("dt_bias",), "id", (nh,), True),
                _TensorSpec(b + "ssm_a", M + ("A_log",), "ssm_a", (nh, 1), True),
                _TensorSpec(b + "ssm_d", M + ("D",), "col", (nh, 1), True),
                _TensorSpec(b + "ssm_norm.weight", M + ("norm", "weight"), "ssm_norm", (ng, di // ng), True),
                _TensorSpec(b + "ssm_out.weight", M + ("out_proj", "kernel"), "T", (d, di), False),
            ]
        specs.append(_TensorSpec(b + "ffn_norm.weight", L + ("ffn_norm", "weight"), "id", (d,), True))
        dense = (("gate_proj", "gate", (cfg.d_ff, d)), ("up_proj", "up", (cfg.d_ff, d)),
                 ("down_proj", "down", (d, cfg.d_ff)))
        if cfg.n_experts:
            E, F, Mo = cfg.n_experts, cfg.d_ff_expert, L + ("moe",)
            specs += [
                _TensorSpec(b + "ffn_gate_inp.weight", Mo + ("router", "kernel"), "T", (E, d), True),
                _TensorSpec(b + "ffn_gate_exps.weight", Mo + ("w_gate",), "E", (E, F, d), False),
                _TensorSpec(b + "ffn_up_exps.weight", Mo + ("w_up",), "E", (E, F, d), False),
                _TensorSpec(b + "ffn_down_exps.weight", Mo + ("w_down",), "E", (E, d, F), False),
            ]
            if cfg.shared_mlp:  # the dense MLP added to the experts' output: llama.cpp's ungated shared expert
                for proj, short, shape in dense:
                    specs.append(_TensorSpec(f"{b}ffn_{short}_shexp.weight", L + ("ffn", proj, "kernel"), "T", shape,
                                             False))
            continue
        for proj, short, shape in dense:
            specs.append(_TensorSpec(f"{b}ffn_{short}.weight", L + ("ffn", proj, "kernel"), "T", shape, False))
            if cfg.mlp_bias:
                specs.append(_TensorSpec(f"{b}ffn_{short}.bias", L + ("ffn", proj, "bias"), "id", (shape[0],), True))
    specs.append(_TensorSpec("output_norm.weight", ("final_norm", "weight"), "id", (d,), True))
    if not cfg.tie_embeddings:
        specs.append(_TensorSpec("output.weight", ("lm_head", "kernel"), "T", (V, d), False))
    return specs


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection ``(n_heads*head_dim, ...)`` (or a bias) from rotate-half to adjacent pairs.

    Row ``h*hd + i`` and ``h*hd + i + hd/2`` (a NEOX pair) become rows ``h*hd + 2i`` and ``h*hd + 2i + 1``
    (a NORM pair): Hugging Face ``convert_hf_to_gguf.LlamaModel.permute``.
    """
    shape = w.shape
    return w.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`."""
    shape = w.shape
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _to_gguf(arr: np.ndarray, spec: _TensorSpec, cfg) -> np.ndarray:
    k = spec.kind
    if k == "zeros":
        return np.zeros(spec.shape, np.float32)
    a = np.asarray(arr, np.float32)
    if k == "T":
        a = a.T
    elif k == "E":
        a = a.swapaxes(1, 2)
    elif k in ("q", "k"):
        a = permute_qk(a.T, cfg.n_heads if k == "q" else cfg.n_kv_heads)
    elif k in ("qb", "kb"):
        a = permute_qk(a, cfg.n_heads if k == "qb" else cfg.n_kv_heads)
    elif k == "ssm_a":
        a = -np.exp(a).reshape(-1, 1)
    elif k == "col":
        a = a.reshape(-1, 1)
    elif k == "ssm_norm":
        a = a.reshape(spec.shape)
    if a.shape != spec.shape:
        raise AssertionError(f"{spec.name}: built shape {a.shape}, planned {spec.shape}")
    return np.ascontiguousarray(a)


def _from_gguf(a: np.ndarray, spec: _TensorSpec, cfg, where: str) -> np.ndarray:
    k = spec.kind
    if k == "T":
        return a.T
    if k == "E":
        return a.swapaxes(1, 2)
    if k in ("q", "k"):
        return unpermute_qk(a, cfg.n_heads if k == "q" else cfg.n_kv_heads).T
    if k in ("qb", "kb"):
        return unpermute_qk(a, cfg.n_heads if k == "qb" else cfg.n_kv_heads)
    if k == "ssm_a":
        a = a.reshape(-1)
        if not np.all(a < 0):
            raise ValueError(f"{where}: tensor {spec.name!r} must be negative (it stores A = -exp(A_log)), "
                             f"got max {float(a.max())}")
        return np.log(-a.astype(np.float64)).astype(np.float32)
    if k in ("col", "ssm_norm"):
        return a.reshape(-1)
    return a


# ---------------------------------------------------------------------------------------------------------
# Tokenizer -> GGUF vocabulary
# ---------------------------------------------------------------------------------------------------------

def _tokenizer_vocab(tokenizer, vocab_size: int) -> dict[str, Any]:
    """GGUF ``tokenizer.ggml.*`` values for a :class:`mani_jax.tokenizer.Tokenizer` (SentencePiece).

    The SentencePiece ``normalizer_spec`` decides ``add_space_prefix`` (``add_dummy_prefix``) and
    ``remove_extra_whitespaces``; our tokenizers are trained with both off. A model vocabulary larger than the
    tokenizer's is padded with ``[PAD{i}]`` UNUSED pieces (score -1000), as llama.cpp's converter does.
    """
    from sentencepiece import sentencepiece_model_pb2

    pieces = tokenizer.pieces()
    n = len(pieces)
    if n > vocab_size:
        raise ValueError(f"tokenizer: {n} pieces but the model's vocab_size is {vocab_size}; the embedding must "
                         "have a row per token")
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer._sp.serialized_model_proto())
    ns, ts = proto.normalizer_spec, proto.trainer_spec
    if ts.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        warnings.warn("tokenizer: not a SentencePiece BPE model; llama.cpp's SPM tokenizer (highest-score merge "
                      "first) only approximates it, so token ids may differ", stacklevel=3)
    if ns.name not in ("identity", "") and len(ns.precompiled_charsmap) > 0:
        warnings.warn(f"tokenizer: normalizer {ns.name!r} is not applied by llama.cpp's SPM tokenizer; text that "
                      "the normalizer changes will tokenize differently", stacklevel=3)
    if ns.escape_whitespaces is False or proto.trainer_spec.treat_whitespace_as_suffix:
        warnings.warn("tokenizer: escape_whitespaces=False / treat_whitespace_as_suffix are not supported by "
                      "llama.cpp's SPM tokenizer", stacklevel=3)
    tokens = [p for p, _, _ in pieces]
    scores = [float(s) for _, s, _ in pieces]
    types = [int(t) for _, _, t in pieces]
    for i in range(n, vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(5)  # UNUSED
    if len(set(tokens)) != len(tokens):
        raise ValueError("tokenizer: duplicate pieces (llama.cpp requires unique tokens)")
    out = dict(model="llama", pre="default", tokens=tokens, scores=scores, types=types,
               add_space_prefix=bool(ns.add_dummy_prefix), remove_extra_whitespaces=bool(ns.remove_extra_whitespaces),
               add_bos=True, add_eos=False, placeholder=False)
    for key, value in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("unk", tokenizer.unk_id),
                       ("pad", tokenizer.pad_id)):
        out[key] = int(value) if value is not None and int(value) >= 0 else None
    return out


def _placeholder_vocab(vocab_size: int) -> dict[str, Any]:
    """A vocabulary for a model exported without a tokenizer: ``<unk> <s> </s>``, the 256 byte pieces (when
    they fit) and ``[PAD{i}]`` UNUSED pieces, so llama.cpp loads the file and byte-level text still tokenizes."""
    tokens, types = ["<unk>", "<s>", "</s>"], [2, 3, 3]
    if vocab_size >= 3 + 256:
        tokens += [f"<0x{b:02X}>" for b in range(256)]
        types += [6] * 256
    tokens = tokens[:vocab_size]
    types = types[:vocab_size]
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(5)
    return dict(model="llama", pre="default", tokens=tokens, scores=[0.0] * len(tokens), types=types,
                add_space_prefix=False, remove_extra_whitespaces=False, add_bos=True, add_eos=False,
                bos=1 if vocab_size > 1 else None, eos=2 if vocab_size > 2 else None, unk=0, pad=None,
                placeholder=True)


# ---------------------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------------------

def _tmp_path(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _params(model) -> dict[tuple, np.ndarray]:
    from flax import nnx

    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    return {tuple(k): np.asarray(v.get_value(), dtype=np.float32) for k, v in flat.items()}


def _add_metadata(w, cfg, arch: str, name: str, file_type: int, vocab: dict, chat_template: str | None) -> None:
    w.add_name(name)
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    if cfg.n_experts:
        w.add_feed_forward_length(cfg.d_ff_expert)  # llama.cpp's n_ff sizes ffn_*_exps
        w.add_expert_count(cfg.n_experts)
        w.add_expert_used_count(cfg.top_k)
        if cfg.shared_mlp:
            w.add_expert_shared_feed_forward_length(cfg.d_ff)
    else:
        w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    if arch == "granitehybrid":
        w.add_head_count_kv([int(cfg.n_kv_heads) if t == "attention" else 0 for t in cfg.layer_types])
    else:
        w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if arch in _GRANITE_ARCHS:
        w.add_rope_scaling_finetuned(bool(cfg.rope))
        w.add_embedding_scale(float(cfg.embedding_multiplier))
        w.add_residual_scale(float(cfg.residual_multiplier))
        w.add_logit_scale(float(cfg.logits_scaling))
        if cfg.attention_multiplier is not None:
            w.add_attention_scale(float(cfg.attention_multiplier))
    if arch == "granitehybrid":
        w.add_ssm_conv_kernel(cfg.d_conv)
        w.add_ssm_inner_size(2 * cfg.d_model if not cfg.n_mamba_layers else cfg.d_inner)
        w.add_ssm_state_size(cfg.d_state)
        w.add_ssm_time_step_rank(cfg.mamba_n_heads)
        w.add_ssm_group_count(cfg.n_groups)
    # Tokenizer.
    w.add_tokenizer_model(vocab["model"])
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_scores(vocab["scores"])
    w.add_token_types(vocab["types"])
    for key, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                    ("pad", w.add_pad_token_id)):
        if vocab.get(key) is not None:
            fn(int(vocab[key]))
    w.add_add_bos_token(bool(vocab["add_bos"]))
    w.add_add_eos_token(bool(vocab["add_eos"]))
    w.add_add_space_prefix(bool(vocab["add_space_prefix"]))
    w.add_remove_extra_whitespaces(bool(vocab["remove_extra_whitespaces"]))
    if chat_template:
        w.add_chat_template(chat_template)
    if vocab["placeholder"]:
        w.add_bool(PLACEHOLDER_VOCAB_KEY, True)
    w.add_string(CONFIG_KEY, json.dumps(dataclasses.asdict(cfg), sort_keys=True))


def _write_file(path: Path, model, tokenizer, arch: str, ggml_type, file_type: int, name: str,
                chat_template: str | None) -> list[str]:
    """Write the GGUF at ``path`` (no temp/rename here); return the names of matrices that fell back to F16."""
    cfg = model.config
    params = _params(model)
    vocab = _placeholder_vocab(cfg.vocab_size) if tokenizer is None else _tokenizer_vocab(tokenizer, cfg.vocab_size)
    w = gguf.GGUFWriter(str(path), arch)
    try:
        _add_metadata(w, cfg, arch, name, file_type, vocab, chat_template)
        fallback = []
        block = gguf.GGML_QUANT_SIZES[ggml_type][0]
        for spec in _tensor_plan(cfg, arch):
            src = None if spec.path is None else params.pop(spec.path)
            arr = _to_gguf(src, spec, cfg)
            if spec.keep_f32 or arr.ndim == 1 or ggml_type == _QT.F32:
                w.add_tensor(spec.name, arr.astype(np.float32))
                continue
            qt = ggml_type
            if arr.shape[-1] % block:
                fallback.append(spec.name)
                qt = _QT.F16
            if qt == _QT.F16:
                w.add_tensor(spec.name, arr.astype(np.float16))
            else:
                w.add_tensor(spec.name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
        if params:
            raise AssertionError(f"parameters with no GGUF tensor: {sorted(params)[:4]}")
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        for f in w.fout or []:
            f.flush()
            os.fsync(f.fileno())
    finally:
        w.close()
    return fallback


def _llama_quantize(src: Path, dst: Path, file_type: int, n_threads: int) -> None:
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError("K-quant export needs llama-cpp-python==0.3.36 (pip install 'mani_jax[gguf]')") from e
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type)
    params.nthread = int(n_threads)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.exists():
        raise RuntimeError(f"llama_model_quantize({src.name} -> {dst.name}, ftype={int(file_type)}) failed with {rc}")


def export_gguf(model, tokenizer, path, *, quant: str = "f16", name: str = "mani_jax", chat_template: str | None = None,
                arch: str | None = None, n_threads: int = 0) -> Path:
    """Write ``model`` (a :class:`~mani_jax.models.HybridLM`) and its tokenizer as a llama.cpp GGUF file.

    Args:
      model: the model; its ``config`` decides the architecture (:func:`select_arch`). Parameters may be
        float32 or bfloat16 (written from float32 copies). A mixture of experts (``n_experts > 0``) is written
        with ``expert_count``/``expert_used_count``, ``feed_forward_length = d_ff_expert`` and ``ffn_*_exps``
        tensors, its shared MLP (``shared_mlp``) as ``ffn_*_shexp`` (module docstring).
      tokenizer: a :class:`mani_jax.tokenizer.Tokenizer` or the path of its ``.model`` (SentencePiece; written
        as ``tokenizer.ggml.model = "llama"`` with pieces, scores, types, bos/eos/unk/pad, ``add_bos_token=true``,
        ``add_space_prefix``/``remove_extra_whitespaces`` from its normalizer, both false for ours), or ``None`` for a
        placeholder vocabulary (``<unk> <s> </s>``, byte pieces, ``[PADi]``) that lets llama.cpp run token ids.
        Its size may be smaller than ``config.vocab_size`` (padded with UNUSED ``[PADi]`` pieces), not larger.
      path: output file; its directory must exist. Written to a temporary file beside it and renamed.
      quant: one of :data:`QUANT_TYPES`: ``f32 f16 bf16 q8_0 q5_0 q4_1 q4_0`` (gguf-py's numpy quantizers) or
        ``q4_k_m q6_k`` (llama.cpp's quantizer through llama-cpp-python, from a temporary F16 file).
      name: ``general.name``.
      chat_template: a Jinja chat template stored as ``tokenizer.chat_template`` (llama-cpp-python's
        ``chat_template.default`` handler); default: the tokenizer's ``chat_template`` attribute if it has one.
      arch: force ``"granitehybrid"``, ``"granite"``, ``"granitemoe"`` or ``"llama"`` instead of
        :func:`select_arch`.
      n_threads: threads for llama.cpp's K-quantizer (0 = all cores).

    Returns:
      ``Path`` of the written file.

    Raises:
      ValueError: unknown ``quant``/``arch``; a config the architecture cannot hold (sliding window, Mamba
        expand != 2 or projection biases, only one layer kind under ``granitehybrid``, Granite scalars or NoPE
        under ``llama``, a zero scale, a shared MLP under ``llama``, NoPE or no experts under
        ``granitemoe``, MLP biases with a shared MLP); a tokenizer larger
        than the vocabulary; a missing output directory.
      TypeError: ``tokenizer`` is not a Tokenizer, a path or None.
      ImportError: a K-quant without llama-cpp-python.
      RuntimeError: llama.cpp's quantizer failed.

    Warns:
      UserWarning: matrices whose input dimension is not a multiple of the quant block (written F16); a
        ``capacity_factor`` (llama.cpp's experts are dropless).
    """
    quant = str(quant).lower()
    if quant not in QUANT_TYPES:
        raise ValueError(f"quant: expected one of {list(QUANT_TYPES)}, got {quant!r}")
    cfg = model.config
    arch = select_arch(cfg) if arch is None else arch
    _check_exportable(cfg, arch)
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"path: directory {str(path.parent)!r} does not exist")
    if isinstance(tokenizer, (str, os.PathLike)):
        from mani_jax.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(tokenizer)
    if tokenizer is not None and not hasattr(tokenizer, "pieces"):
        raise TypeError(f"tokenizer: expected a mani_jax.tokenizer.Tokenizer, a .model path or None, "
                        f"got {type(tokenizer).__name__}")
    if chat_template is None:
        chat_template = getattr(tokenizer, "chat_template", None)
    ggml_type, file_type = QUANT_TYPES[quant]
    tmp = _tmp_path(path, "tmp")
    tmp_f16 = _tmp_path(path, "f16")
    try:
        if ggml_type is not None:
            fallback = _write_file(tmp, model, tokenizer, arch, ggml_type, file_type, name, chat_template)
            if fallback:
                warnings.warn(f"quant={quant}: {len(fallback)} matrices have an input dimension that is not a multiple "
                              f"of {gguf.GGML_QUANT_SIZES[ggml_type][0]} and are written F16: "
                              f"{', '.join(fallback[:6])}{' ...' if len(fallback) > 6 else ''}", stacklevel=2)
        else:
            _write_file(tmp_f16, model, tokenizer, arch, _QT.F16, gguf.LlamaFileType.MOSTLY_F16, name, chat_template)
            _llama_quantize(tmp_f16, tmp, file_type, n_threads)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_f16.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------------------

class _CheckedReader(gguf.GGUFReader):
    """``GGUFReader`` that names the tensor whose data runs past the end of a truncated file."""

    def _build_tensors(self, start_offs, fields):  # noqa: D401 - gguf-py internal hook
        size = len(self.data)
        for field in fields:
            _nl, name_data, _nd, dims, raw_dtype, offset_tensor = field.parts
            name = str(bytes(name_data), encoding="utf-8", errors="replace")
            try:
                qtype = _QT(int(raw_dtype[0]))
            except ValueError:
                raise ValueError(f"tensor {name!r}: unknown GGML type {int(raw_dtype[0])}") from None
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n_elems = int(np.prod(dims.astype(np.int64))) if len(dims) else 1
            end = int(start_offs + offset_tensor[0]) + n_elems * type_size // block
            if end > size:
                raise ValueError(f"tensor {name!r}: its data ends at byte {end} but the file has {size} bytes "
                                 "(truncated file)")
        super()._build_tensors(start_offs, fields)


def _open(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"path: GGUF file {str(path)!r} does not exist")
    try:
        return _CheckedReader(str(path))
    except ValueError as e:
        raise ValueError(f"{path}: not a readable GGUF file: {e}") from e
    except (IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable GGUF file (truncated or corrupt header: "
                         f"{type(e).__name__}: {e})") from e


class _Meta:
    def __init__(self, reader, where: str):
        self.fields = reader.fields
        self.where = where

    def has(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, default: Any = ..., kind: type | None = None) -> Any:
        if key not in self.fields:
            if default is ...:
                raise ValueError(f"{self.where}: missing metadata key {key!r}")
            return default
        try:
            value = self.fields[key].contents()
        except Exception as e:  # noqa: BLE001 - a corrupt field
            raise ValueError(f"{self.where}: metadata key {key!r} is unreadable ({e})") from e
        if kind is not None:
            ok = (isinstance(value, list) if kind is list else
                  isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
                  isinstance(value, int) and not isinstance(value, bool) if kind is int else isinstance(value, kind))
            if not ok:
                raise ValueError(f"{self.where}: metadata key {key!r} should be {kind.__name__}, got {value!r:.80}")
        return value


def _config_from_metadata(meta: _Meta, arch: str, tensors: dict[str, Any]):
    from mani_jax.models import ModelConfig

    a = arch + "."
    n_layers = meta.get(a + "block_count", kind=int)
    d_model = meta.get(a + "embedding_length", kind=int)
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{meta.where}: missing tensor 'token_embd.weight'")
    emb_shape = tuple(int(x) for x in reversed(tensors["token_embd.weight"].shape.tolist()))
    if len(emb_shape) != 2 or emb_shape[1] != d_model:
        raise ValueError(f"{meta.where}: tensor 'token_embd.weight' has shape {emb_shape}; expected (vocab, {d_model})")
    n_heads = meta.get(a + "attention.head_count")
    if isinstance(n_heads, list):
        if len(set(n_heads)) != 1:
            raise ValueError(f"{meta.where}: per-layer {a}attention.head_count {n_heads} is not supported")
        n_heads = n_heads[0]
    n_heads = int(n_heads)
    kv = meta.get(a + "attention.head_count_kv", n_heads)
    if isinstance(kv, list):
        if len(kv) != n_layers:
            raise ValueError(f"{meta.where}: {a}attention.head_count_kv has {len(kv)} entries, block_count is "
                             f"{n_layers}")
        kv = [int(x) for x in kv]
    else:
        kv = [int(kv)] * n_layers
    if arch == "granitehybrid":
        layer_types = tuple("mamba" if k == 0 else "attention" for k in kv)
    else:
        if 0 in kv:
            raise ValueError(f"{meta.where}: {a}attention.head_count_kv has a 0 entry, which {arch} cannot run")
        layer_types = ("attention",) * n_layers
    attn_kv = sorted({k for k in kv if k > 0})
    if len(attn_kv) > 1:
        raise ValueError(f"{meta.where}: attention layers with different head_count_kv {attn_kv} are not supported")
    n_kv_heads = attn_kv[0] if attn_kv else n_heads
    if n_heads < 1:
        raise ValueError(f"{meta.where}: {a}attention.head_count must be positive, got {n_heads}")
    head_dim = int(meta.get(a + "attention.key_length", d_model // max(n_heads, 1)))
    if int(meta.get(a + "attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"{meta.where}: {a}attention.value_length != key_length is not supported")
    rope_dim = int(meta.get(a + "rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"{meta.where}: {a}rope.dimension_count={rope_dim} != head_dim={head_dim} (partial RoPE) "
                         "is not supported")
    # granitemoe ignores the switch (RoPE always on), as llama.cpp does.
    rope = bool(meta.get(a + "rope.scaling.finetuned", True)) if arch in ("granite", "granitehybrid") else True
    ff = meta.get(a + "feed_forward_length")
    if isinstance(ff, list):
        if len(set(ff)) != 1:
            raise ValueError(f"{meta.where}: per-layer {a}feed_forward_length is not supported")
        ff = ff[0]
    n_experts = int(meta.get(a + "expert_count", 0, kind=int))
    kw: dict[str, Any] = {}
    if n_experts > 0:
        if arch == "qwen2":
            raise ValueError(f"{meta.where}: {a}expert_count > 0 in a qwen2 file (qwen2moe is not supported)")
        used = meta.get(a + "expert_used_count")
        if isinstance(used, list):
            if len(set(used)) != 1:
                raise ValueError(f"{meta.where}: per-layer {a}expert_used_count {used} is not supported")
            used = used[0]
        shared = int(meta.get(a + "expert_shared_feed_forward_length", 0, kind=int))
        kw.update(n_experts=n_experts, top_k=int(used), d_ff_expert=int(ff), shared_mlp=shared > 0)
        if shared > 0:
            kw["d_ff"] = shared
        # else d_ff (unused by a model without a dense FFN) comes from our config record, or d_ff_expert.
    else:
        kw["d_ff"] = int(ff)
    kw.update(
        vocab_size=emb_shape[0], d_model=d_model, n_layers=n_layers, layer_types=layer_types, n_heads=n_heads,
        n_kv_heads=n_kv_heads, head_dim=head_dim, rope=rope,
        rope_theta=float(meta.get(a + "rope.freq_base", 10000.0)),
        norm_eps=float(meta.get(a + "attention.layer_norm_rms_epsilon", kind=float)),
        max_seq_len=int(meta.get(a + "context_length", kind=int)),
        tie_embeddings="output.weight" not in tensors,
    )
    first_attn = next((i for i, t in enumerate(layer_types) if t == "attention"), None)
    if first_attn is not None:
        kw["attention_bias"] = f"blk.{first_attn}.attn_q.bias" in tensors
        kw["attention_out_bias"] = f"blk.{first_attn}.attn_output.bias" in tensors
    if n_experts == 0:
        kw["mlp_bias"] = "blk.0.ffn_gate.bias" in tensors
    if arch in _GRANITE_ARCHS:
        def scale(key, default=1.0):
            v = float(meta.get(a + key, 0.0) or 0.0)
            return v if v != 0.0 else default
        kw.update(embedding_multiplier=scale("embedding_scale"), residual_multiplier=scale("residual_scale"),
                  logits_scaling=scale("logit_scale"), attention_multiplier=scale("attention.scale", None))
    if arch == "granitehybrid":
        d_inner = int(meta.get(a + "ssm.inner_size", kind=int))
        nh = int(meta.get(a + "ssm.time_step_rank", kind=int))
        if "mamba" in layer_types:
            if d_inner % d_model or nh < 1 or d_inner % nh:
                raise ValueError(f"{meta.where}: {a}ssm.inner_size={d_inner} must be a multiple of embedding_length "
                                 f"and of ssm.time_step_rank={nh}")
            kw.update(expand=d_inner // d_model, mamba_n_heads=nh, mamba_head_dim=d_inner // nh)
        kw.update(d_state=int(meta.get(a + "ssm.state_size", kind=int)),
                  d_conv=int(meta.get(a + "ssm.conv_kernel", kind=int)),
                  n_groups=int(meta.get(a + "ssm.group_count", kind=int)))
    # Fields GGUF has no key for come from our own config record when the file has one.
    if meta.has(CONFIG_KEY):
        try:
            ours = json.loads(meta.get(CONFIG_KEY))
        except (ValueError, TypeError):
            ours = {}
        if not isinstance(ours, dict):
            ours = {}
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        for f, v in ours.items():
            if f not in names or f in ("layer_types", "sliding_window", "mamba_proj_bias"):
                continue
            if f not in kw:  # a field GGUF has no key for (or, for a dense arch, the unused Mamba fields)
                kw[f] = v
            elif isinstance(kw[f], float) and isinstance(v, (int, float)) and not isinstance(v, bool) and \
                    np.float32(v) == np.float32(kw[f]):
                kw[f] = float(v)  # the exact value the float32 metadata rounded
        if ours.get("attention_multiplier", 0.0) is None and kw.get("attention_multiplier") is not None and \
                math.isclose(kw["attention_multiplier"], 1.0 / math.sqrt(head_dim), rel_tol=1e-6):
            kw["attention_multiplier"] = None
    kw.setdefault("d_ff", kw.get("d_ff_expert", 1))
    try:
        return ModelConfig(**kw)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{meta.where}: metadata gives an invalid model config: {e}") from e


def _tokenizer_from_metadata(meta: _Meta):
    """A :class:`Tokenizer` rebuilt from an SPM (``llama``) vocabulary; the token list for other vocab types."""
    model = meta.get("tokenizer.ggml.model", None)
    if model is None or meta.get(PLACEHOLDER_VOCAB_KEY, False):
        return None
    tokens = meta.get("tokenizer.ggml.tokens", None, kind=list)
    if tokens is None:
        return None
    if model != "llama":
        return list(tokens)
    from sentencepiece import sentencepiece_model_pb2 as pb

    from mani_jax.tokenizer import Tokenizer

    n = len(tokens)
    scores = meta.get("tokenizer.ggml.scores", [0.0] * n, kind=list)
    types = meta.get("tokenizer.ggml.token_type", [1] * n, kind=list)
    if len(scores) != n or len(types) != n:
        raise ValueError(f"{meta.where}: tokenizer.ggml.scores/token_type lengths differ from tokenizer.ggml.tokens")
    proto = pb.ModelProto()
    for tok, score, typ in zip(tokens, scores, types):
        p = proto.pieces.add()
        p.piece, p.score = tok, float(score)
        p.type = int(typ) if int(typ) in (1, 2, 3, 4, 5, 6) else 1
    ts = proto.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = n
    ts.byte_fallback = any(int(t) == 6 for t in types)
    for key, attr in (("unknown", "unk_id"), ("bos", "bos_id"), ("eos", "eos_id"), ("padding", "pad_id")):
        v = meta.get(f"tokenizer.ggml.{key}_token_id", None)
        setattr(ts, attr, int(v) if v is not None and 0 <= int(v) < n else -1)
    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    ns.remove_extra_whitespaces = bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False))
    ns.escape_whitespaces = True
    try:
        return Tokenizer.from_bytes(proto.SerializeToString())
    except (ValueError, AssertionError) as e:
        warnings.warn(f"{meta.where}: could not rebuild a SentencePiece tokenizer ({e}); returning the token list",
                      stacklevel=3)
        return list(tokens)


def _strip_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    i = 0
    while i < len(shape) - 1 and shape[i] == 1:
        i += 1
    return tuple(shape[i:])


def load(path, *, param_dtype: str = "float32"):
    """Rebuild a :class:`~mani_jax.models.HybridLM` (and its tokenizer) from a GGUF file.

    Reads the architectures :data:`SUPPORTED_ARCHS` (``granitehybrid``, ``granite``, ``granitemoe``, ``llama`` as
    written by :func:`export_gguf`, mixtures of experts included, and dense ``qwen2``). Quantized tensors are
    dequantized with ``gguf.quants.dequantize`` (K-quants included); q/k rows are un-permuted for the NORM-RoPE
    archs; ``ssm_a`` gives ``A_log = log(-ssm_a)``. The :class:`ModelConfig` comes from the standard metadata keys;
    fields GGUF has no key for (``chunk_size``, ``initializer_range``, ...) from the ``mani_jax.model_config``
    record when present.

    Args:
      path: the ``.gguf`` file.
      param_dtype: ``"float32"`` or ``"bfloat16"`` parameters.

    Returns:
      ``(model, tokenizer)``: ``tokenizer`` is a :class:`mani_jax.tokenizer.Tokenizer` rebuilt from an SPM
      (``tokenizer.ggml.model = "llama"``) vocabulary (byte-fallback BPE, identity normalizer, the file's
      ``add_space_prefix``/``remove_extra_whitespaces``), the list of token strings for other vocabulary types,
      or ``None`` when the file has no vocabulary or only the placeholder one.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: not a GGUF file, a truncated file (naming the tensor cut off), an unsupported architecture,
        a missing or mistyped metadata key, a missing, unexpected or mis-shaped tensor (each named).
    """
    import jax.numpy as jnp

    from mani_jax.models.hybrid import abstract_params, assemble_model

    if param_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"param_dtype: expected 'float32' or 'bfloat16', got {param_dtype!r}")
    path = Path(path)
    where = str(path)
    reader = _open(path)
    meta = _Meta(reader, where)
    arch = meta.get("general.architecture", kind=str)
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"{where}: unsupported architecture {arch!r}; expected one of {SUPPORTED_ARCHS}")
    tensors = {t.name: t for t in reader.tensors}
    try:
        cfg = _config_from_metadata(meta, arch, tensors)
    except (TypeError, IndexError, KeyError, OverflowError) as e:
        raise ValueError(f"{where}: invalid model metadata ({type(e).__name__}: {e})") from e
    cfg = dataclasses.replace(cfg, param_dtype=param_dtype)
    plan = _tensor_plan(cfg, arch if arch in _NORM_ROPE_ARCHS else "qwen2")
    planned = {s.name for s in plan}
    extra = sorted(set(tensors) - planned)
    if extra:
        raise ValueError(f"{where}: unexpected tensors for this {arch} config: "
                         f"{extra[:6]}{' ...' if len(extra) > 6 else ''}")

    abstract, flat = abstract_params(cfg)
    dtype = jnp.float32 if param_dtype == "float32" else jnp.bfloat16
    seen = set()
    for spec in plan:
        t = tensors.get(spec.name)
        if t is None:
            raise ValueError(f"{where}: missing tensor {spec.name!r} (expected shape {spec.shape})")
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if _strip_ones(shape) != _strip_ones(spec.shape):  # ggml drops trailing 1-sized dims (numpy: leading)
            raise ValueError(f"{where}: tensor {spec.name!r} has shape {shape}; expected {spec.shape}")
        try:
            arr = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(spec.shape)
        except (NotImplementedError, ValueError) as e:
            raise ValueError(f"{where}: tensor {spec.name!r} of type {t.tensor_type.name} cannot be read ({e})") from e
        if spec.path is None:
            continue
        value = _from_gguf(arr, spec, cfg, where)
        var = flat[spec.path]
        if tuple(value.shape) != tuple(var.shape):
            raise AssertionError(f"{spec.name}: {value.shape} vs parameter {var.shape}")
        var.set_value(jnp.asarray(value, dtype))
        seen.add(spec.path)
    missing = sorted(set(flat) - seen)
    if missing:
        raise AssertionError(f"parameters not filled from {where}: {missing[:4]}")
    model = assemble_model(abstract, flat)
    tokenizer = _tokenizer_from_metadata(meta)
    del reader
    return model, tokenizer


def inspect(path) -> dict[str, Any]:
    """Metadata and tensor table of a GGUF file, for humans and notebooks.

    Returns ``{"metadata": {key: value}, "tensors": [{"name", "type", "shape"}], "size_bytes": int}``; long
    arrays (the vocabulary) are summarised as ``"<array of N>"``. ``shape`` is in numpy order.

    Raises: as :func:`load` for unreadable files.
    """
    path = Path(path)
    reader = _open(path)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            value = field.contents()
        except Exception:  # noqa: BLE001
            value = "<unreadable>"
        if isinstance(value, list) and len(value) > 16:
            value = f"<array of {len(value)}>"
        meta[key] = value
    tensors = [{"name": t.name, "type": t.tensor_type.name,
                "shape": tuple(int(x) for x in reversed(t.shape.tolist()))} for t in reader.tensors]
    return {"metadata": meta, "tensors": tensors, "size_bytes": path.stat().st_size}
