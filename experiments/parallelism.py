"""Parallelism strategies side by side on forced CPU devices, and a multi-process run on jax.distributed.

    python -m experiments.parallelism                     # tiny preset run on 8 CPU devices + chimera-700m compiled
    python -m experiments.parallelism --preset smoke      # < 3 min; used by the tests
    python -m experiments.parallelism --processes 2 --layout fsdp --set steps=3
        # 2 processes x 4 CPU devices (jax.distributed, coordinator 127.0.0.1:<free port>) against
        # 1 process x 8 devices: the same steps, the same losses

Every layout trains the same model from the same initialisation on the same batches (the single-device
trainer step is the reference), so their losses agree and the table compares only cost, per device:

* parameter and optimizer-state bytes (the shards each device holds),
* XLA's compiled memory analysis: arguments, temporaries (activations kept for the backward pass,
  gradients, workspace) and the peak estimate,
* collective bytes per step from the optimized HLO (:func:`mani_jax.parallel.collective_stats`: result
  bytes and ring-algorithm wire bytes, loop trips counted),
* step time (median; on forced CPU devices every "device" shares the same cores, so times measure
  overhead, not speed-up).

The ``compile_preset`` (default ``chimera-700m``) is lowered and compiled from ``nnx.eval_shape`` shapes,
never allocated: memory and communication only. Mamba-2 tensor parallelism needs ``n_groups % tensor
== 0``, so both models use ``n_groups=2`` here.

Writes ``RUN_DIR/summary.json`` (rows, conclusions), ``RUN_DIR/parallelism_<model>[_compiled].png`` per
model, and
with ``--processes`` ``RUN_DIR/multiprocess.json``; prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.common import write_json_atomic
from mani_jax.config import apply_overrides, get_preset

#: name -> how: kind (annotation / tp_shard_map / pipeline), mesh sizes, zero1, pipeline schedule, moe model.
LAYOUTS: dict[str, dict] = {
    "single": dict(kind="annotation", mesh={}, devices=1),
    "dp": dict(kind="annotation", mesh=dict(data=8)),
    "fsdp": dict(kind="annotation", mesh=dict(data=1, fsdp=8)),
    "zero1": dict(kind="annotation", mesh=dict(data=8), zero1=True),
    "dp4_tp2": dict(kind="annotation", mesh=dict(data=4, tensor=2)),
    "dp4_tp2_shard_map": dict(kind="tp_shard_map", mesh=dict(data=4, tensor=2)),
    "dp4_pp2_gpipe": dict(kind="pipeline", mesh=dict(data=4, pipeline=2), schedule="gpipe"),
    "dp4_pp2_1f1b": dict(kind="pipeline", mesh=dict(data=4, pipeline=2), schedule="1f1b"),
    "dp2_tp2_pp2": dict(kind="pipeline", mesh=dict(data=2, tensor=2, pipeline=2), schedule="gpipe"),
    "fsdp4_tp2": dict(kind="annotation", mesh=dict(data=1, fsdp=4, tensor=2)),
    "moe_dp": dict(kind="annotation", mesh=dict(data=8), moe=True),
    # Expert parallel through the model's all-to-all layer (moe_dispatch="all_to_all"); "_gspmd": the
    # expert axis by annotation only (dropless MoE, GSPMD picks the collectives).
    "moe_dp2_ep4": dict(kind="annotation", mesh=dict(data=2, expert=4), moe="all_to_all"),
    "moe_dp2_ep4_gspmd": dict(kind="annotation", mesh=dict(data=2, expert=4), moe=True),
}


@dataclass(frozen=True)
class ParallelismConfig:
    """The study.

    ``model_preset`` (run) and ``compile_preset`` (compiled only; ``""`` = skip) name
    :data:`mani_jax.models.PRESETS` entries, changed by ``model_overrides`` (``key=value`` strings, applied
    to both). ``moe_experts`` experts (top-2, ``d_ff_expert = d_ff / 2``) make the ``moe_*`` layouts' model:
    dropless, or for ``moe_dp2_ep4`` capacity-based with ``capacity_factor = moe_experts / 2`` (nothing
    dropped: the same function) through the all-to-all layer.
    ``steps`` timed steps follow one compiling step. ``microbatches``: pipeline microbatches.
    """

    model_preset: str = "tiny"
    compile_preset: str = "chimera-700m"
    model_overrides: tuple[str, ...] = ("n_groups=2",)
    layouts: tuple[str, ...] = tuple(LAYOUTS)
    compile_layouts: tuple[str, ...] = ("dp", "fsdp", "zero1", "dp4_tp2", "dp4_pp2_gpipe", "dp2_tp2_pp2")
    devices: int = 8
    batch_size: int = 16
    seq_len: int = 128
    compile_batch_size: int = 16
    compile_seq_len: int = 1024
    steps: int = 4
    microbatches: int = 4
    moe_experts: int = 4
    learning_rate: float = 3e-3
    seed: int = 0

    def __post_init__(self):
        unknown = [name for name in (*self.layouts, *self.compile_layouts) if name not in LAYOUTS]
        if unknown:
            raise ValueError(f"layouts: unknown {unknown}; expected names from {list(LAYOUTS)}")
        for name in ("devices", "batch_size", "seq_len", "steps", "microbatches", "compile_batch_size",
                     "compile_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)}")


PRESETS: dict[str, ParallelismConfig] = {
    "default": ParallelismConfig(),
    # A 4-layer hybrid (2 Mamba-2 + 2 attention) small enough that every layout compiles in seconds.
    "smoke": ParallelismConfig(
        model_preset="smoke", compile_preset="",
        model_overrides=("n_groups=2", "n_layers=4", "layer_types=mamba,attention,mamba,attention", "d_model=64",
                         "mamba_head_dim=16", "d_ff=128", "vocab_size=256", "head_dim=16", "d_state=16",
                         "chunk_size=16"),
        layouts=("single", "dp", "fsdp", "zero1", "dp4_tp2", "dp4_pp2_1f1b"),
        batch_size=8, seq_len=32, steps=2, microbatches=2),
}


# ---------------------------------------------------------------------------------------------- helpers
def _model_config(cfg: ParallelismConfig, preset: str, moe: bool | str):
    from mani_jax.models import get_config

    mc = get_config(preset, list(cfg.model_overrides))
    if moe:
        mc = dataclasses.replace(mc, n_experts=cfg.moe_experts, top_k=2, d_ff_expert=mc.d_ff // 2,
                                 capacity_factor=None, dropless_impl="blocked")
    if moe == "all_to_all":
        mc = dataclasses.replace(mc, moe_dispatch="all_to_all", capacity_factor=cfg.moe_experts / 2)
    return mc


def _optim(cfg: ParallelismConfig):
    from mani_jax.train import OptimConfig

    return OptimConfig(learning_rate=cfg.learning_rate, warmup_steps=1, total_steps=max(cfg.steps + 2, 3))


def _batches(vocab: int, n: int, b: int, t: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tok = rng.integers(0, vocab, (b, t)).astype(np.int32)
        out.append({"tokens": tok, "targets": np.roll(tok, -1, 1), "segment_ids": np.ones((b, t), np.int32),
                    "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
                    "loss_mask": np.ones((b, t), np.float32)})
    return out


def _device_bytes(tree) -> int:
    """Bytes one device holds of ``tree``'s arrays (its shard of each), from the shardings."""
    import jax

    total = 0
    for x in jax.tree.leaves(tree):
        sh = getattr(x, "sharding", None)
        shape = sh.shard_shape(x.shape) if sh is not None else x.shape
        total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return total


def build(layout: str, cfg: ParallelismConfig, preset: str, *, abstract: bool):
    """The compiled-ready step of one layout: ``(step, state, params_tree, opt_tree, mesh, model_cfg)``."""
    import jax
    from flax import nnx

    from mani_jax.models import HybridLM
    from mani_jax.parallel import make_mesh, make_pipeline_train_step, make_sharded_train_step, make_tp_train_step
    from mani_jax.train import make_optimizer, make_schedule

    spec = LAYOUTS[layout]
    mc = _model_config(cfg, preset, spec.get("moe", False))
    oc = _optim(cfg)
    devices = jax.devices()[: spec.get("devices", cfg.devices)]
    mesh = make_mesh(devices=devices, **({"data": -1} | spec["mesh"]))

    def new_model():
        return HybridLM(mc, rngs=nnx.Rngs(cfg.seed))

    model = nnx.eval_shape(new_model) if abstract else new_model()
    if spec["kind"] == "annotation":
        opt = nnx.eval_shape(lambda: make_optimizer(oc, new_model())) if abstract else make_optimizer(oc, model)
        step, state, _ = make_sharded_train_step(model, opt, mesh, make_schedule(oc), zero1=spec.get("zero1", False))
        return step, state, state[0], state[1], mesh, mc
    if spec["kind"] == "tp_shard_map":
        step, state = make_tp_train_step(model, mesh, oc)
        return step, state, state[0], state[1], mesh, mc
    step, state, _ = make_pipeline_train_step(model, mesh, oc, n_microbatches=cfg.microbatches,
                                              schedule=spec["schedule"])
    return step, state, state[0], state[1], mesh, mc


def measure(layout: str, cfg: ParallelismConfig, preset: str, *, abstract: bool) -> dict:
    """Compile one layout and, unless ``abstract``, run ``1 + steps`` steps. Returns the table row."""
    import jax

    from mani_jax.parallel import collective_stats, memory_stats, shard_batch
    from mani_jax.parallel.rules import batch_sharding

    t0 = time.perf_counter()
    step, state, params, opt, mesh, mc = build(layout, cfg, preset, abstract=abstract)
    b, t = (cfg.compile_batch_size, cfg.compile_seq_len) if abstract else (cfg.batch_size, cfg.seq_len)
    batches = _batches(mc.vocab_size, 1 if abstract else cfg.steps + 1, b, t, cfg.seed)
    if abstract:
        sh = batch_sharding(mesh)
        arg = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh) for k, v in batches[0].items()}
    else:
        arg = shard_batch(batches[0], mesh)
    compiled = step.lower(state, arg).compile()
    row = {"layout": layout, "mesh": {a: n for a, n in mesh.shape.items() if n > 1} or {"devices": 1},
           "model": preset + (" (MoE)" if mc.n_experts else ""), "compiled_only": abstract,
           "compile_seconds": time.perf_counter() - t0, "param_bytes": _device_bytes(params),
           "opt_bytes": _device_bytes(opt), "memory": memory_stats(compiled),
           "collectives": collective_stats(compiled.as_text())}
    if abstract:
        return row
    losses, times = [], []
    for i, batch in enumerate(batches):
        arr = shard_batch(batch, mesh)
        t1 = time.perf_counter()
        state, metrics = compiled(state, arr)
        jax.block_until_ready(metrics)
        if i:
            times.append(time.perf_counter() - t1)
        losses.append(float(np.asarray(metrics["loss"].addressable_data(0))))
    row.update({"losses": losses, "step_seconds": statistics.median(times) if times else None,
                "tokens_per_second": b * t / statistics.median(times) if times else None})
    return row


def _group(r: dict) -> str:
    """Rows compared with each other: one model, run or compiled-only."""
    return r["model"].replace(" (MoE)", "") + (" compiled" if r["compiled_only"] else "")


def conclusions(rows: list[dict]) -> list[str]:
    """What the numbers say, as sentences computed from them (per model)."""
    out = []
    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(_group(r), {})[r["layout"]] = r

    def state(r):
        return r["param_bytes"] + r["opt_bytes"]

    def wire(r):
        return r["collectives"]["total_wire_bytes"]

    for model, rs in by_model.items():
        moe = [rs.get(n) for n in ("moe_dp", "moe_dp2_ep4", "moe_dp2_ep4_gspmd")]
        if moe[0] is not None and moe[1] is not None:
            a2a = moe[1]["collectives"]["wire_bytes"].get("all-to-all", 0)
            gspmd = (f"; with the expert axis by annotation only (GSPMD, dropless) {wire(moe[2]) / 2**20:.1f} MiB"
                     if moe[2] is not None else "")
            out.append(f"{model}: MoE DP2 x EP4 through the all-to-all layer moves {wire(moe[1]) / 2**20:.1f} MiB "
                       f"of collectives per step ({a2a / 2**20:.1f} MiB all-to-all) against "
                       f"{wire(moe[0]) / 2**20:.1f} MiB for MoE DP8{gspmd}; parameter+optimizer state "
                       f"{state(moe[1]) / 2**20:.1f} vs {state(moe[0]) / 2**20:.1f} MiB per device.")
        base = "dp" if "dp" in rs else "single"  # the reference: data parallel, else one device
        dp = rs.get(base)
        if dp is None:
            continue
        ref_name = {"dp": "DP", "single": "one device"}[base]
        for name, what in (("fsdp", "FSDP (ZeRO-3)"), ("zero1", "ZeRO-1"), ("dp4_tp2", "DP4 x TP2"),
                           ("dp4_pp2_gpipe", "DP4 x PP2"), ("dp2_tp2_pp2", "DP2 x TP2 x PP2"),
                           ("fsdp4_tp2", "FSDP4 x TP2")):
            r = rs.get(name)
            if r is None:
                continue
            traffic = (f"moves {wire(r) / wire(dp):.2f}x {ref_name}'s collective bytes per step ({wire(r) / 2**20:.1f} "
                       f"vs {wire(dp) / 2**20:.1f} MiB)" if wire(dp) else
                       f"moves {wire(r) / 2**20:.1f} MiB of collectives per step")
            out.append(f"{model}: {what} holds {state(dp) / max(state(r), 1):.1f}x less parameter+optimizer state "
                       f"per device than {ref_name} ({state(r) / 2**20:.1f} vs {state(dp) / 2**20:.1f} MiB) and "
                       f"{traffic}; peak memory estimate {r['memory'].get('peak_estimate', 0) / 2**20:.1f}"
                       f" vs {dp['memory'].get('peak_estimate', 0) / 2**20:.1f} MiB.")
        pp = [rs[n] for n in ("dp4_pp2_gpipe", "dp4_pp2_1f1b") if n in rs and "step_seconds" in rs[n]]
        if len(pp) == 2:
            t1, t0 = (r["memory"].get("temp", 0) / 2**20 for r in (pp[1], pp[0]))
            out.append(f"{model}: 1F1B vs GPipe at the same mesh: temporaries {t1:.1f} vs {t0:.1f} MiB per device "
                       "(1F1B keeps p - s microbatch inputs, GPipe all m microbatches' residuals).")
    return out


def run(cfg: ParallelismConfig, out: Path, *, preset: str = "custom") -> dict:
    """Measure every layout of ``cfg`` and write ``summary.json`` and the figures into ``out``."""
    import jax

    jax.config.update("jax_num_cpu_devices", cfg.devices)
    if jax.device_count() < cfg.devices:
        raise ValueError(f"devices: {cfg.devices} requested but jax sees {jax.device_count()} (set XLA_FLAGS="
                         "--xla_force_host_platform_device_count before jax starts, or run in a fresh process)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    jobs = [(n, cfg.model_preset, False) for n in cfg.layouts]
    if cfg.compile_preset:
        jobs += [(n, cfg.compile_preset, True) for n in cfg.compile_layouts]
    try:
        from tqdm.auto import tqdm
        it = tqdm(jobs, desc="layouts")
    except ImportError:  # pragma: no cover
        it = jobs
    for name, model_preset, abstract in it:
        row = measure(name, cfg, model_preset, abstract=abstract)
        rows.append(row)
        write_json_atomic(out / "summary.json", {"preset": preset, "config": dataclasses.asdict(cfg), "rows": rows})
    ref = next((r for r in rows if r["layout"] == "single" and not r["compiled_only"]), None)
    for r in rows:
        if ref is not None and "losses" in r and r["model"] == ref["model"]:
            r["max_loss_diff_vs_single"] = float(np.max(np.abs(np.array(r["losses"]) - np.array(ref["losses"]))))
    summary = {"preset": preset, "config": dataclasses.asdict(cfg), "devices": jax.device_count(),
               "backend": jax.default_backend(), "rows": rows, "conclusions": conclusions(rows)}
    write_json_atomic(out / "summary.json", summary)
    for group in sorted({_group(r) for r in rows}):
        plot(rows, group, out / f"parallelism_{group.replace(' ', '_')}.png")
    print_table(rows)
    for c in summary["conclusions"]:
        print(" *", c)
    return summary


def plot(rows: list[dict], model: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mani_jax.train.metrics import save_figure

    rs = [r for r in rows if _group(r) == model]
    names = [r["layout"] for r in rs]
    mib = lambda v: v / 2**20  # noqa: E731
    timed = any(r.get("step_seconds") for r in rs)
    fig, axes = plt.subplots(1, 3 if timed else 2, figsize=(15 if timed else 11, 4.2))
    x = np.arange(len(rs))
    p = [mib(r["param_bytes"]) for r in rs]
    o = [mib(r["opt_bytes"]) for r in rs]
    tmp = [mib(r["memory"].get("temp", 0)) for r in rs]
    axes[0].bar(x, p, label="parameters")
    axes[0].bar(x, o, bottom=p, label="optimizer state")
    axes[0].bar(x, tmp, bottom=np.add(p, o), label="temporaries (XLA)")
    axes[0].set_ylabel("MiB per device")
    axes[0].set_title(f"{model}: memory per device")
    axes[0].legend(fontsize=8)
    kinds = ["all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute"]
    bottom = np.zeros(len(rs))
    for k in kinds:
        v = np.array([mib(r["collectives"]["wire_bytes"].get(k, 0)) for r in rs])
        if v.any():
            axes[1].bar(x, v, bottom=bottom, label=k)
            bottom += v
    axes[1].set_ylabel("MiB per device per step (ring estimate)")
    axes[1].set_title("collective traffic")
    axes[1].legend(fontsize=8)
    if timed:
        axes[2].bar(x, [r.get("step_seconds") or 0 for r in rs])
        axes[2].set_ylabel("seconds (forced CPU devices)")
        axes[2].set_title("median step time")
    for ax in axes:
        ax.set_xticks(x, names, rotation=40, ha="right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def print_table(rows: list[dict]) -> None:
    head = f"{'model':<16}{'layout':<20}{'mesh':<34}{'params MiB':>11}{'opt MiB':>9}{'temp MiB':>10}" \
           f"{'comm MiB':>10}{'step s':>8}{'loss':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        mesh = ",".join(f"{a}={n}" for a, n in r["mesh"].items())
        step = f"{r['step_seconds']:.3f}" if r.get("step_seconds") else "-"
        loss = f"{r['losses'][-1]:.4f}" if r.get("losses") else "-"
        print(f"{r['model']:<16}{r['layout']:<20}{mesh:<34}{r['param_bytes'] / 2**20:>11.2f}"
              f"{r['opt_bytes'] / 2**20:>9.2f}{r['memory'].get('temp', 0) / 2**20:>10.2f}"
              f"{r['collectives']['total_wire_bytes'] / 2**20:>10.2f}{step:>8}{loss:>9}")


# ------------------------------------------------------------------------------------------ multi-process
def worker(args, cfg: ParallelismConfig) -> None:
    """One process of a (possibly multi-process) run: train ``cfg.steps + 1`` steps of ``args.layout``;
    process 0 writes the losses to ``args.out / losses-<n>proc.json``."""
    from mani_jax.parallel.multiprocess import initialize_distributed

    info = initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                  cpu_devices=args.local_devices)
    import jax

    from mani_jax.parallel import shard_batch

    step, state, _, _, mesh, mc = build(args.layout, cfg, cfg.model_preset, abstract=False)
    losses = []
    for batch in _batches(mc.vocab_size, cfg.steps + 1, cfg.batch_size, cfg.seq_len, cfg.seed):
        state, metrics = step(state, shard_batch(batch, mesh))
        losses.append(float(np.asarray(metrics["loss"].addressable_data(0))))
    if info["process_index"] == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / f"losses-{info['process_count']}proc.json",
                          {**info, "layout": args.layout, "mesh": dict(mesh.shape), "losses": losses,
                           "backend": jax.default_backend()})
    if info["process_count"] > 1:
        jax.distributed.shutdown()


def multiprocess(args, cfg: ParallelismConfig, argv: list[str]) -> dict:
    """``--processes N``: N local processes x (devices / N) CPU devices, then 1 process x devices; compare."""
    from mani_jax.parallel.multiprocess import launch_local

    n = args.processes
    if cfg.devices % n:
        raise ValueError(f"--processes: {n} does not divide devices={cfg.devices}")
    out = Path(args.out or Path("runs") / "parallelism-multiprocess")
    out.mkdir(parents=True, exist_ok=True)
    base = ["-m", "experiments.parallelism", "--worker", "--layout", args.layout, "--out", str(out),
            "--preset", args.preset] + [x for ov in args.overrides for x in ("--set", ov)]
    runs = {}
    for procs in (n, 1):
        t0 = time.perf_counter()
        launch_local(base + ["--local-devices", str(cfg.devices // procs)], procs, timeout=args.timeout)
        r = json.loads((out / f"losses-{procs}proc.json").read_text())
        r["wall_seconds"] = time.perf_counter() - t0
        runs[procs] = r
    a, b = np.array(runs[n]["losses"]), np.array(runs[1]["losses"])
    result = {"layout": args.layout, "processes": n, "devices": cfg.devices,
              f"losses_{n}proc": runs[n]["losses"], "losses_1proc": runs[1]["losses"],
              "max_abs_diff": float(np.max(np.abs(a - b))), "bit_identical": bool(np.array_equal(a, b)),
              "runs": {str(k): v for k, v in runs.items()}}
    write_json_atomic(out / "multiprocess.json", result)
    print(f"{args.layout}: {n} processes x {cfg.devices // n} devices vs 1 x {cfg.devices}")
    print(f"  losses {n} processes: {[round(x, 6) for x in runs[n]['losses']]}")
    print(f"  losses 1 process:    {[round(x, 6) for x in runs[1]['losses']]}")
    print(f"  max |diff| = {result['max_abs_diff']:.3g} (bit identical: {result['bit_identical']})")
    return result


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m experiments.parallelism", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="default", help=f"one of {sorted(PRESETS)} (default: default)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/parallelism-<preset>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study field (steps=3, layouts=dp,fsdp, model_preset=smoke)")
    p.add_argument("--processes", type=int, default=0,
                   help="run --layout in this many local processes (jax.distributed) and in one; compare")
    p.add_argument("--layout", default="fsdp", help=f"layout of a --processes run, one of {list(LAYOUTS)}")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per process group (--processes)")
    # Internal: one worker process of a --processes run (launch_local adds the last three).
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--local-devices", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    p.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cfg = apply_overrides(get_preset(PRESETS, args.preset, "experiment preset"), args.overrides)
    if args.layout not in LAYOUTS:
        raise ValueError(f"--layout: unknown {args.layout!r}; expected one of {list(LAYOUTS)}")
    if args.worker:
        worker(args, cfg)
        return None
    if args.processes:
        if args.processes < 1:
            raise ValueError(f"--processes: expected a positive int, got {args.processes}")
        return multiprocess(args, cfg, argv)
    return run(cfg, args.out or Path("runs") / f"parallelism-{args.preset}", preset=args.preset)


if __name__ == "__main__":
    main()
