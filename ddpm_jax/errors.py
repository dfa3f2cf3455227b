"""The exceptions the command line turns into exit codes (``ddpm_jax.cli``).

- :class:`UsageError`: a user's mistake (a bad config value or flag, missing or unavailable data
  or weights, an unusable work directory, a resume the checkpoints cannot take). The message is
  one line that names the field or file, the value and what to do; ``cli`` prints it and exits
  with code 2. It is a ``ValueError``.
- :class:`NonFiniteLossError`: training diverged; ``cli`` prints the message and exits with 1.
- :class:`CheckpointFault`: a checkpoint could not be read because the environment failed (an I/O
  error, device out of memory, an error that is not evidence of damaged files), not because of
  a user's mistake; nothing was moved or changed. ``cli`` prints the message (one line naming
  the checkpoint and the error) and exits with 1.

Any other exception is a bug and keeps its traceback.
"""


class UsageError(ValueError):
    """A user's mistake, found before anything was changed; the message says what to do."""


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN or infinite; nothing after it was saved."""


class CheckpointFault(RuntimeError):
    """Reading a checkpoint failed for a reason other than damaged files or a user's mistake;
    nothing was moved, and running the same command again after fixing the cause resumes."""


__all__ = ["CheckpointFault", "NonFiniteLossError", "UsageError"]
