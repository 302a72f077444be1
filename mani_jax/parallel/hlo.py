"""What a compiled step costs: collective bytes from the optimized HLO, memory from XLA's memory analysis.

:func:`collective_stats` reads the text of a compiled executable (``jax.jit(f).lower(...).compile()
.as_text()``), finds every collective (``all-reduce``, ``all-gather``, ``reduce-scatter``, ``all-to-all``,
``collective-permute``, sync or ``-start`` async forms) and adds up the bytes of its result per device,
multiplying ops inside ``while`` loops by the loop's trip count (XLA's ``known_trip_count``, present for
``lax.scan`` / ``fori_loop`` with static bounds), recursively. The result bytes are what one device
receives / holds after the op; the bytes a ring algorithm puts on the wire are about ``2 (n-1)/n`` of
that for all-reduce and ``(n-1)/n`` for all-gather and reduce-scatter (Patarasuk & Yuan 2009), which
``wire_bytes`` applies.

:func:`memory_stats` reads ``compiled.memory_analysis()`` (per device for an SPMD executable): argument,
output, temporary (activations, gradients, workspace) and generated-code bytes.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

__all__ = ["COLLECTIVES", "collective_stats", "memory_stats"]

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_OP = re.compile(r"=\s*(\(.*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+(" + "|".join(COLLECTIVES) +
                 r")(-start)?\(")
_WHILE = re.compile(r"\bwhile\(.*?body=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_GROUPS = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        if dtype not in _DTYPE_BYTES:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


def _group_size(line: str) -> int:
    m = _GROUPS_MESH.search(line)
    if m:  # replica_groups=mesh['pipeline'=1,'data'=8,...] {'data'}: the product of the listed axes
        sizes = {k.strip().strip("'"): int(v) for k, v in (kv.split("=") for kv in m.group(1).split(","))}
        n = 1
        for a in m.group(2).split(","):
            n *= sizes.get(a.strip().strip("'"), 1)
        return n
    m = _GROUPS.search(line)
    if m:
        return len([x for x in m.group(1).split(",") if x])
    m = _GROUPS_IOTA.search(line)
    if m:
        return int(m.group(2))
    return 0


def collective_stats(hlo_text: str) -> dict[str, Any]:
    """Collective ops and bytes per device in one execution of an optimized HLO module.

    Args:
      hlo_text: ``compiled.as_text()`` of a jitted (SPMD-partitioned) function.

    Returns:
      ``{"ops": {kind: count}, "bytes": {kind: result bytes per device}, "wire_bytes": {kind: ring-algorithm
      bytes sent per device}, "total_bytes": int, "total_wire_bytes": int}`` over :data:`COLLECTIVES`,
      ops inside loops counted once per iteration. For an async ``-start`` op the result tuple also holds
      the operand, so its bytes are halved (all-gather/reduce-scatter: the larger of the two is counted).
    """
    comps: dict[str, list[str]] = defaultdict(list)
    entry, cur = None, None
    for line in hlo_text.splitlines():
        m = _COMP.match(line)
        if m:
            cur = m.group(1)
            if line.lstrip().startswith("ENTRY"):
                entry = cur
            continue
        if cur is not None:
            comps[cur].append(line)
    # Multiplier of each computation: product of the trip counts of the while loops that contain it.
    mult: dict[str, int] = defaultdict(int)
    if entry is None:
        return {"ops": {}, "bytes": {}, "wire_bytes": {}, "total_bytes": 0, "total_wire_bytes": 0}
    mult[entry] = 1
    order, seen = [entry], {entry}
    while order:
        c = order.pop()
        for line in comps.get(c, []):
            callees = _CALLS.findall(line)
            b = _BRANCHES.search(line)
            if b:
                callees += [x.strip().lstrip("%") for x in b.group(1).split(",") if x.strip()]
            w = _WHILE.search(line)
            trip = int(_TRIP.search(line).group(1)) if (w and _TRIP.search(line)) else 1
            for callee in callees:
                k = mult[c] * (trip if (w and callee == w.group(1)) else 1)
                if k > mult[callee]:
                    mult[callee] = k
                    if callee in seen:
                        order.append(callee)  # re-propagate a larger multiplier
                if callee not in seen:
                    seen.add(callee)
                    order.append(callee)
    ops: dict[str, int] = defaultdict(int)
    nbytes: dict[str, int] = defaultdict(int)
    wire: dict[str, float] = defaultdict(float)
    for c, lines in comps.items():
        k = mult.get(c, 0)
        if not k:
            continue
        for line in lines:
            m = _OP.search(line)
            if not m:
                continue
            shape, kind, is_async = m.group(1), m.group(2), m.group(3)
            if is_async and shape.startswith("("):
                parts = [_shape_bytes(p) for p in shape[1:-1].split("], ")] if "], " in shape else [_shape_bytes(shape)]
                b = max(parts) if kind in ("all-gather", "reduce-scatter") else _shape_bytes(shape) // 2
            else:
                b = _shape_bytes(shape)
            n = _group_size(line)
            factor = {"all-reduce": 2 * (n - 1) / n if n else 2.0,
                      "all-gather": (n - 1) / n if n else 1.0,
                      "reduce-scatter": (n - 1) if n else 1.0,  # result is 1/n of the input
                      "all-to-all": (n - 1) / n if n else 1.0,
                      "collective-permute": 1.0}[kind]
            ops[kind] += k
            nbytes[kind] += k * b
            wire[kind] += k * b * factor
    return {"ops": dict(ops), "bytes": dict(nbytes), "wire_bytes": {k: int(v) for k, v in wire.items()},
            "total_bytes": int(sum(nbytes.values())), "total_wire_bytes": int(sum(wire.values()))}


def memory_stats(compiled) -> dict[str, int]:
    """Per-device bytes from ``compiled.memory_analysis()``: ``argument``, ``output``, ``temp`` (live
    intermediates: activations saved for the backward pass, gradients, workspace), ``alias`` (outputs
    sharing a donated argument's buffer), ``code``, and ``peak_estimate = argument + output - alias +
    temp``. Empty dict if the backend reports nothing."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    get = lambda name: int(getattr(m, name, 0) or 0)  # noqa: E731
    out = {"argument": get("argument_size_in_bytes"), "output": get("output_size_in_bytes"),
           "temp": get("temp_size_in_bytes"), "alias": get("alias_size_in_bytes"),
           "code": get("generated_code_size_in_bytes")}
    out["peak_estimate"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out
