"""Model configuration: one frozen dataclass for the whole hybrid family, with named presets.

A config with every layer ``"attention"`` is a dense decoder (Qwen2/Llama family); mixing in
``"mamba"`` layers gives the Mamba-2 + attention hybrid (Granite-4.0-H / Jamba / Nemotron-H style). The
fields mirror Hugging Face ``GraniteMoeHybridConfig`` / ``Qwen2Config`` and llama.cpp ``granitehybrid``
metadata so that checkpoints move between the three without loss.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from mani_jax.config import apply_overrides, get_preset, parse_overrides

LayerType = Literal["attention", "mamba"]
LAYER_TYPES = ("attention", "mamba")
ATTENTION_IMPLS = ("xla", "pallas", "cudnn")
SSD_IMPLS = ("xla", "pallas")
PAGED_ATTENTION_IMPLS = ("xla", "pallas")
REMAT_POLICIES = ("none", "full", "save_dots", "offload")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of :class:`mani_jax.models.HybridLM`.

    Attributes:
      vocab_size, d_model, n_layers: embedding rows, residual width, number of blocks.
      layer_types: one of ``"attention"`` / ``"mamba"`` per layer (the mixer of each block).
      n_heads, n_kv_heads, head_dim: attention heads (GQA when ``n_kv_heads < n_heads``).
      d_ff: SwiGLU hidden width.
      rope, rope_theta: rotary embedding on/off (NoPE when off, as Granite-4.0-H) and its base.
      attention_bias: biases on q/k/v projections (Qwen2); attention_out_bias: bias on the output projection.
      mlp_bias: biases in the SwiGLU projections.
      sliding_window: optional attention window (tokens), None for full attention.
      expand, mamba_n_heads, mamba_head_dim, d_state, d_conv, n_groups, chunk_size: Mamba-2 mixer;
        ``d_inner = expand * d_model = mamba_n_heads * mamba_head_dim`` (llama.cpp requires expand 2).
      mamba_conv_bias, mamba_proj_bias: biases of the conv and of in/out projections.
      norm_eps: one RMSNorm epsilon for every norm (llama.cpp uses one for the SSM norm too).
      tie_embeddings: the output head reuses the embedding matrix.
      embedding_multiplier, attention_multiplier, residual_multiplier, logits_scaling: Granite's scalars
        (embeddings times ``embedding_multiplier``; softmax scale ``attention_multiplier``, default
        ``1/sqrt(head_dim)``; each branch times ``residual_multiplier``; logits divided by ``logits_scaling``).
      n_experts, top_k, d_ff_expert: a routed SwiGLU mixture of experts in every block's FFN when
        ``n_experts > 0`` (softmax -> top-k -> renormalise, Mixtral / llama.cpp); 0 = dense FFN of width d_ff.
      shared_mlp: with experts, also a dense SwiGLU of width ``d_ff`` added to the experts' output
        (Granite-4.0-H's ``shared_mlp``).
      capacity_factor: None = dropless dispatch (sort + grouped matmul); a number = capacity-based dispatch.
      moe_dispatch: capacity path's dispatch, ``"einsum"`` (GShard one-hot tensors), ``"gather"``, or
        ``"all_to_all"``: expert parallelism with the all-to-all written out (``shard_map`` over a sharded
        step's ``expert`` axis, :func:`mani_jax.parallel.expert_parallel_moe`; capacity per batch shard;
        needs ``capacity_factor``; without a mesh it computes as ``"gather"``).
      dropless_impl: dropless path's grouped matmul, ``"ragged_dot"`` (GPU/TPU) or ``"blocked"`` (CPU).
      router_aux_loss_coef: alpha of the Switch load-balancing loss added to the training loss (our loss is
        1.0 at uniform routing, so this adds ``alpha`` when balanced; Switch uses 1e-2).
      router_z_loss_coef: coefficient of the ST-MoE router z-loss in the training loss (ST-MoE uses 1e-3).
      max_seq_len: context length the model is trained for (cache size default, GGUF ``context_length``).
      initializer_range: std of the normal init of projections and embeddings.
      param_dtype: storage dtype of parameters (``"float32"`` or ``"bfloat16"``).
      attention_impl: attention of the full-sequence (training / uncached prefill) path, one of
        :data:`ATTENTION_IMPLS`: ``"xla"`` (the ``mani_jax.core`` reference), ``"pallas"`` (the
        ``kernels.flash_attention`` FlashAttention-2 kernels) or ``"cudnn"`` (``jax.nn.dot_product_attention``
        with cuDNN; GPU only); see :mod:`mani_jax.models.attention_impls`. Cached decode always uses the
        reference.
      attention_interpret: run the ``"pallas"`` attention kernels (flash and paged) in Pallas interpret mode
        (CPU tests; slow).
      ssd_impl: chunked SSD of the Mamba-2 layers' full-sequence path (training / prefill), one of
        :data:`SSD_IMPLS`: ``"xla"`` (:func:`mani_jax.core.ssd_chunked`) or ``"pallas"`` (the
        ``kernels.ssd`` kernels, forward and backward). Token-by-token decode always uses the reference step.
      ssd_interpret: run the ``"pallas"`` SSD kernels in Pallas interpret mode (CPU tests; slow).
      paged_attention_impl: attention of one-token-per-row steps over the paged KV cache
        (:meth:`HybridLM.forward_paged`, the engine's decode), one of :data:`PAGED_ATTENTION_IMPLS`:
        ``"xla"`` (:func:`mani_jax.core.paged_attention`, gathers pages) or ``"pallas"`` (the
        ``kernels.paged_attention`` split-K kernel; ``attention_interpret`` applies). Multi-token paged steps
        (chunked prefill, speculative verification) always use the reference.
      remat: gradient-checkpointing policy of the blocks in training (:mod:`mani_jax.models.remat`): one of
        :data:`REMAT_POLICIES` for every block, or a comma-separated policy per layer (``"full,none,..."``).
    """

    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    layer_types: tuple[str, ...] = ("mamba", "mamba", "mamba", "attention")
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 64
    d_ff: int = 768
    rope: bool = True
    rope_theta: float = 10000.0
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    expand: int = 2
    mamba_n_heads: int = 8
    mamba_head_dim: int = 64
    d_state: int = 64
    d_conv: int = 4
    n_groups: int = 1
    chunk_size: int = 64
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    embedding_multiplier: float = 1.0
    attention_multiplier: float | None = None
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    n_experts: int = 0
    top_k: int = 2
    d_ff_expert: int = 0
    shared_mlp: bool = False
    capacity_factor: float | None = None
    moe_dispatch: str = "einsum"
    dropless_impl: str = "ragged_dot"
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    max_seq_len: int = 2048
    initializer_range: float = 0.02
    param_dtype: str = "float32"
    attention_impl: str = "xla"
    attention_interpret: bool = False
    ssd_impl: str = "xla"
    ssd_interpret: bool = False
    paged_attention_impl: str = "xla"
    remat: str = "none"

    def __post_init__(self):
        def bad(field, expected):
            raise ValueError(f"ModelConfig.{field}: expected {expected}, got {getattr(self, field)!r}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                     "d_state", "d_conv", "n_groups", "chunk_size", "mamba_n_heads", "mamba_head_dim",
                     "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "a positive int")
        if len(self.layer_types) != self.n_layers:
            bad("layer_types", f"{self.n_layers} entries (one per layer)")
        for t in self.layer_types:
            if t not in LAYER_TYPES:
                bad("layer_types", f"entries in {LAYER_TYPES}")
        if self.n_attention_layers and self.n_heads % self.n_kv_heads:
            bad("n_kv_heads", f"a divisor of n_heads={self.n_heads}")
        if self.n_mamba_layers:
            if self.mamba_n_heads * self.mamba_head_dim != self.d_inner:
                bad("mamba_head_dim", f"mamba_n_heads * mamba_head_dim == expand * d_model = {self.d_inner}")
            if self.mamba_n_heads % self.n_groups:
                bad("n_groups", f"a divisor of mamba_n_heads={self.mamba_n_heads}")
        if self.n_experts < 0:
            bad("n_experts", "0 (dense) or a positive int")
        if self.n_experts:
            if not 1 <= self.top_k <= self.n_experts:
                bad("top_k", f"an int in [1, n_experts={self.n_experts}]")
            if self.d_ff_expert < 1:
                bad("d_ff_expert", "a positive int when n_experts > 0")
            if self.capacity_factor is not None and self.capacity_factor <= 0:
                bad("capacity_factor", "None (dropless) or a positive number")
            if self.moe_dispatch not in ("einsum", "gather", "all_to_all"):
                bad("moe_dispatch", "'einsum', 'gather' or 'all_to_all'")
            if self.moe_dispatch == "all_to_all" and self.capacity_factor is None:
                bad("capacity_factor", "a positive number with moe_dispatch='all_to_all' (fixed-size expert buffers "
                    "are what the all-to-all moves; None means dropless)")
            if self.dropless_impl not in ("ragged_dot", "blocked"):
                bad("dropless_impl", "'ragged_dot' or 'blocked'")
            for name in ("router_aux_loss_coef", "router_z_loss_coef"):
                if not getattr(self, name) >= 0:
                    bad(name, "a number >= 0")
        if self.rope and self.head_dim % 2:
            bad("head_dim", "an even number when rope is on")
        if self.param_dtype not in ("float32", "bfloat16"):
            bad("param_dtype", "'float32' or 'bfloat16'")
        if self.sliding_window is not None and self.sliding_window < 1:
            bad("sliding_window", "None or a positive int")
        if self.attention_impl not in ATTENTION_IMPLS:
            bad("attention_impl", f"one of {ATTENTION_IMPLS}")
        if self.ssd_impl not in SSD_IMPLS:
            bad("ssd_impl", f"one of {SSD_IMPLS}")
        if self.paged_attention_impl not in PAGED_ATTENTION_IMPLS:
            bad("paged_attention_impl", f"one of {PAGED_ATTENTION_IMPLS}")
        policies = self.remat.split(",")
        if any(p not in REMAT_POLICIES for p in policies) or len(policies) not in (1, self.n_layers):
            bad("remat", f"one of {REMAT_POLICIES}, or a comma-separated list of {self.n_layers} of them")

    @property
    def remat_policies(self) -> tuple[str, ...]:
        """The remat policy of each layer (``remat`` expanded to ``n_layers`` entries)."""
        policies = tuple(self.remat.split(","))
        return policies * self.n_layers if len(policies) == 1 else policies

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def conv_dim(self) -> int:
        """Channels through the conv: ``x``, ``B`` and ``C`` (``d_inner + 2 * n_groups * d_state``)."""
        return self.d_inner + 2 * self.n_groups * self.d_state

    @property
    def n_attention_layers(self) -> int:
        return sum(t == "attention" for t in self.layer_types)

    @property
    def n_mamba_layers(self) -> int:
        return sum(t == "mamba" for t in self.layer_types)


def hybrid_layer_types(n_layers: int, attention_every: int, offset: int | None = None) -> tuple[str, ...]:
    """One attention layer in every ``attention_every`` (the last of each group by default), the rest Mamba-2.

    ``attention_every=1`` gives an all-attention model; ``attention_every > n_layers`` with no offset gives
    all Mamba-2 except none. ``offset`` is the index within each group that is attention.
    """
    if attention_every < 1:
        raise ValueError(f"attention_every: expected a positive int, got {attention_every}")
    off = attention_every - 1 if offset is None else offset
    return tuple("attention" if i % attention_every == off else "mamba" for i in range(n_layers))


def _preset(**kw) -> ModelConfig:
    return ModelConfig(**kw)


PRESETS: dict[str, ModelConfig] = {
    # ~1M parameters: the test / smoke preset (finishes its experiment in < 3 min on 2 cores).
    "smoke": _preset(vocab_size=1024, d_model=128, n_layers=4, layer_types=hybrid_layer_types(4, 4, 2),
                     n_heads=4, n_kv_heads=2, head_dim=32, d_ff=384, mamba_n_heads=8, mamba_head_dim=32,
                     d_state=32, chunk_size=32, max_seq_len=128),
    # 5-20M parameters, sized so `python -m experiments.chimera` trains in its time budget on 2 CPU cores.
    "tiny": _preset(vocab_size=2048, d_model=256, n_layers=6, layer_types=hybrid_layer_types(6, 3),
                    n_heads=4, n_kv_heads=2, head_dim=64, d_ff=768, mamba_n_heads=8, mamba_head_dim=64,
                    d_state=32, chunk_size=64, max_seq_len=256, tie_embeddings=False),
    # 700M +/- 5% (counted with jax.eval_shape in the tests): one attention layer in six, Granite-4.0-H style.
    "chimera-700m": _preset(vocab_size=32000, d_model=1536, n_layers=24, layer_types=hybrid_layer_types(24, 6),
                            n_heads=12, n_kv_heads=4, head_dim=128, d_ff=3072, mamba_n_heads=48,
                            mamba_head_dim=64, d_state=128, chunk_size=256, max_seq_len=4096),
    # Mixtral-style sparse MoE: 8 experts, top-2, ~125M active of ~369M parameters (counted with eval_shape).
    "moe-125m-active": _preset(vocab_size=32000, d_model=768, n_layers=12, layer_types=("attention",) * 12,
                               n_heads=12, n_kv_heads=4, head_dim=64, d_ff=1472, n_experts=8, top_k=2,
                               d_ff_expert=1472, max_seq_len=2048),
    # An all-attention member of the family (Qwen2-style: q/k/v biases, GQA), exported as llama/qwen2.
    "dense-tiny": _preset(vocab_size=4096, d_model=256, n_layers=6, layer_types=("attention",) * 6,
                          n_heads=4, n_kv_heads=2, head_dim=64, d_ff=768, attention_bias=True,
                          max_seq_len=256),
}


def get_config(name: str, overrides: list[str] | dict | None = None) -> ModelConfig:
    """Preset ``name`` with ``key=value`` overrides applied.

    ``layer_types`` can be overridden as a comma list, and ``n_layers`` overrides keep the preset's pattern
    when ``layer_types`` is not given too.

    Raises:
      ValueError: unknown preset, unknown field or a value that fails validation.
    """
    cfg = get_preset(PRESETS, name, "model preset")
    if not overrides:
        return cfg
    ov = dict(overrides) if isinstance(overrides, dict) else parse_overrides(overrides)
    if "n_layers" in ov and "layer_types" not in ov:
        n = int(ov["n_layers"])
        period = next((i + 1 for i, t in enumerate(cfg.layer_types) if t == "attention"), n + 1)
        ov["layer_types"] = ",".join(hybrid_layer_types(n, period)) if cfg.n_mamba_layers else \
            ",".join(["attention"] * n)
    # Validate the combination once, after all fields changed (dataclasses.replace re-runs __post_init__).
    return apply_overrides(cfg, ov)


def config_from_dict(d: dict) -> ModelConfig:
    """Rebuild a :class:`ModelConfig` from :func:`dataclasses.asdict` output (JSON round trip)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"config: unknown fields {sorted(unknown)}")
    d = dict(d)
    if "layer_types" in d:
        d["layer_types"] = tuple(d["layer_types"])
    return ModelConfig(**d)
