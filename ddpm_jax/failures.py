"""What a failed checkpoint read or write says: damaged files, or a failing environment.

A checkpoint is moved aside as damaged only on evidence that its files are incomplete or
unparseable; a permission error, an I/O error or a device out of memory is the environment's
failure, not the checkpoint's, and must not cost the user their newest checkpoint. The evidence is
in the exception chain, as Python, Orbax and tensorstore raise it (measured with
orbax-checkpoint 0.12.8):

| what happened to the files | what reading raises |
|---|---|
| a data file truncated | ``ValueError("OUT_OF_RANGE: ...")`` |
| a data file or the manifest deleted | ``ValueError("NOT_FOUND: ...")`` |
| garbage in the manifest or a data file | ``ValueError("DATA_LOSS: ... Error decoding ...")`` |
| garbage in a compressed block | ``ValueError("... Data corruption detected ...")`` (no code) |
| ``_METADATA`` garbled, empty, missing | ``JSONDecodeError``, ``StopIteration``, no such file |
| ``_sharding`` garbled | ``ValueError("FAILED_PRECONDITION: ... Invalid JSON")`` |

A full disk surfaces from Orbax's background write as
``ValueError("RESOURCE_EXHAUSTED: Error writing local file ... [os_error_code='28']")`` or as an
``OSError(ENOSPC)``.
"""

from __future__ import annotations

import errno
import json
import os
import re

DAMAGED, DENIED, FAULT = "damaged", "denied", "fault"

# tensorstore raises ValueError("CODE: ...") (an absl status code), with "[os_error_code='N']"
# when an OS call failed. Codes that say the bytes read are wrong or missing, and the messages
# of undecodable files without a code (a damaged compressed block):
_DAMAGE_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND")
_DAMAGE_PHRASES = ("Error decoding", "Data corruption", "Invalid JSON", "Error parsing")
_DENIED_ERRNOS = {errno.EACCES, errno.EPERM}
# Write failures that mean "the directory cannot take more": full disk, quota, read-only, denied.
_UNWRITABLE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, *_DENIED_ERRNOS}
_STATUS = re.compile(r"^([A-Z_]{5,}): ")
_OS_ERROR = re.compile(r"\[os_error_code='?(\d+)'?\]")
_FILE = re.compile(r'(?:local file|Failed writing:) "([^"]+)"')


def _chain(error: BaseException | None):
    """``error`` and its causes and contexts (Orbax wraps the errors of its threads)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _errno(error: BaseException) -> int | None:
    """The OS error number of an OSError, or of a tensorstore error's ``os_error_code``."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno
    match = _OS_ERROR.search(str(error))
    return int(match.group(1)) if match else None


def _status(error: BaseException) -> str | None:
    """The absl status code a tensorstore or XLA error's message starts with."""
    match = _STATUS.match(str(error))
    return match.group(1) if match else None


def read_failure(error: BaseException) -> str:
    """What a failure to read a checkpoint says about it: :data:`DAMAGED` only on evidence that
    its files are incomplete or unparseable (a missing file, a truncated or undecodable data
    file, unparseable metadata), :data:`DENIED` for a permission error, else :data:`FAULT` (an
    I/O error, device out of memory, anything unknown: the environment failed, not the files).
    """
    chain = list(_chain(error))
    codes = [_errno(e) for e in chain]
    if any(c in _DENIED_ERRNOS for c in codes) or any(
        _status(e) == "PERMISSION_DENIED" for e in chain
    ):
        return DENIED
    if any(c is not None and c != errno.ENOENT for c in codes):
        return FAULT  # EIO, ENOSPC, ESTALE ...: the OS failed, not the checkpoint's bytes
    for e in chain:
        if isinstance(e, (FileNotFoundError, json.JSONDecodeError)):
            return DAMAGED
        text = str(e)
        if _status(e) in _DAMAGE_CODES or any(p in text for p in _DAMAGE_PHRASES):
            return DAMAGED
    return FAULT


def write_failure(error: BaseException) -> str | None:
    """``"<reason> (<file>)"`` when ``error``'s chain says the checkpoint directory cannot be
    written (a full disk or quota, a read-only filesystem, permission denied): an ``OSError``,
    or the ``ValueError`` that tensorstore raises in Orbax's background write
    (``RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']``); else None."""
    for e in _chain(error):
        code = _errno(e)
        if code in _UNWRITABLE_ERRNOS:
            path = e.filename if isinstance(e, OSError) else None
            if path is None:
                match = _FILE.search(str(e))
                path = match.group(1) if match else "a checkpoint file"
            return f"{os.strerror(code)} ({path})"
    return None


__all__ = ["DAMAGED", "DENIED", "FAULT", "read_failure", "write_failure"]
