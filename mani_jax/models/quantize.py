"""Weight-only quantization of a loaded model, in place (:mod:`mani_jax.core.quant` does the math).

``quantize_model(model, "int8" | "int4" | "nf4")`` replaces every projection ``nnx.Linear`` (attention
q/k/v/o, SwiGLU gate/up/down, Mamba-2 in/out projections, the untied ``lm_head``) by a
:class:`QuantizedLinear` and every MoE expert stack by its quantized form; the matmuls then dequantize on
the fly. Embeddings, norms, the SSM scalars, the conv and the MoE router stay in floating point (they are
small, and the router's top-k choice is sensitive to error).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mani_jax.core.quant import SCHEMES, QuantizedArray, quantize, quantized_matmul

Array = jax.Array

_EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


class QuantizedWeight(nnx.Variable):
    """An NNX variable holding a :class:`~mani_jax.core.quant.QuantizedArray` (not a trainable ``Param``)."""


class QuantizedLinear(nnx.Module):
    """``y = x @ dequantize(weight) + bias``: a frozen, weight-only quantized ``nnx.Linear``.

    ``weight`` holds the ``[in_features, out_features]`` kernel quantized along ``in_features``; the bias
    (if any) stays a float ``Param``. Output dtype = input dtype; accumulation in float32.
    """

    def __init__(self, linear: nnx.Linear, scheme: str, *, group_size: int = 64, double_quant: bool = False):
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = QuantizedWeight(quantize(linear.kernel[...], scheme, group_size=group_size,
                                               double_quant=double_quant))
        self.bias = linear.bias

    def __call__(self, x: Array) -> Array:
        y = quantized_matmul(x, self.weight.get_value())
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)


def weight_value(v: nnx.Variable, dtype=None) -> Array:
    """The float array of a (possibly quantized) weight variable; quantized ones are dequantized to
    ``dtype`` (default float32), float ones are returned as stored."""
    value = v.get_value()
    if isinstance(value, QuantizedArray):
        return value.dequantize(jnp.float32 if dtype is None else dtype)
    return value


def quantize_model(model: nnx.Module, scheme: str, *, group_size: int = 64, double_quant: bool = False,
                   include_lm_head: bool = True) -> dict:
    """Quantize ``model``'s projection weights in place.

    Args:
      model: a :class:`~mani_jax.models.HybridLM` (or any module tree of ``nnx.Linear`` / ``MoEFFN``).
      scheme: ``"int8"``, ``"int4"`` or ``"nf4"`` (see :mod:`mani_jax.core.quant`).
      group_size: int4 group / NF4 block size along the input dimension (must divide every quantized
        layer's ``in_features``; 32, 64 or 128).
      double_quant: NF4 double quantization of the block scales.
      include_lm_head: also quantize an untied ``lm_head``.

    Returns:
      ``{"n_quantized": tensors quantized, "float_bytes": their bytes before, "quantized_bytes": after}``.

    Raises:
      ValueError: unknown ``scheme``, or ``group_size`` does not divide a layer's input width (nothing is
        modified in that case: every weight is quantized first, then swapped in).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
    plan: list[tuple[nnx.Module, str, object]] = []

    def visit(module, name_path):
        for name, val in list(vars(module).items()):
            if name == "router" or (name == "lm_head" and not include_lm_head):
                continue
            if isinstance(val, nnx.Linear):
                try:
                    plan.append((module, name, QuantizedLinear(val, scheme, group_size=group_size,
                                                               double_quant=double_quant)))
                except ValueError as e:
                    raise ValueError(f"{'.'.join(name_path + [name])}: {e}") from None
            elif name in _EXPERT_WEIGHTS and isinstance(val, nnx.Param):
                try:
                    plan.append((module, name, QuantizedWeight(quantize(val[...], scheme, group_size=group_size,
                                                                        double_quant=double_quant))))
                except ValueError as e:
                    raise ValueError(f"{'.'.join(name_path + [name])}: {e}") from None
            elif isinstance(val, nnx.List):
                for i, item in enumerate(val):
                    if isinstance(item, nnx.Module):
                        visit(item, name_path + [f"{name}[{i}]"])
            elif isinstance(val, nnx.Module):
                visit(val, name_path + [name])

    visit(model, [])
    float_bytes = quant_bytes = 0
    for module, name, new in plan:
        old = getattr(module, name)
        float_bytes += old.kernel[...].nbytes if isinstance(old, nnx.Linear) else old[...].nbytes
        quant_bytes += (new.weight if isinstance(new, QuantizedLinear) else new).get_value().nbytes
        setattr(module, name, new)
    return {"n_quantized": len(plan), "float_bytes": int(float_bytes), "quantized_bytes": int(quant_bytes)}
