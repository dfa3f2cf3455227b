"""Test setup, before JAX is imported anywhere: 8 simulated CPU devices, compilation made cheap,
and fixtures shared by the end-to-end tests.

The tests run many tiny programs a few times each, so compiling is most of their time:

- LLVM's optimisation level 0 (``--xla_backend_optimization_level=0``) halves XLA:CPU compile
  times (the digits recipe's training step: 17 s -> 9 s). XLA's own HLO passes (fusion,
  simplification) run as usual; only the machine code is less optimised.
- One persistent compilation cache per session (a fresh directory, inherited by the
  pytest-xdist workers and by the subprocesses the tests start), holding every compiled
  program however short its compilation: a program compiles once in the whole session,
  whichever test compiles it first.

The subprocesses get the same flags (``_worker_runs.env``), so their numbers are comparable to
in-process runs bit for bit.
"""

import fcntl
import os
import shutil
import tempfile

_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
_flags.append("--xla_force_host_platform_device_count=8")
if not any(f.startswith("--xla_backend_optimization_level=") for f in _flags):  # yours wins
    _flags.append("--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join(_flags)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="ddpm_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402

# Files whose end-to-end runs take minutes: started first, so that the two workers finish together.
LONGEST_FIRST = (
    "test_resume.py",
    "test_latent.py",
    "test_train.py",
    "test_train_fsdp.py",
    "test_unet.py",
    "test_evaluation_evaluate.py",
    "test_experiments.py",
    "test_benchmark.py",
    "test_bfloat16.py",
    "test_sample.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


@pytest.fixture(scope="session")
def cache_dir():
    """The session's compilation cache, for the subprocesses a test starts."""
    return os.environ["JAX_COMPILATION_CACHE_DIR"]


@pytest.fixture(scope="session")
def reference(tmp_path_factory, cache_dir):
    """(workdir, stdout) of the uninterrupted run of ``_train_worker.py``: 12 steps, checkpoints
    every 4, every step logged, sample grids at 6 and 12, on 8 devices. Run once per session:
    under pytest-xdist, the first worker that needs it runs it while the others wait (a file
    lock in the session's shared temporary directory). Tests copy it before changing anything.
    """
    import _worker_runs as wr

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # one directory per session, above the workers' own
    workdir, stdout = shared / "reference_run", shared / "reference_run.stdout"
    with open(shared / "reference_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stdout.exists():
            shutil.rmtree(workdir, ignore_errors=True)  # a failed attempt of another worker
            proc = wr.launch(cache_dir, str(workdir), "--config.train.sample_every=6")
            wr.check_ok(proc)
            stdout.write_text(proc.stdout)
    return str(workdir), stdout.read_text()
