"""Test set-up: 8 simulated CPU devices (set before JAX is imported) and shared fixtures.

A device count already in ``XLA_FLAGS`` is kept; any other flags there are kept too and
the count is appended.
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
