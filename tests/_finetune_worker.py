"""Subprocess entry for the fine-tuning tests: ``experiments.finetune_sd`` through
``ddpm_jax.cli.main``, with ``--signal_at=STEP:SIGKILL|SIGTERM`` (see ``_train_worker.py``)
stripped before the CLI sees the flags.

Usage: ``python tests/_finetune_worker.py --workdir=DIR --pretrained=SD_DIR [--config.*=...]
[--signal_at=STEP:SIGNAL]``. The parent sets ``XLA_FLAGS`` and ``JAX_PLATFORMS``.
"""

from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _train_worker import _signal_hook  # noqa: E402

from ddpm_jax import cli  # noqa: E402
from ddpm_jax.latent import finetune_sd as ft  # noqa: E402
from experiments import finetune_sd  # noqa: E402


def main(argv: list[str]) -> None:
    run_fn, rest = ft.finetune, []
    for arg in argv:
        name, _, value = arg.partition("=")
        if name == "--signal_at":
            run_fn = functools.partial(ft.finetune, step_callback=_signal_hook(value))
        else:
            rest.append(arg)
    argv = finetune_sd.pretrained_flag(rest)
    cli.main(finetune_sd.get_config, argv, run_fn=run_fn, adapt=finetune_sd.adapt)


if __name__ == "__main__":
    main(sys.argv)
