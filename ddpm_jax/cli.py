"""Command line entry shared by the experiments: ``main(get_config)``.

An experiment is ``get_config()`` plus::

    if __name__ == "__main__":
        cli.main(get_config)

Flags:

- ``--workdir=DIR`` (required): where the run writes and resumes (see ``ddpm_jax.train``); a
  re-run with a changed field that fixes what the run is (``resume.IDENTITY``) or that changes
  what it trains (``resume.TRAINING``) is refused with nothing changed; other changes are
  recorded in ``config_history.jsonl``;
- ``--allow_change=FIELD[,FIELD...]``: lets this resume change those ``resume.TRAINING`` fields
  (e.g. ``train.batch_size``) from the resumed step on; recorded with ``"allowed"``;
- ``--start_over``: when none of the workdir's checkpoints can be restored, move them aside and
  train from step 0 (without it that is an error, and nothing is changed);
- ``--config.<section>.<field>=VALUE``: overrides of ``get_config()`` (ml_collections
  ``config_flags``; tuples as ``--config.model.ch_mult='(1,2,2)'``);
- ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``: a multi-process job
  started by hand (``jax.distributed.initialize`` with these values);
- ``--distributed=auto|true|false``: ``auto`` (default) initializes ``jax.distributed`` on a
  multi-task SLURM job or a multi-host TPU slice; ``true`` always lets JAX auto-detect the
  cluster; ``false`` never initializes.

This is the one place where exceptions become exit codes (:func:`guarded`): a user's mistake
(``ddpm_jax.errors.UsageError``: invalid config or flag, missing or unwritable workdir,
unavailable dataset or weights) is reported as ONE line on stderr with exit code 2, before
anything is compiled; a non-finite loss (``NonFiniteLossError``) and a checkpoint that cannot be
read for a reason other than damage (``CheckpointFault``: an I/O error, device memory) are one line
with exit code 1; any
other exception is a bug and keeps its traceback (exit code 1). A finished, resumed-and-finished
or preempted (SIGTERM) run exits with 0. The other commands (``experiments.evaluate``,
``experiments.sample``) run their work through :func:`guarded` too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from ddpm_jax.errors import CheckpointFault, NonFiniteLossError, UsageError

EXIT_USAGE = 2
EXIT_DIVERGED = 1


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    print(f"error: {_one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(code)


def guarded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, with a ``UsageError`` turned into one line on stderr and exit
    code 2, and a ``NonFiniteLossError`` or ``CheckpointFault`` into one line and exit code 1;
    any other exception propagates with its traceback."""
    try:
        return fn(*args, **kwargs)
    except UsageError as e:
        _fail(str(e))
    except (NonFiniteLossError, CheckpointFault) as e:
        _fail(str(e), EXIT_DIVERGED)


def tool_main(
    doc: str,
    define_flags: Callable[[], flags.FlagValues],
    body: Callable[[flags.FlagValues], Any],
    argv: Sequence[str] | None = None,
) -> Any:
    """The entry of a command with its own absl flags (``experiments.sample``, ``.evaluate``).

    ``--help`` prints ``doc`` and the flags and exits 0; otherwise parses ``argv`` (default
    ``sys.argv``; a bad flag or a positional argument is a ``UsageError``) and returns
    ``body(flag_values)``, both under :func:`guarded`.
    """
    argv = list(sys.argv if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(doc)
        print(define_flags().main_module_help())
        sys.exit(0)

    def parse_and_run():
        fv = define_flags()
        try:
            extra = fv(argv)[1:]
        except flags.Error as e:
            raise UsageError(f"bad command line: {e}") from None
        if extra:
            raise UsageError(f"unexpected positional arguments {extra}")
        return body(fv)

    return guarded(parse_and_run)


def define_sample_flags(fv: flags.FlagValues) -> None:
    """One flag per field of ``ddpm_jax.sample_settings.SampleSettings`` (``--method``,
    ``--num_steps``, ``--eta``, ...), each None unless given (:func:`sample_settings`)."""
    import dataclasses

    from ddpm_jax.sample_settings import SampleSettings

    define = {"str": flags.DEFINE_string, "int": flags.DEFINE_integer}
    for field in dataclasses.fields(SampleSettings):
        kind = str(field.type).split(" ")[0]
        help_ = f"Sampling setting (default: the run's sample.{field.name}; SampleSettings)."
        define.get(kind, flags.DEFINE_float)(field.name, None, help_, flag_values=fv)


def sample_settings(
    fv: flags.FlagValues, defaults: Any, num_timesteps: int, methods: Any = None
) -> Any:
    """``defaults`` (a ``SampleSettings``) with the sampling flags that were given, checked
    against ``num_timesteps`` and the model's sampler ``methods`` (``Formulation.methods``).

    Raises:
      UsageError: naming the flag.
    """
    import dataclasses

    given = {f.name: fv[f.name].value for f in dataclasses.fields(defaults)}
    return defaults.override(**given).check(num_timesteps, prefix="--", methods=methods)


def _define_flags(config: ml_collections.ConfigDict, argv: Sequence[str]) -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "Work directory (created; resumed from).", flag_values=fv)
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "host:port of process 0 for a multi-process job.",
        flag_values=fv,
    )
    flags.DEFINE_integer("num_processes", None, "Processes of the job.", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "This process's index in the job.", flag_values=fv)
    flags.DEFINE_boolean(
        "start_over",
        False,
        "When the workdir's checkpoints all fail to restore, move them aside (never deleted) "
        "and train from step 0; without it that is an error and nothing is changed.",
        flag_values=fv,
    )
    flags.DEFINE_list(
        "allow_change",
        [],
        "Fields that change what is trained (train.batch_size, diffusion.weighting, ...) that "
        "this resume may change from the resumed step on; recorded in config_history.jsonl.",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "distributed",
        "auto",
        ["auto", "true", "false"],
        "Initialize jax.distributed: auto-detect SLURM / TPU pods, always, or never.",
        flag_values=fv,
    )
    config_flags.DEFINE_config_dict(
        "config", config, "The run's config.", flag_values=fv, sys_argv=list(argv)
    )
    return fv


def cluster_detected(environ=None) -> bool:
    """Whether the environment is a multi-process SLURM job or a multi-host TPU slice."""
    env = os.environ if environ is None else environ

    def as_int(name: str) -> int:
        try:
            return int(env.get(name, "1").split("(")[0])
        except ValueError:
            return 1

    if "SLURM_JOB_ID" in env and max(as_int("SLURM_NTASKS"), as_int("SLURM_STEP_NUM_TASKS")) > 1:
        return True
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return len(hosts) > 1


def initialize_distributed(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    mode: str = "auto",
) -> None:
    """Calls ``jax.distributed.initialize`` when the job spans processes (see module docstring).

    Raises:
      UsageError: inconsistent explicit flags.
    """
    import jax

    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if coordinator_address is None or num_processes is None or process_id is None:
            raise UsageError(
                "--coordinator_address, --num_processes and --process_id must be given together"
            )
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UsageError(
                f"--process_id={process_id} must be in [0, --num_processes={num_processes})"
            )
        if mode == "false":
            raise UsageError("--distributed=false contradicts --coordinator_address")
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    elif mode == "true" or (mode == "auto" and cluster_detected()):
        jax.distributed.initialize()


def main(
    get_config: Callable[[], ml_collections.ConfigDict],
    argv: Sequence[str] | None = None,
    *,
    run_fn: Callable[[ml_collections.ConfigDict, str], Any] | None = None,
    adapt: Callable[[ml_collections.ConfigDict], None] | None = None,
):
    """Parses flags, initializes multi-process JAX if needed, validates and trains.

    Args:
      get_config: the experiment's ``get_config()`` (a ConfigDict from ``default_config()``).
      argv: command line including the program name (default ``sys.argv``).
      run_fn: ``run_fn(config, workdir, start_over=False, allow_change=())`` runs the
        experiment (default ``ddpm_jax.train.run``); it reports a user's mistake by raising
        ``UsageError``.
      adapt: ``adapt(config)``, the experiment's defaults that depend on the overrides (e.g. the
        sampler of the formulation given on the command line), applied to the config after the
        ``--config.*`` flags and before validation.

    Exits the process: 0 on success or preemption, 1 on a non-finite loss or a bug, 2 on bad
    input.
    """
    argv = list(sys.argv if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(f"usage: {argv[0]} --workdir=DIR [--config.<section>.<field>=VALUE ...]\n")
        print(__doc__)
        print(f"The config (defaults of this experiment):\n{get_config()}")
        sys.exit(0)
    config = get_config()  # an error here is the experiment's bug: it keeps its traceback
    try:
        fv = _define_flags(config, argv)  # applies the --config.* overrides
        extra = fv(argv)[1:]
    # What parsing raises for a bad flag or --config.* override (ml_collections raises
    # AttributeError / KeyError / TypeError / ValueError for an unknown field or a bad value).
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        _fail(f"bad command line: {e}")
    if extra:
        _fail(f"unexpected positional arguments {extra}")
    if adapt is not None:
        adapt(fv.config)
    return guarded(_run, fv, run_fn)


def _run(fv: flags.FlagValues, run_fn) -> Any:
    from ddpm_jax import config as config_lib, resume, train, workdir

    path = workdir.check_workdir(fv.workdir)
    config_lib.validate(fv.config)  # without devices first: no JAX backend needed yet
    config_lib.check_paths(fv.config)
    initialize_distributed(fv.coordinator_address, fv.num_processes, fv.process_id, fv.distributed)
    run_fn = train.run if run_fn is None else run_fn
    allow_change = resume.check_allow_change(fv.allow_change)  # a typo: before anything runs
    with workdir.trainer_lock(path):  # the whole run, every phase: one trainer per workdir
        return run_fn(fv.config, path, start_over=fv.start_over, allow_change=allow_change)


__all__ = ["cluster_detected", "guarded", "initialize_distributed", "main"]
