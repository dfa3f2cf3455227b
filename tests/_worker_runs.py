"""Helpers of the end-to-end tests that run ``tests/_train_worker.py`` in subprocesses."""

import hashlib
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_train_worker.py")


def env(cache_dir, devices=8):
    """The environment of a subprocess run: the session's XLA flags (conftest.py) with
    ``devices`` simulated CPU devices, and the session's compilation cache."""
    out = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir)
    flags = [f for f in out.get("XLA_FLAGS", "").split() if "device_count" not in f]
    out["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    return out


def launch(cache_dir, workdir, *args, devices=8, wait=True, worker=WORKER):
    env_ = env(cache_dir, devices)
    cmd = [sys.executable, worker, f"--workdir={workdir}", *args]
    if not wait:
        pipe = subprocess.PIPE
        return subprocess.Popen(cmd, env=env_, stdout=pipe, stderr=pipe, text=True)
    return subprocess.run(cmd, env=env_, capture_output=True, text=True, timeout=900)


def run_processes(cache_dir, workdir, *args, num_processes=2, devices=4):
    """One run as ``num_processes`` processes of ``devices`` devices each (``jax.distributed`` on
    loopback); waits for all (killed after 10 minutes: no hang), each must exit 0. Returns
    their (stdout, stderr)."""
    address = f"127.0.0.1:{free_port()}"
    distributed = [f"--coordinator_address={address}", f"--num_processes={num_processes}"]
    procs = [
        launch(
            cache_dir,
            workdir,
            *distributed,
            f"--process_id={i}",
            *args,
            devices=devices,
            wait=False,
        )
        for i in range(num_processes)
    ]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, f"{out}\n{err[-4000:]}"
    return outs


def check_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(workdir):
    return np.array([(m["step"], m["loss"], m["grad_norm"]) for m in metrics(workdir)])


def checkpoint_steps(workdir):
    return sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())


def params(workdir, step, key="params"):
    """The parameters (``key="ema_params"``: the EMA parameters) of a checkpoint as numpy arrays
    (whatever devices wrote it)."""
    path = os.path.join(workdir, "checkpoints", str(step), "default")
    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))[key]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_diff(a, b):
    """The largest absolute difference between two pytrees of arrays."""
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


def digest(directory):
    """{relative path: sha256 of the content} of every file under ``directory``, and its dirs;
    the trainer lock file aside (every invocation writes its pid into it)."""
    from ddpm_jax.workdir import LOCK_FILE

    out = {}
    for root, dirs, files in os.walk(directory):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), directory) + "/"] = None
        for f in files:
            if f == LOCK_FILE:
                continue
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, directory)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def cli_error(argv, capfd):
    """Runs the worker's CLI in-process (for errors found before anything is compiled); returns
    (exit code, stderr lines)."""
    import _train_worker as worker

    from ddpm_jax import cli

    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(worker.tiny_config, argv)
    return exit_info.value.code, capfd.readouterr().err.strip().splitlines()
