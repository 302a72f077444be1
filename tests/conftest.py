"""Test-session set-up: one JAX persistent compilation cache per test run, shared by the xdist workers and by
the subprocesses and notebook kernels the tests start (through the environment).

Many tests build engines and models of the same shapes (every ``Engine`` jits its own programs); with the cache
the second and later compilations of an identical program are loads. The directory is new for each run (keyed
by pytest-xdist's run id), so a run never depends on what an earlier one left behind.
"""

import os
import tempfile

_run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
_dir = os.path.join(tempfile.gettempdir(), f"mani_jax_test_jit_{_run}")
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _dir
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
