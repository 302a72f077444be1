"""Import Hugging Face checkpoints (``config.json`` + safetensors) into :class:`HybridLM`.

Supported: ``GraniteMoeHybridForCausalLM`` (Mamba-2 and attention layers, grouped norm; a dense ``shared_mlp``,
or routed experts plus the shared MLP), ``Qwen2ForCausalLM`` (all attention, q/k/v biases) and
``MixtralForCausalLM`` (8 experts top-2 style routed SwiGLU). The math each of
these runs in transformers (``modeling_granitemoehybrid.py``, ``modeling_qwen2.py``) is what
:mod:`mani_jax.models.hybrid` computes; ``tests/golden`` holds tiny random checkpoints with their
transformers logits to prove it. This is also how a user runs real Granite-4.0-H or Qwen2.5 weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from mani_jax.models.config import ModelConfig
from mani_jax.models.hybrid import HybridLM, abstract_params, assemble_model

_MAMBA_NAMES = ("mamba", "linear_attention")
_ATTENTION_NAMES = ("attention", "full_attention")


def _layer_types(hf: dict, n_layers: int) -> tuple[str, ...]:
    raw = hf.get("layer_types")
    if raw is None:
        return ("attention",) * n_layers
    if len(raw) != n_layers:
        raise ValueError(f"config.json: layer_types has {len(raw)} entries, num_hidden_layers is {n_layers}")
    out = []
    for i, t in enumerate(raw):
        if t in _MAMBA_NAMES:
            out.append("mamba")
        elif t in _ATTENTION_NAMES:
            out.append("attention")
        else:
            raise ValueError(f"config.json: layer_types[{i}] = {t!r}; expected one of "
                             f"{_MAMBA_NAMES + _ATTENTION_NAMES}")
    return tuple(out)


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    if isinstance(params, dict) and "rope_theta" in params:
        rtype = params.get("rope_type", "default")
        if rtype not in ("default", None):
            raise NotImplementedError(f"config.json: rope_type {rtype!r} (scaled RoPE) is not supported")
        return float(params["rope_theta"])
    if hf.get("rope_scaling"):
        raise NotImplementedError(f"config.json: rope_scaling {hf['rope_scaling']!r} is not supported")
    return float(hf.get("rope_theta", 10000.0))


def _is_infinite(v: Any) -> bool:
    if isinstance(v, dict):  # transformers 5 writes inf as {"__float__": "Infinity"}
        v = v.get("__float__", v)
    try:
        return math.isinf(float(v))
    except (TypeError, ValueError):
        return False


def _aux_coef(hf: dict) -> dict:
    """HF ``router_aux_loss_coef`` in our convention: HF's balancing loss is ``top_k`` times ours
    (:func:`mani_jax.core.moe.load_balancing_loss`), so the same gradient needs ``top_k`` times the coefficient."""
    if hf.get("router_aux_loss_coef") is None:
        return {}
    return {"router_aux_loss_coef": float(hf["router_aux_loss_coef"]) * int(hf["num_experts_per_tok"])}


def config_from_hf(hf: dict, *, max_seq_len: int | None = None) -> ModelConfig:
    """Translate a Hugging Face ``config.json`` dict into a :class:`ModelConfig`.

    Raises:
      ValueError: unsupported ``model_type`` or inconsistent fields (named in the message).
      NotImplementedError: features we do not run (MoE experts in Granite, scaled RoPE, Qwen2 sliding
        window, a finite ``time_step_limit``).
    """
    mt = hf.get("model_type")
    n_layers = int(hf["num_hidden_layers"])
    d_model = int(hf["hidden_size"])
    n_heads = int(hf["num_attention_heads"])
    common = dict(
        vocab_size=int(hf["vocab_size"]), d_model=d_model, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or d_model // n_heads), rope_theta=_rope_theta(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(max_seq_len or hf.get("max_position_embeddings", 2048)))
    if mt == "qwen2":
        if hf.get("use_sliding_window"):
            raise NotImplementedError("config.json: Qwen2 use_sliding_window=true is not supported")
        return ModelConfig(layer_types=("attention",) * n_layers, d_ff=int(hf["intermediate_size"]),
                           attention_bias=True, attention_out_bias=False, rope=True, **common)
    if mt == "mixtral":
        # Mistral's window: a query sees keys with q_pos - kv_pos < sliding_window (transformers'
        # sliding_window_overlay, kv_idx > q_idx - window), our attention's convention too.
        window = hf.get("sliding_window")
        ff = int(hf["intermediate_size"])
        return ModelConfig(layer_types=("attention",) * n_layers, d_ff=ff, d_ff_expert=ff,
                           n_experts=int(hf["num_local_experts"]), top_k=int(hf["num_experts_per_tok"]),
                           attention_bias=False, rope=True, sliding_window=int(window) if window else None,
                           **_aux_coef(hf), **common)
    if mt == "granitemoehybrid":
        n_experts = int(hf.get("num_local_experts") or 0)
        moe = dict(n_experts=n_experts, top_k=int(hf.get("num_experts_per_tok") or 1),
                   d_ff_expert=int(hf["intermediate_size"]), shared_mlp=int(hf.get("shared_intermediate_size") or 0) > 0,
                   **_aux_coef(hf)) if n_experts else {}
        tsl = hf.get("time_step_limit")
        if tsl is not None and (float(tsl[0]) > 0.0 or not _is_infinite(tsl[1])):
            raise NotImplementedError(f"config.json: time_step_limit {tsl} clamps dt; only (0, inf) is supported")
        pos = hf.get("position_embedding_type", "rope")
        return ModelConfig(
            layer_types=_layer_types(hf, n_layers), d_ff=int(hf.get("shared_intermediate_size") or
                                                             hf["intermediate_size"]), **moe,
            attention_bias=bool(hf.get("attention_bias", False)),
            attention_out_bias=bool(hf.get("attention_bias", False)), rope=pos == "rope",
            expand=int(hf.get("mamba_expand", 2)), mamba_n_heads=int(hf["mamba_n_heads"]),
            mamba_head_dim=int(hf["mamba_d_head"]), d_state=int(hf["mamba_d_state"]),
            d_conv=int(hf.get("mamba_d_conv", 4)), n_groups=int(hf.get("mamba_n_groups", 1)),
            chunk_size=int(hf.get("mamba_chunk_size", 256)), mamba_conv_bias=bool(hf.get("mamba_conv_bias", True)),
            mamba_proj_bias=bool(hf.get("mamba_proj_bias", False)),
            embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
            attention_multiplier=float(hf["attention_multiplier"]) if hf.get("attention_multiplier") else None,
            residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
            logits_scaling=float(hf.get("logits_scaling", 1.0)), **common)
    raise ValueError(f"config.json: model_type {mt!r} is not supported; expected 'granitemoehybrid', 'qwen2' "
                     "or 'mixtral'")


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    tensors = {}
    for f in files:
        # framework="flax" returns jax arrays, which keeps bfloat16 checkpoints loadable.
        with safe_open(str(path / f), framework="flax") as fh:
            for k in fh.keys():
                tensors[k] = fh.get_tensor(k)
    return tensors


def _hf_name_map(cfg: ModelConfig, model_type: str) -> dict[tuple, tuple[str, str]]:
    """Our parameter path -> (HF tensor name, transform) where transform is 'id', 'T' or a split tag."""
    m: dict[tuple, tuple[str, str]] = {
        ("embed", "embedding"): ("model.embed_tokens.weight", "id"),
        ("final_norm", "weight"): ("model.norm.weight", "id"),
    }
    if not cfg.tie_embeddings:
        m[("lm_head", "kernel")] = ("lm_head.weight", "T")
    for i, t in enumerate(cfg.layer_types):
        p = f"model.layers.{i}."
        L = ("layers", i)
        m[L + ("mixer_norm", "weight")] = (p + "input_layernorm.weight", "id")
        m[L + ("ffn_norm", "weight")] = (p + "post_attention_layernorm.weight", "id")
        if t == "attention":
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                m[L + ("mixer", proj, "kernel")] = (p + f"self_attn.{proj}.weight", "T")
                has_bias = cfg.attention_out_bias if proj == "o_proj" else cfg.attention_bias
                if has_bias:
                    m[L + ("mixer", proj, "bias")] = (p + f"self_attn.{proj}.bias", "id")
        else:
            q = p + "mamba."
            m[L + ("mixer", "in_proj", "kernel")] = (q + "in_proj.weight", "T")
            m[L + ("mixer", "out_proj", "kernel")] = (q + "out_proj.weight", "T")
            if cfg.mamba_proj_bias:
                m[L + ("mixer", "in_proj", "bias")] = (q + "in_proj.bias", "id")
                m[L + ("mixer", "out_proj", "bias")] = (q + "out_proj.bias", "id")
            m[L + ("mixer", "conv_weight")] = (q + "conv1d.weight", "conv")
            if cfg.mamba_conv_bias:
                m[L + ("mixer", "conv_bias")] = (q + "conv1d.bias", "id")
            for name in ("dt_bias", "A_log", "D"):
                m[L + ("mixer", name)] = (q + name, "id")
            m[L + ("mixer", "norm", "weight")] = (q + "norm.weight", "id")
        if cfg.n_experts and model_type == "granitemoehybrid":
            q = p + "block_sparse_moe."
            m[L + ("moe", "router", "kernel")] = (q + "router.layer.weight", "T")
            m[L + ("moe", "w_gate")] = (q + "input_linear.weight", "experts_gate")
            m[L + ("moe", "w_up")] = (q + "input_linear.weight", "experts_up")
            m[L + ("moe", "w_down")] = (q + "output_linear.weight", "experts_T")
        elif cfg.n_experts:  # Mixtral: one tensor per expert on disk (w1 gate, w3 up, w2 down)
            q = p + "block_sparse_moe."
            experts = range(cfg.n_experts)
            m[L + ("moe", "router", "kernel")] = (q + "gate.weight", "T")
            m[L + ("moe", "w_gate")] = ([q + f"experts.{e}.w1.weight" for e in experts], "stack_T")
            m[L + ("moe", "w_up")] = ([q + f"experts.{e}.w3.weight" for e in experts], "stack_T")
            m[L + ("moe", "w_down")] = ([q + f"experts.{e}.w2.weight" for e in experts], "stack_T")
        if model_type == "granitemoehybrid":
            m[L + ("ffn", "gate_proj", "kernel")] = (p + "shared_mlp.input_linear.weight", "gate")
            m[L + ("ffn", "up_proj", "kernel")] = (p + "shared_mlp.input_linear.weight", "up")
            m[L + ("ffn", "down_proj", "kernel")] = (p + "shared_mlp.output_linear.weight", "T")
        elif not cfg.n_experts:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                m[L + ("ffn", proj, "kernel")] = (p + f"mlp.{proj}.weight", "T")
    return m


def _transform(arr, how: str, d_ff: int, d_ff_expert: int = 0):
    if how == "stack_T":  # list of torch Linear weights [out, in] -> [n, in, out]
        return jnp.stack([jnp.asarray(a).T for a in arr])
    if how == "experts_gate":  # Granite input_linear [E, 2f, d]: first half gate -> [E, d, f]
        return jnp.swapaxes(arr[:, :d_ff_expert], 1, 2)
    if how == "experts_up":
        return jnp.swapaxes(arr[:, d_ff_expert:], 1, 2)
    if how == "experts_T":  # [E, out, in] -> [E, in, out]
        return jnp.swapaxes(arr, 1, 2)
    if how == "id":
        return arr
    if how == "T":
        return arr.T
    if how == "conv":  # torch depthwise Conv1d weight [C, 1, K] -> [C, K]
        return arr.reshape(arr.shape[0], arr.shape[-1])
    if how == "gate":
        return arr[:d_ff].T
    if how == "up":
        return arr[d_ff:].T
    raise AssertionError(how)


def load_hf(path: str | Path, *, param_dtype: str = "float32", max_seq_len: int | None = None) -> HybridLM:
    """Load a Hugging Face checkpoint directory into a :class:`HybridLM`.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or a sharded index).
      param_dtype: ``"float32"`` or ``"bfloat16"`` storage for the loaded parameters.
      max_seq_len: override the context length (default ``max_position_embeddings``).

    Returns:
      The model, with ``model.config`` the translated :class:`ModelConfig`.

    Raises:
      FileNotFoundError: ``path`` or its files are missing.
      ValueError: unsupported architecture, a missing tensor, a tensor of the wrong shape, or tensors in the
        file that the model has no place for (each named in the message).
      NotImplementedError: a configuration feature we do not run (see :func:`config_from_hf`).
    """
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    hf = json.loads(cfg_file.read_text())
    cfg = dataclasses.replace(config_from_hf(hf, max_seq_len=max_seq_len), param_dtype=param_dtype)
    tensors = _read_safetensors(path)
    if cfg.tie_embeddings and "lm_head.weight" in tensors:
        if not np.array_equal(np.asarray(tensors["lm_head.weight"]), np.asarray(tensors["model.embed_tokens.weight"])):
            raise ValueError(f"{path}: tie_word_embeddings is true but lm_head.weight differs from embed_tokens")
        tensors.pop("lm_head.weight")

    abstract, flat = abstract_params(cfg)
    name_map = _hf_name_map(cfg, hf["model_type"])
    used: set[str] = set()
    dtype = jnp.float32 if param_dtype == "float32" else jnp.bfloat16
    for key_t, var in flat.items():
        if key_t not in name_map:
            raise AssertionError(f"no Hugging Face mapping for parameter {key_t}")
        hf_names, how = name_map[key_t]
        names = hf_names if isinstance(hf_names, list) else [hf_names]
        for name in names:
            if name not in tensors:
                raise ValueError(f"{path}: missing tensor {name!r} (needed for {'.'.join(map(str, key_t))})")
        src = [tensors[n] for n in names] if isinstance(hf_names, list) else tensors[hf_names]
        if how in ("gate", "up") and src.shape[0] != 2 * cfg.d_ff:
            raise ValueError(f"{path}: tensor {hf_names!r} has shape {src.shape}; expected "
                             f"[{2 * cfg.d_ff}, {cfg.d_model}]")
        if how in ("experts_gate", "experts_up") and (src.ndim != 3 or src.shape[1] != 2 * cfg.d_ff_expert):
            raise ValueError(f"{path}: tensor {hf_names!r} has shape {src.shape}; expected "
                             f"[{cfg.n_experts}, {2 * cfg.d_ff_expert}, {cfg.d_model}]")
        try:
            arr = _transform(src, how, cfg.d_ff, cfg.d_ff_expert)
        except (ValueError, TypeError) as e:  # e.g. experts of different shapes cannot be stacked
            raise ValueError(f"{path}: tensors {names[:2]}... for {'.'.join(map(str, key_t))}: {e}") from e
        if tuple(arr.shape) != tuple(var.shape):
            shown = names[0] if len(names) == 1 else f"{names[0]} (and {len(names) - 1} more)"
            raise ValueError(f"{path}: tensor {shown!r} gives shape {tuple(arr.shape)}; it maps to "
                             f"{'.'.join(map(str, key_t))} of shape {tuple(var.shape)} after '{how}'")
        var.set_value(jnp.asarray(arr, dtype))
        used.update(names)
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"{path}: tensors with no place in the model: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    return assemble_model(abstract, flat)


def load_hf_with_tokenizer(path: str | Path, **kwargs):
    """:func:`load_hf` plus the directory's tokenizer: ``model, tok = load_hf_with_tokenizer(path)``.

    ``tok`` is a :class:`mani_jax.hf_tokenizer.HFTokenizer` (``tokenizer.json`` + ``tokenizer_config.json`` +
    ``generation_config.json``); ``kwargs`` go to :func:`load_hf`.

    Raises:
      ValueError: as :func:`load_hf` and :meth:`HFTokenizer.load`, or when the tokenizer has more ids than the
        model's embedding rows (the model could not embed them; real checkpoints pad the embedding instead,
        e.g. Qwen2.5: 151665 tokenizer ids, 151936 rows).
    """
    from mani_jax.hf_tokenizer import HFTokenizer

    tok = HFTokenizer.load(path)
    model = load_hf(path, **kwargs)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"{path}: tokenizer.json has {tok.vocab_size} ids but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    return model, tok
