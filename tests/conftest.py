"""Test set-up: 8 simulated CPU devices (set before JAX is imported), no persistent
compilation cache, compiled programs released after each test module, and shared
fixtures.

A device count already in ``XLA_FLAGS`` is kept; any other flags there are kept too and
the count is appended.
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The command lines turn on JAX's persistent compilation cache in the user cache folder
# (infer.compile_cache): off for the suite, in this process and every child it starts, so
# that no test writes there. Tests of the cache set a folder of their own.
os.environ["ORTHRUS_COMPILE_CACHE"] = "off"
# The CPU attention kernel is built once for the whole suite (in the test session's own
# folder, kept for later runs): children given a user cache folder of their own would
# otherwise each build it again.
os.environ.setdefault("ORTHRUS_KERNELS", os.path.join(
    os.path.expanduser("~"), ".cache", "orthrus-jax-tests", "kernels"))


import gc  # noqa: E402

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's caches of compiled programs when a test module ends.

    Every CPU executable holds a few memory mappings of its own (code, constants), and the
    suite compiles thousands of programs in one process: kept to the end, they reach the
    kernel's limit on mappings per process (``vm.max_map_count``, 65530 by default) and
    the next XLA compilation fails to map its code and crashes the process. A module's
    programs are rarely reused by the next one, so releasing them costs little.
    """
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def backend_compiles():
    """Number of XLA backend compilations so far (a ``jax.monitoring`` listener): tests
    that must not recompile compare it before and after."""
    count = [0]

    def listener(event, duration_secs, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield lambda: count[0]
    jax.monitoring.unregister_event_duration_listener(listener)
