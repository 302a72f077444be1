"""Independent float64 numpy re-implementation of the golden models (no torch, no transformers).

It reads only tests/golden/<name>/{config.json, model.safetensors, golden.npz} and recomputes the
logits (and every per-layer activation stored in golden.npz) from the written-down math, using a plain
sequential Mamba-2 recurrence (no chunking). It documents the forward pass the JAX models must match
and checks that description against the HF goldens:

    /work/venv-golden/bin/python tests/golden/numpy_reference.py

Needs numpy + safetensors only (safetensors.numpy). Not collected by pytest (name has no test_ prefix).

For the MoE goldens (mixtral, granite_hybrid_moe) it also prints the per-expert load of every MoE layer
on the golden inputs, and re-runs the forward with deliberately wrong router / expert conventions to
show that the goldens tell them apart (``--no-perturb`` skips that).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file

HERE = os.path.dirname(os.path.abspath(__file__))


def _json_float(v):
    # transformers 5.x writes non-finite floats as {"__float__": "Infinity"}
    if isinstance(v, dict) and "__float__" in v:
        return float(v["__float__"].replace("Infinity", "inf"))
    return v


def load(name):
    d = os.path.join(HERE, name)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    w = {k: v.astype(np.float64) for k, v in load_file(os.path.join(d, "model.safetensors")).items()}
    g = dict(np.load(os.path.join(d, "golden.npz")))
    return cfg, w, g


def rms_norm(x, weight, eps):
    var = np.mean(x * x, axis=-1, keepdims=True)
    return weight * (x / np.sqrt(var + eps))


def silu(x):
    return x / (1.0 + np.exp(-x))


def softplus(x):
    return np.logaddexp(0.0, x)


def linear(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def rope_theta(cfg):
    rp = cfg.get("rope_parameters") or {}
    return float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def rope_cos_sin(T, head_dim, theta):
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [hd/2]
    freqs = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]  # [T, hd/2]
    emb = np.concatenate([freqs, freqs], axis=-1)  # [T, hd]  (NOT interleaved)
    return np.cos(emb), np.sin(emb)


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def attention(x, w, p, cfg, *, scale, use_rope, qkv_bias):
    B, T, H = x.shape
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or H // nh
    q = linear(x, w[p + "q_proj.weight"], w.get(p + "q_proj.bias") if qkv_bias else None)
    k = linear(x, w[p + "k_proj.weight"], w.get(p + "k_proj.bias") if qkv_bias else None)
    v = linear(x, w[p + "v_proj.weight"], w.get(p + "v_proj.bias") if qkv_bias else None)
    q = q.reshape(B, T, nh, hd).transpose(0, 2, 1, 3)  # [B, nh, T, hd]
    k = k.reshape(B, T, nkv, hd).transpose(0, 2, 1, 3)
    v = v.reshape(B, T, nkv, hd).transpose(0, 2, 1, 3)
    if use_rope:
        cos, sin = rope_cos_sin(T, hd, rope_theta(cfg))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
    rep = nh // nkv  # query head h uses kv head h // rep
    k = np.repeat(k, rep, axis=1)
    v = np.repeat(v, rep, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
    mask = np.tril(np.ones((T, T), dtype=bool))
    s = np.where(mask, s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    pr = np.exp(s)
    pr /= pr.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bhkd->bhqd", pr, v).transpose(0, 2, 1, 3).reshape(B, T, nh * hd)
    return linear(o, w[p + "o_proj.weight"], w.get(p + "o_proj.bias"))


def mamba2(x, w, p, cfg):
    """GraniteMoeHybridMambaLayer (torch_forward path), as a plain sequential recurrence."""
    B, T, H = x.shape
    nh, hd = cfg["mamba_n_heads"], cfg["mamba_d_head"]
    ng, N, K = cfg["mamba_n_groups"], cfg["mamba_d_state"], cfg["mamba_d_conv"]
    d_inner = cfg["mamba_expand"] * H
    assert nh * hd == d_inner
    conv_dim = d_inner + 2 * ng * N
    eps = cfg["rms_norm_eps"]
    lo, hi = (_json_float(v) for v in cfg.get("time_step_limit", [0.0, float("inf")]))

    zxbcdt = linear(x, w[p + "in_proj.weight"], w.get(p + "in_proj.bias"))  # [B,T,d_inner+conv_dim+nh]
    z = zxbcdt[..., :d_inner]
    xBC = zxbcdt[..., d_inner : d_inner + conv_dim]
    dt_raw = zxbcdt[..., d_inner + conv_dim :]
    assert dt_raw.shape[-1] == nh

    # depthwise causal conv1d: out[t,c] = bias[c] + sum_k W[c,0,k] * xBC[t-(K-1)+k, c]
    cw = w[p + "conv1d.weight"][:, 0, :]  # [conv_dim, K]
    pad = np.concatenate([np.zeros((B, K - 1, conv_dim)), xBC], axis=1)
    conv = np.zeros_like(xBC)
    for k in range(K):
        conv += pad[:, k : k + T, :] * cw[:, k]
    if p + "conv1d.bias" in w:
        conv += w[p + "conv1d.bias"]
    xBC = silu(conv)
    xs = xBC[..., :d_inner].reshape(B, T, nh, hd)
    Bm = xBC[..., d_inner : d_inner + ng * N].reshape(B, T, ng, N)
    Cm = xBC[..., d_inner + ng * N :].reshape(B, T, ng, N)
    # group g serves heads [g*nh/ng, (g+1)*nh/ng)
    Bm = np.repeat(Bm, nh // ng, axis=2)  # [B,T,nh,N]
    Cm = np.repeat(Cm, nh // ng, axis=2)

    dt = np.clip(softplus(dt_raw + w[p + "dt_bias"]), lo, hi)  # [B,T,nh]
    A = -np.exp(w[p + "A_log"])  # [nh]
    D = w[p + "D"]  # [nh]

    h = np.zeros((B, nh, hd, N))
    ys = np.zeros((B, T, nh, hd))
    for t in range(T):
        dA = np.exp(dt[:, t] * A)  # [B,nh]
        h = h * dA[:, :, None, None] + (dt[:, t, :, None] * xs[:, t])[..., None] * Bm[:, t, :, None, :]
        ys[:, t] = np.einsum("bhpn,bhn->bhp", h, Cm[:, t]) + D[:, None] * xs[:, t]
    y = ys.reshape(B, T, d_inner)

    # gated RMSNorm: norm(y * silu(z)), normalised per group of d_inner/ng channels, then * weight
    g = y * silu(z)
    gs = g.reshape(B, T, ng, d_inner // ng)
    gs = gs / np.sqrt(np.mean(gs * gs, -1, keepdims=True) + eps)
    g = gs.reshape(B, T, d_inner) * w[p + "norm.weight"]
    return linear(g, w[p + "out_proj.weight"], w.get(p + "out_proj.bias"))


# ----------------------------------------------------------------------------------------------
# Sparse MoE FFN
# ----------------------------------------------------------------------------------------------

# The router conventions the forward can be run with. The first two are what transformers 5.23 does:
#   Mixtral (MixtralTopKRouter):           p = softmax(logits) in fp32; (w, idx) = topk(p, k); w /= sum(w)
#   GraniteMoeHybrid (...TopKRouter):      (l, idx) = topk(logits, k); w = softmax(l)  (in fp32)
# They are the same function: softmax over the k largest logits == top-k softmax probabilities
# renormalised to sum 1 (ties aside). The rest are deliberate mistakes.
ROUTERS = {
    "softmax_topk_renorm": "softmax over all E, take top-k probabilities, renormalise them to sum 1 (Mixtral)",
    "topk_softmax": "top-k of the logits, softmax over those k logits (GraniteMoeHybrid)",
    "softmax_topk_no_renorm": "WRONG: softmax over all E, top-k probabilities used as-is (no renormalisation)",
    "top1": "WRONG: only the best expert, weight 1",
    "topk_uniform": "WRONG: top-k experts, each weight 1/k",
}


def moe_weights(w, p, arch, E):
    """Experts of one layer as (router [E,d], gate [E,I,d], up [E,I,d], down [E,d,I]), from the on-disk names.

    Mixtral on disk (save_pretrained reverts transformers 5's fused in-memory layout to the original one):
        {p}block_sparse_moe.gate.weight            [E, d]     router, no bias
        {p}block_sparse_moe.experts.{e}.w1.weight  [I, d]     gate  (silu applied to x @ w1.T)
        {p}block_sparse_moe.experts.{e}.w3.weight  [I, d]     up
        {p}block_sparse_moe.experts.{e}.w2.weight  [d, I]     down
      (in memory: mlp.gate.weight, mlp.experts.gate_up_proj [E, 2I, d] = concat(w1, w3) on dim 1,
       mlp.experts.down_proj [E, d, I] = stack(w2); both layouts are accepted here)
    GraniteMoeHybrid on disk (same arrays as in memory, only renamed on load):
        {p}block_sparse_moe.router.layer.weight    [E, d]       router, no bias   (memory: router.weight)
        {p}block_sparse_moe.input_linear.weight    [E, 2I, d]   rows [:I] gate, rows [I:] up
                                                                 (memory: experts.gate_up_proj)
        {p}block_sparse_moe.output_linear.weight   [E, d, I]    down (memory: experts.down_proj)
    """
    if arch == "MixtralForCausalLM":
        q = p + "block_sparse_moe."
        if q + "gate.weight" not in w:  # transformers-5 in-memory names
            q = p + "mlp."
        router = w[q + "gate.weight"]
        if q + "experts.0.w1.weight" in w:
            gate = np.stack([w[f"{q}experts.{e}.w1.weight"] for e in range(E)])
            up = np.stack([w[f"{q}experts.{e}.w3.weight"] for e in range(E)])
            down = np.stack([w[f"{q}experts.{e}.w2.weight"] for e in range(E)])
            return router, gate, up, down
        gate_up, down = w[q + "experts.gate_up_proj"], w[q + "experts.down_proj"]
    else:
        q = p + "block_sparse_moe."
        if q + "router.layer.weight" in w:
            router, gate_up, down = (w[q + n] for n in ("router.layer.weight", "input_linear.weight", "output_linear.weight"))
        else:
            router, gate_up, down = (w[q + n] for n in ("router.weight", "experts.gate_up_proj", "experts.down_proj"))
    I = gate_up.shape[1] // 2
    return router, gate_up[:, :I], gate_up[:, I:], down


def route(logits, k, router):
    """logits [N, E] -> (index [N, k], weight [N, k]), experts in descending order of logit."""
    idx = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    top = np.take_along_axis(logits, idx, axis=-1)
    if router == "softmax_topk_renorm":
        prob = np.exp(logits - logits.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        wt = np.take_along_axis(prob, idx, axis=-1)
        wt = wt / wt.sum(-1, keepdims=True)
    elif router == "topk_softmax":
        wt = np.exp(top - top.max(-1, keepdims=True))
        wt /= wt.sum(-1, keepdims=True)
    elif router == "softmax_topk_no_renorm":
        prob = np.exp(logits - logits.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        wt = np.take_along_axis(prob, idx, axis=-1)
    elif router == "top1":
        idx, wt = idx[:, :1], np.ones_like(top[:, :1])
    elif router == "topk_uniform":
        wt = np.full_like(top, 1.0 / k)
    else:
        raise ValueError(router)
    return idx, wt


def moe_ffn(x, mw, k, router, *, swap_gate_up=False, expert_perm=None, stats=None):
    """Sparse MoE: y[n] = sum_j wt[n, j] * down_e(silu(gate_e x[n]) * up_e x[n]), e = idx[n, j]."""
    router_w, gate, up, down = mw
    if swap_gate_up:
        gate, up = up, gate
    if expert_perm is not None:  # e.g. reading the experts in the wrong order
        gate, up, down = gate[expert_perm], up[expert_perm], down[expert_perm]
    shape = x.shape
    xf = x.reshape(-1, shape[-1])
    logits = xf @ router_w.T  # [N, E], no bias
    idx, wt = route(logits, k, router)
    y = np.zeros_like(xf)
    for j in range(idx.shape[1]):
        for e in np.unique(idx[:, j]):
            rows = idx[:, j] == e
            h = silu(xf[rows] @ gate[e].T) * (xf[rows] @ up[e].T)
            y[rows] += wt[rows, j, None] * (h @ down[e].T)
    if stats is not None:
        srt = np.sort(logits, axis=-1)[:, ::-1]
        stats.append({
            "load": np.bincount(idx.reshape(-1), minlength=router_w.shape[0]).tolist(),
            "min_margin": float(np.min(srt[:, k - 1] - srt[:, k])),
        })
    return y.reshape(shape)


def forward(cfg, w, ids, variant=None):
    """variant (MoE models only): router=<key of ROUTERS>, swap_gate_up, expert_perm, no_shared_mlp,
    no_routed_experts, stats=<list to append per-layer routing stats to>."""
    v = dict(variant or {})
    arch = cfg["architectures"][0]
    eps = cfg["rms_norm_eps"]
    H = cfg["hidden_size"]
    L = cfg["num_hidden_layers"]
    acts = {"layers": []}
    if arch == "GraniteMoeHybridForCausalLM":
        x = w["model.embed_tokens.weight"][ids] * cfg["embedding_multiplier"]
        acts["embeds"] = x
        rm = cfg["residual_multiplier"]
        for i in range(L):
            p = f"model.layers.{i}."
            kind = cfg["layer_types"][i]
            hn = rms_norm(x, w[p + "input_layernorm.weight"], eps)
            if kind in ("mamba", "linear_attention"):
                mix = mamba2(hn, w, p + "mamba.", cfg)
            elif kind in ("attention", "full_attention"):
                mix = attention(
                    hn, w, p + "self_attn.", cfg,
                    scale=cfg["attention_multiplier"],
                    use_rope=cfg.get("position_embedding_type") == "rope",
                    qkv_bias=cfg.get("attention_bias", False),
                )
            else:
                raise ValueError(kind)
            x = x + rm * mix
            hn = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
            # shared_mlp is always there; with experts the layer FFN is  moe(hn) + shared_mlp(hn)
            # (plain sum, no gate or scale on either), and the sum is scaled by residual_multiplier.
            gu = linear(hn, w[p + "shared_mlp.input_linear.weight"])
            I = gu.shape[-1] // 2
            ffn = linear(silu(gu[..., :I]) * gu[..., I:], w[p + "shared_mlp.output_linear.weight"])
            if v.get("no_shared_mlp"):
                ffn = 0.0 * ffn
            E = cfg.get("num_local_experts") or 0
            if E > 0 and not v.get("no_routed_experts"):
                mw = moe_weights(w, p, arch, E)
                ffn = ffn + moe_ffn(
                    hn, mw, cfg["num_experts_per_tok"], v.get("router", "topk_softmax"),
                    swap_gate_up=v.get("swap_gate_up", False), expert_perm=v.get("expert_perm"),
                    stats=v.get("stats"),
                )
            x = x + rm * ffn
            acts["layers"].append(x)
        x = rms_norm(x, w["model.norm.weight"], eps)
        acts["final"] = x
        lm = w.get("lm_head.weight", w["model.embed_tokens.weight"])
        logits = linear(x, lm) / cfg["logits_scaling"]
    elif arch == "Qwen2ForCausalLM":
        x = w["model.embed_tokens.weight"][ids]
        acts["embeds"] = x
        hd = cfg.get("head_dim") or H // cfg["num_attention_heads"]
        for i in range(L):
            p = f"model.layers.{i}."
            hn = rms_norm(x, w[p + "input_layernorm.weight"], eps)
            x = x + attention(hn, w, p + "self_attn.", cfg, scale=hd**-0.5, use_rope=True, qkv_bias=True)
            hn = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
            gate = linear(hn, w[p + "mlp.gate_proj.weight"])
            up = linear(hn, w[p + "mlp.up_proj.weight"])
            x = x + linear(silu(gate) * up, w[p + "mlp.down_proj.weight"])
            acts["layers"].append(x)
        x = rms_norm(x, w["model.norm.weight"], eps)
        acts["final"] = x
        lm = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
        logits = linear(x, lm)
    elif arch == "MixtralForCausalLM":
        assert cfg.get("sliding_window") is None or cfg["sliding_window"] >= ids.shape[1]
        x = w["model.embed_tokens.weight"][ids]
        acts["embeds"] = x
        hd = cfg.get("head_dim") or H // cfg["num_attention_heads"]  # "head_dim": null in the config
        E, k = cfg["num_local_experts"], cfg["num_experts_per_tok"]
        for i in range(L):
            p = f"model.layers.{i}."
            hn = rms_norm(x, w[p + "input_layernorm.weight"], eps)
            x = x + attention(hn, w, p + "self_attn.", cfg, scale=hd**-0.5, use_rope=True, qkv_bias=False)
            hn = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
            if not v.get("no_routed_experts"):
                x = x + moe_ffn(
                    hn, moe_weights(w, p, arch, E), k, v.get("router", "softmax_topk_renorm"),
                    swap_gate_up=v.get("swap_gate_up", False), expert_perm=v.get("expert_perm"),
                    stats=v.get("stats"),
                )
            acts["layers"].append(x)
        x = rms_norm(x, w["model.norm.weight"], eps)
        acts["final"] = x
        lm = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
        logits = linear(x, lm)
    else:
        raise ValueError(arch)
    return logits, acts


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def perturbations(cfg, w, g, ids):
    """Run the MoE forward with other conventions; return {variant: logits rel. error vs the golden}."""
    E = cfg["num_local_experts"]
    variants = {r: {"router": r} for r in ROUTERS}
    variants["swap_gate_up (w1<->w3)"] = {"swap_gate_up": True}
    variants["experts_reversed"] = {"expert_perm": np.arange(E)[::-1]}
    variants["no_routed_experts"] = {"no_routed_experts": True}
    if cfg["architectures"][0] == "GraniteMoeHybridForCausalLM":
        variants["no_shared_mlp"] = {"no_shared_mlp": True}
    return {n: rel_err(forward(cfg, w, ids, v)[0], g["logits"]) for n, v in variants.items()}


# conventions that must reproduce HF (the two written-down routers are the same function)
EQUIVALENT = {"softmax_topk_renorm", "topk_softmax"}


def main(argv):
    perturb = "--no-perturb" not in argv
    argv = [a for a in argv if not a.startswith("--")]
    names = argv or ["granite_hybrid_rope", "granite_hybrid_nope", "qwen2", "qwen2_tied", "mixtral", "granite_hybrid_moe"]
    ok = True
    for name in names:
        cfg, w, g = load(name)
        stats = []
        logits, acts = forward(cfg, w, g["input_ids"].astype(np.int64), {"stats": stats})
        errs = {
            "embeds": rel_err(acts["embeds"], g["embeds"]),
            "layers": [rel_err(a, b) for a, b in zip(acts["layers"], g["layer_outputs"])],
            "final": rel_err(acts["final"], g["final_hidden"]),
            "logits": rel_err(logits, g["logits"]),
            "logits_maxabs": float(np.max(np.abs(logits - g["logits"]))),
        }
        good = errs["logits"] < 1e-4 and max(errs["layers"]) < 1e-4
        ok &= good
        print(f"{name}: {'OK' if good else 'MISMATCH'} {json.dumps(errs)}")
        for i, st in enumerate(stats):
            print(f"  moe layer {i}: per-expert load (of {2 * g['input_ids'].size} slots) {st['load']}, "
                  f"min top-k margin {st['min_margin']:.2e}")
        if stats and perturb:
            pert = perturbations(cfg, w, g, g["input_ids"].astype(np.int64))
            for n, e in pert.items():
                expect_same = n in EQUIVALENT
                fine = (e < 1e-4) if expect_same else (e > 1e-3)
                ok &= fine
                verdict = ("matches HF" if e < 1e-4 else "differs") + ("" if fine else "  <-- UNEXPECTED")
                print(f"  router/expert variant {n:28s} logits rel err {e:.2e}  {verdict}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
