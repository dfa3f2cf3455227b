"""Evaluate a trained run or published weights: ``python -m experiments.evaluate --workdir=RUN``
(or ``--pretrained=DIR --dataset=NAME``) ``[flags]``.

Samples ``--num_samples`` images from the EMA parameters of the run's newest checkpoint (a pixel
or a latent run) with the sampling flags (``--method``, ``--num_steps``, ``--guidance_scale``,
``--eta``, ... one per field of ``ddpm_jax.sample_settings.SampleSettings``; defaults: the run's
``sample.*`` config), sharded over all devices, scores them against cached reference statistics
of the training split at the samples' size (digits: digits-FID, KID, class accuracy; other
datasets: Inception FID, KID, IS with ``--inception_path``) and writes ``<out>.json`` and a PNG
grid ``<out>.png`` (default ``RUN/eval/<method>_<steps>_g<scale>_n<N>_seed<seed>.json``). The
dataset is read only when its reference statistics are not cached yet.

``--sweep`` instead runs the metrics against the number of steps for each method of
``--sweep_steps`` and against the guidance scales of ``--sweep_guidance``, plus the held-out test
split as the floor, and writes ``sweep.json``, ``sweep.md`` and two PNG charts into ``--out``
(default ``RUN/eval/sweep``).

``--pretrained=DIR`` evaluates a diffusers DDPM folder (``experiments.sample`` explains the
layouts) against ``--dataset`` (with ``--data_dir`` / ``--manual_dir`` as for training); outputs
go to ``./eval/<DIR name>/`` unless ``--out`` says otherwise. On an accelerator, Ho et al.'s
CIFAR-10 model (``google/ddpm-cifar10-32``) reproduces the paper's FID 3.17 with the 1,000-step
chain and DDIM's table (4.67 at 50 steps) with::

    python -m experiments.evaluate --pretrained=ddpm-cifar10-32 --dataset=cifar10 \
        --num_samples=50000 --sweep --sweep_steps="ddpm:full;ddim:10,20,50,100" \
        --sweep_guidance=1 --inception_path=pt_inception-2015-12-05-6726825d.pth

A user's mistake (no such run, no checkpoint, a bad flag value, missing Inception weights
offline, data that is not prepared on a cache miss) is ONE line on stderr with exit code 2.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import flags

from ddpm_jax import cli
from ddpm_jax.errors import UsageError

DEFAULT_SWEEP_STEPS = "ddpm:full;ddim:10,20,50,100;dpmpp_2m:10,20"


def _define_flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    f = dict(flag_values=fv)
    flags.DEFINE_string("workdir", None, "A training run's work directory.", **f)
    flags.DEFINE_string("pretrained", None, "A diffusers DDPM folder (instead of --workdir).", **f)
    flags.DEFINE_string("dataset", None, "The --pretrained model's training dataset.", **f)
    flags.DEFINE_string("data_dir", None, "tfds data directory of --dataset.", **f)
    flags.DEFINE_string("manual_dir", None, "Archives to prepare --dataset offline.", **f)
    cli.define_sample_flags(fv)  # --method, --num_steps, --eta, --guidance_scale, ...
    flags.DEFINE_integer("num_samples", 1000, "Samples to draw (per sweep cell).", **f)
    flags.DEFINE_integer("seed", 0, "Sampling seed.", **f)
    flags.DEFINE_boolean("sweep", False, "Steps sweep and guidance sweep.", **f)
    flags.DEFINE_string("sweep_steps", DEFAULT_SWEEP_STEPS, "method:steps,...;... ('full'=T).", **f)
    flags.DEFINE_string("sweep_guidance", "0,1,2,3,5", "Guidance scales of the sweep.", **f)
    flags.DEFINE_integer(
        "sweep_ddpm_num_samples", None, "Samples for ddpm cells (default --num_samples).", **f
    )
    flags.DEFINE_string("out", None, "Report path (.json), or the sweep's directory.", **f)
    flags.DEFINE_string("cache_dir", None, "Reference statistics cache directory.", **f)
    flags.DEFINE_string("inception_path", None, "FID Inception .pth (non-digits datasets).", **f)
    flags.DEFINE_integer("kid_num_subsets", 100, "KID subsets.", **f)
    return fv


def main(argv: Sequence[str] | None = None) -> dict:
    """Parses flags, evaluates (or sweeps) and writes the outputs; returns the report.

    Exits with code 2 and one line on stderr on a user's mistake (``ddpm_jax.cli.guarded``).
    """
    return cli.tool_main(__doc__, _define_flags, _main, argv)


def _main(fv: flags.FlagValues) -> dict:

    from ddpm_jax.evaluation import report, sweep as ev
    from ddpm_jax.runs import DataRef, load
    from ddpm_jax.workdir import is_writer, log

    data = DataRef(fv.dataset, fv.data_dir, fv.manual_dir) if fv.dataset else None
    run = load(fv.workdir, fv.pretrained, data=data)
    T, methods = run.schedule.num_timesteps, run.formulation.methods
    settings = cli.sample_settings(fv, run.sample_settings, T, methods)
    if fv.num_samples < 2:
        raise UsageError(f"--num_samples={fv.num_samples} is invalid: expected an integer >= 2")
    if fv.sweep:
        steps = ev.parse_steps_spec(fv.sweep_steps, T)
        try:
            scales = [float(g) for g in fv.sweep_guidance.split(",") if g.strip()]
        except ValueError:
            raise UsageError(f"sweep_guidance={fv.sweep_guidance!r} is invalid") from None
        try:
            for m, ns in steps.items():
                for n in ns:
                    settings.replace(method=m, num_steps=n).check(T, methods=methods)
        except UsageError as e:
            raise UsageError(f"--sweep_steps={fv.sweep_steps!r}: {e}") from None
    run_evaluator = ev.RunEvaluator(
        run,
        cache_dir=fv.cache_dir,
        inception_path=fv.inception_path,
        kid_num_subsets=fv.kid_num_subsets,
    )
    eval_dir = (
        os.path.join(run.path, "eval")
        if fv.workdir
        else os.path.join("eval", os.path.basename(run.path))
    )
    if fv.sweep:
        ddpm_n = fv.sweep_ddpm_num_samples
        result = ev.sweep(
            run_evaluator,
            settings,
            steps=steps,
            guidance_scales=scales,
            num_samples=fv.num_samples,
            num_samples_for=lambda m, n: ddpm_n if (m == "ddpm" and ddpm_n) else fv.num_samples,
            seed=fv.seed,
        )
        if is_writer():
            paths = report.write_sweep(result, fv.out or os.path.join(eval_dir, "sweep"))
            log(report.sweep_markdown(result))
            log("wrote " + ", ".join(paths.values()))
        return result
    result, imgs = run_evaluator.evaluate(settings, fv.num_samples, seed=fv.seed)
    name = f"{settings.name()}_n{fv.num_samples}_seed{fv.seed}.json"
    if is_writer():
        out, grid = report.write_report(result, imgs, fv.out or os.path.join(eval_dir, name))
        log(f"metrics: {result['metrics']}")
        log(f"wrote {out} and {grid}")
    return result


if __name__ == "__main__":
    main()
