"""Multi-process (multi-host) runs on JAX's own runtime: ``jax.distributed``, global arrays, local launcher.

One process per host (or per GPU) runs the same program; ``jax.distributed.initialize`` connects them
through a coordinator (process 0's ``host:port``), after which ``jax.devices()`` lists every process's
devices, a :class:`~jax.sharding.Mesh` spans all of them, and a jitted step is one SPMD program whose
collectives cross processes (on CPU through gloo, on GPU through NCCL, on TPU through ICI/DCN). Each
process feeds only its addressable shards of a global array (:func:`place`,
:func:`mani_jax.parallel.shard_batch`).

:func:`launch_local` starts ``n`` such processes on this machine with a coordinator on 127.0.0.1 and a
free port, each with its own simulated CPU devices: the same code path as a GPU cluster or TPU pod, where
the scheduler (SLURM, Kubernetes, ``gcloud ... --worker=all``) starts the processes instead and
``jax.distributed.initialize()`` reads the coordinator from the environment.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any, Sequence

import jax
import numpy as np

__all__ = ["initialize_distributed", "free_port", "launch_local", "place", "is_abstract"]


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, cpu_devices: int | None = None) -> dict[str, int]:
    """Join a multi-process JAX job (or set up a single process), before any array is created.

    Args:
      coordinator_address: ``"host:port"`` of process 0; ``None`` with ``num_processes`` None/1 = single
        process. On SLURM / TPU pods / Kubernetes with JAX's cluster detection, pass ``None`` for all three
        and set ``num_processes=-1``: ``jax.distributed.initialize()`` then reads them from the environment.
      num_processes, process_id: the job size and this process's index in ``[0, num_processes)``.
      cpu_devices: simulate this many CPU devices in this process (``jax_num_cpu_devices``); None = leave it.

    Returns:
      ``{"process_index", "process_count", "local_devices", "global_devices"}``.

    Raises:
      ValueError: inconsistent arguments (a process id out of range, a coordinator missing its port).
    """
    if cpu_devices is not None:
        if cpu_devices < 1:
            raise ValueError(f"cpu_devices: expected a positive int, got {cpu_devices}")
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if num_processes == -1:
        jax.distributed.initialize()
    elif num_processes is not None and num_processes > 1:
        if coordinator_address is None or ":" not in coordinator_address:
            raise ValueError(f"coordinator_address: expected 'host:port', got {coordinator_address!r}")
        if process_id is None or not 0 <= process_id < num_processes:
            raise ValueError(f"process_id: expected an int in [0, {num_processes}), got {process_id!r}")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "local_devices": jax.local_device_count(), "global_devices": jax.device_count()}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a local coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(args: Sequence[str], n_processes: int, *, timeout: float = 600.0,
                 env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """Run ``python <args> --coordinator 127.0.0.1:<port> --num-processes n --process-id i`` for
    ``i < n_processes`` concurrently on this machine; wait for all.

    Returns:
      the completed processes (stdout / stderr captured as text), in process order.

    Raises:
      RuntimeError: a process failed (non-zero exit) or timed out; the message holds its stderr tail.
    """
    if n_processes < 1:
        raise ValueError(f"n_processes: expected a positive int, got {n_processes}")
    coord = f"127.0.0.1:{free_port()}"
    full_env = {**os.environ, **(env or {})}
    procs = [subprocess.Popen([sys.executable, *args, "--coordinator", coord, "--num-processes", str(n_processes),
                               "--process-id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=full_env) for i in range(n_processes)]
    results = []
    failed = None
    for i, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError(f"process {i} of {n_processes} timed out after {timeout} s") from None
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        if p.returncode and failed is None:
            failed = (i, p.returncode, err)
    if failed is not None:
        i, rc, err = failed
        raise RuntimeError(f"process {i} of {n_processes} exited with {rc}:\n{err[-3000:]}")
    return results


def is_abstract(tree: Any) -> bool:
    """Whether ``tree``'s leaves are shapes (``jax.ShapeDtypeStruct``, e.g. from ``nnx.eval_shape``)."""
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def place(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)`` that also works when the shardings span other processes'
    devices (every process holds the same full value and materialises only its addressable shards), and
    on shapes: a ``jax.ShapeDtypeStruct`` leaf gets the sharding attached (for ``jit(...).lower`` of a
    model too big to allocate)."""
    if is_abstract(tree):
        return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sh):
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sh, lambda idx: host[idx])

    return jax.tree.map(one, tree, shardings)
