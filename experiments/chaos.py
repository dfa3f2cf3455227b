"""Chaos test of resumption: SIGKILL a training command at random moments, re-running it each time.

Runs the command once uninterrupted (into ``WORKDIR/reference``), then again into
``WORKDIR/chaos`` where it is killed ``--kills`` times with SIGKILL: at a random moment, or the
moment a checkpoint write is seen in progress (an Orbax temporary directory under
``checkpoints/``), and re-run after each kill until it finishes. Passes when the final
``metrics.jsonl`` (step, loss, grad_norm, lr) and the final EMA parameters of both runs are equal,
bit for bit. Prints one line per kill (when, the last logged step, the step resumed from, whether
the kill fell inside a checkpoint write) and exits with 1 on any difference::

    python -m experiments.chaos --workdir=/tmp/chaos --kills=8 -- \\
        python -m experiments.digits --config.train.checkpoint_every=50
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np

METRIC_FIELDS = ("step", "loss", "grad_norm", "lr")


def _records(workdir: str) -> list[tuple]:
    """The deterministic fields of ``metrics.jsonl`` (torn last lines skipped)."""
    out = []
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        for line in open(path):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            out.append(tuple(record.get(k) for k in METRIC_FIELDS))
    return out


def _writes(workdir: str) -> set[str]:
    """The checkpoint writes in progress (Orbax's temporary directories)."""
    return set(glob.glob(os.path.join(workdir, "checkpoints", "*orbax-checkpoint-tmp*")))


def run_with_kills(
    command: Sequence[str],
    workdir: str,
    *,
    kills: int,
    rng: np.random.Generator,
    max_delay_s: float,
    modes: Sequence[str] | None = None,
    env: dict | None = None,
    timeout_s: float = 1800,
) -> list[dict]:
    """Runs ``command --workdir=workdir`` to completion, SIGKILL-ing it ``kills`` times.

    Each attempt is killed after a uniform random delay in ``[0, max_delay_s]`` (mode
    "random") or the moment a checkpoint write is seen in progress (mode "in_save": polled every
    millisecond, for at most ``4 * max_delay_s``); the mode of each attempt is ``modes[i]``, or
    drawn with probability 1/2. An attempt that finishes before its kill ends the chaos early.

    Returns:
      One record per kill: ``delay_s``, ``mode``, ``last_logged_step`` (before the kill),
      ``in_write`` (an incomplete checkpoint was left on disk) and ``resumed_from`` (the step
      the next attempt restored, filled in by that attempt).
    """
    argv = [*command, f"--workdir={workdir}"]
    records: list[dict] = []
    while True:
        proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        if len(records) == kills:
            out, _ = proc.communicate(timeout=timeout_s)
            _fill_resumed(records, out)
            if proc.returncode != 0:
                raise RuntimeError(f"the final attempt failed ({proc.returncode}):\n{out[-3000:]}")
            return records
        delay, in_save = float(rng.uniform(0, max_delay_s)), bool(rng.integers(2))
        if modes is not None:
            in_save = modes[len(records)] == "in_save"
        if in_save:
            delay = 4 * max_delay_s
        start, stale = time.monotonic(), _writes(workdir)  # left by an earlier kill
        while proc.poll() is None and time.monotonic() - start < delay:
            if in_save and _writes(workdir) - stale:
                break
            time.sleep(0.001)
        if proc.poll() is not None:  # finished before the kill
            out, _ = proc.communicate()
            _fill_resumed(records, out)
            return records
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        _fill_resumed(records, out)
        logged = _records(workdir)
        records.append(
            dict(
                delay_s=round(time.monotonic() - start, 3),
                mode="in_save" if in_save else "random",
                last_logged_step=logged[-1][0] if logged else 0,
                in_write=bool(_writes(workdir) - stale),
                resumed_from=None,
            )
        )


def _fill_resumed(records: list[dict], output: str) -> None:
    if records and records[-1]["resumed_from"] is None:
        marker = "resuming from the checkpoint of step "
        found = [line for line in output.splitlines() if marker in line]
        records[-1]["resumed_from"] = int(found[0].split(marker)[1].split()[0]) if found else 0


def final_ema_params(workdir: str) -> dict[str, np.ndarray]:
    """The EMA parameters of the newest checkpoint, as host arrays keyed by path."""
    import jax
    import orbax.checkpoint as ocp

    ckpt_dir = os.path.join(workdir, "checkpoints")
    step = max(int(p) for p in os.listdir(ckpt_dir) if p.isdigit())
    path = os.path.join(ckpt_dir, str(step), "default")
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    leaves = jax.tree_util.tree_leaves_with_path(restored["ema_params"])
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def identical(reference: str, workdir: str) -> tuple[bool, bool]:
    """(metrics equal, final EMA parameters equal), both bit for bit."""
    metrics = _records(reference) == _records(workdir)
    a, b = final_ema_params(reference), final_ema_params(workdir)
    params = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    return metrics, params


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--kills", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_delay_s", type=float, default=30.0)
    args = p.parse_args(own)
    command = command or [sys.executable, "-m", "experiments.digits"]
    reference, chaos = (os.path.join(args.workdir, d) for d in ("reference", "chaos"))
    print(f"uninterrupted run into {reference}", flush=True)
    subprocess.run([*command, f"--workdir={reference}"], check=True, stdout=subprocess.DEVNULL)
    rng = np.random.default_rng(args.seed)
    records = run_with_kills(
        command, chaos, kills=args.kills, rng=rng, max_delay_s=args.max_delay_s
    )
    for i, r in enumerate(records, 1):
        print(f"kill {i}: {r}", flush=True)
    metrics, params = identical(reference, chaos)
    print(f"{len(records)} kills: metrics identical: {metrics}; EMA parameters identical: {params}")
    return 0 if metrics and params else 1


if __name__ == "__main__":
    sys.exit(main())
