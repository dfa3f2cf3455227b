"""Evaluate a trained run: ``python -m experiments.evaluate --workdir=RUN [flags]``.

Samples ``--num_samples`` images from the EMA parameters of the run's newest checkpoint with
``--method`` / ``--num_steps`` / ``--guidance_scale`` (defaults: the run's ``sample.*`` config),
sharded over all devices, scores them against cached reference statistics of the training split
(digits: digits-FID, KID, class accuracy; other datasets: Inception FID, KID, IS with
``--inception_path``) and writes ``<out>.json`` and a PNG grid ``<out>.png`` (default
``RUN/eval/<method>_<steps>_g<scale>_n<N>_seed<seed>.json``).

``--sweep`` instead runs the metrics against the number of steps for each method of
``--sweep_steps`` and against the guidance scales of ``--sweep_guidance``, plus the held-out test
split as the floor, and writes ``sweep.json``, ``sweep.md`` and two PNG plots into ``--out``
(default ``RUN/eval/sweep``).

A user's mistake (no such run, no checkpoint, a bad flag value, missing Inception weights
offline) is ONE line on stderr with exit code 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import flags

EXIT_USAGE = 2
DEFAULT_SWEEP_STEPS = "ddpm:full;ddim:10,20,50,100;dpmpp_2m:10,20"


def _define_flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    f = dict(flag_values=fv)
    flags.DEFINE_string("workdir", None, "A training run's work directory.", **f)
    flags.DEFINE_string("method", None, "Sampler (default: the run's sample.method).", **f)
    flags.DEFINE_integer("num_steps", None, "Sampling steps (default: sample.num_steps).", **f)
    flags.DEFINE_float("guidance_scale", None, "CFG scale (default: sample.guidance_scale).", **f)
    flags.DEFINE_integer("num_samples", 1000, "Samples to draw (per sweep cell).", **f)
    flags.DEFINE_float("eta", 0.0, "DDIM eta.", **f)
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


def _fail(message: str) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def main(argv: Sequence[str] | None = None) -> dict:
    """Parses flags, evaluates (or sweeps) and writes the outputs; returns the report."""
    argv = list(sys.argv if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        print(_define_flags().main_module_help())
        sys.exit(0)
    fv = _define_flags()
    try:
        extra = fv(argv)[1:]
    except flags.Error as e:
        _fail(f"bad command line: {e}")
    if extra:
        _fail(f"unexpected positional arguments {extra}")
    if not fv.workdir:
        _fail("--workdir is missing: pass a training run's work directory")

    import jax

    from ddpm_jax import data, train
    from ddpm_jax import evaluate as ev

    try:
        run = train.load_run(fv.workdir)
        s = run.config.sample
        method = fv.method if fv.method is not None else s.method
        num_steps = fv.num_steps if fv.num_steps is not None else s.num_steps
        scale = fv.guidance_scale if fv.guidance_scale is not None else s.guidance_scale
        ev.check_sampling(run, method, num_steps, scale, fv.num_samples, fv.eta)
        if fv.sweep:
            steps = ev.parse_steps_spec(fv.sweep_steps, run.config.diffusion.num_timesteps)
            try:
                scales = [float(g) for g in fv.sweep_guidance.split(",") if g.strip()]
            except ValueError:
                raise ValueError(f"sweep_guidance={fv.sweep_guidance!r} is invalid") from None
            try:
                for m, ns in steps.items():
                    for n in ns:
                        ev.check_sampling(run, m, n, scale, fv.num_samples, fv.eta)
            except ValueError as e:
                raise ValueError(f"--sweep_steps={fv.sweep_steps!r}: {e}") from None
        evaluator = ev.Evaluator(
            run,
            cache_dir=fv.cache_dir,
            inception_path=fv.inception_path,
            kid_num_subsets=fv.kid_num_subsets,
        )
    except (ValueError, RuntimeError, data.DataUnavailableError) as e:
        _fail(str(e))
    eval_dir = os.path.join(run.workdir, "eval")
    if fv.sweep:
        ddpm_n = fv.sweep_ddpm_num_samples
        result = ev.sweep(
            evaluator,
            steps=steps,
            guidance_scales=scales,
            guidance_scale=scale,
            method=method,
            num_steps=num_steps,
            num_samples=fv.num_samples,
            num_samples_for=lambda m, n: ddpm_n if (m == "ddpm" and ddpm_n) else fv.num_samples,
            eta=fv.eta,
            seed=fv.seed,
        )
        if jax.process_index() == 0:
            paths = ev.write_sweep(result, fv.out or os.path.join(eval_dir, "sweep"))
            print(ev.sweep_markdown(result))
            print("wrote " + ", ".join(paths.values()))
        return result
    report, imgs = evaluator.evaluate(
        method=method,
        num_steps=num_steps,
        guidance_scale=scale,
        num_samples=fv.num_samples,
        eta=fv.eta,
        seed=fv.seed,
    )
    name = f"{method}_{num_steps}_g{scale:g}_n{fv.num_samples}_seed{fv.seed}.json"
    if jax.process_index() == 0:
        out, grid = ev.write_report(report, imgs, fv.out or os.path.join(eval_dir, name))
        print(f"metrics: {report['metrics']}")
        print(f"wrote {out} and {grid}")
    return report


if __name__ == "__main__":
    main()
