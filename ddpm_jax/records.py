"""What a run records as it trains: ``metrics.jsonl`` and TensorBoard event files, together.

``metrics.jsonl`` is the machine-readable record; the event files under ``WORKDIR/tensorboard/``
carry the same scalars under the same names, plus the sample grids as images, for
``tensorboard --logdir runs/``. Only process 0 writes. They are written with tensorboardX (pure
Python and protobuf; TensorFlow is never needed): clu's writer, the other candidate, writes
through ``tf.summary``. tensorboardX is a dependency of the package; if it is missing anyway the
run says so once and goes on with ``metrics.jsonl`` alone.

A resumed run appends to the same log directory: a new event file whose first event purges
every event after the restored step from TensorBoard's view (``purge_step``), as
``metrics.jsonl`` is cut back to that step, so no step appears twice in either record.
"""

from __future__ import annotations

import numbers
import os
import sys
import time

import numpy as np

from ddpm_jax.workdir import JsonLines, is_writer, warn

TENSORBOARD_DIR = "tensorboard"


class RunRecords:
    """The scalar and image records of a run (process 0 writes, other processes do nothing).

    Args:
      workdir: the run's directory.
      start_step: the step the run (re)starts from; earlier records are kept, later ones are
        dropped (``metrics.jsonl`` is cut back, TensorBoard purges them).
    """

    def __init__(self, workdir: str, start_step: int):
        self.metrics = JsonLines(os.path.join(workdir, "metrics.jsonl"))
        self.logdir = os.path.join(workdir, TENSORBOARD_DIR)
        self._writer = None
        if not is_writer():
            return
        self.metrics.cut(start_step)
        try:
            SummaryWriter = _summary_writer_class()
        except ImportError:
            warn("tensorboardX is not installed: no TensorBoard event files (metrics.jsonl only)")
            return
        # A new file per (re)start, never one of an earlier start's names (same second, same pid).
        suffix = f".{os.getpid()}.{time.time_ns()}"
        self._writer = SummaryWriter(self.logdir, purge_step=start_step + 1, filename_suffix=suffix)

    def scalars(self, record: dict) -> None:
        """Appends ``record`` (with an integer ``"step"``) to ``metrics.jsonl`` and writes its
        numeric fields as TensorBoard scalars of the same names."""
        if not is_writer():
            return
        self.metrics.append(record)
        if self._writer is not None:
            step = record["step"]
            for name, value in record.items():
                if name != "step" and isinstance(value, numbers.Real):
                    self._writer.add_scalar(name, float(value), step)
            self._writer.flush()

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """A uint8 ``[H, W, C]`` image (a sample grid) at ``step``."""
        if self._writer is not None:
            self._writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _summary_writer_class():
    """``tensorboardX.SummaryWriter``, imported without PyTorch.

    tensorboardX imports torch whenever it is installed (only to accept torch tensors; the runs
    write NumPy): 3-4 s and a second framework's memory at the start of every run. Hiding torch
    from the import makes tensorboardX take its no-torch path; a process that already imported
    torch keeps it.
    """
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # ``import torch`` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


__all__ = ["TENSORBOARD_DIR", "RunRecords"]
