"""Test setup: 8 simulated CPU devices and one XLA compilation cache for the session, set before
JAX is imported anywhere.

The persistent compilation cache (a fresh directory per session, inherited by the subprocesses
the tests start) lets the many tiny runs that compile the same programs compile them once.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="ddpm_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
