"""Checks of one config field each: its value against what is allowed.

Every check reads ``field`` (dotted, e.g. ``"train.lr"``) from a ConfigDict and raises a
:class:`~ddpm_jax.errors.UsageError` naming the field, its value and what is allowed
(``config.train.lr=-1 is invalid: expected a number in (0.0, inf]``). ``ddpm_jax.config`` composes
them into ``validate``.
"""

from __future__ import annotations

from typing import Any

from ddpm_jax.errors import UsageError


def fail(field: str, value: Any, allowed: str) -> None:
    raise UsageError(f"config.{field}={value!r} is invalid: {allowed}")


def integer(c, field: str, minimum: int, *, optional: bool = False) -> None:
    value = get(c, field)
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        fail(field, value, f"expected an integer >= {minimum}" + (" or None" if optional else ""))


def number(c, field: str, lo: float, hi: float, *, lo_open=False, hi_open=False, optional=False):
    value = get(c, field)
    if optional and value is None:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        fail(field, value, f"expected a number in {left}{lo}, {hi}{right}")


def choice(c, field: str, choices: tuple[str, ...]) -> None:
    value = get(c, field)
    if value not in choices:
        fail(field, value, f"expected one of {list(choices)}")


def boolean(c, field: str, *, optional: bool = False) -> None:
    value = get(c, field)
    if not (isinstance(value, bool) or (optional and value is None)):
        fail(field, value, "expected True or False" + (" or None" if optional else ""))


def int_tuple(c, field: str, *, allow_empty: bool) -> None:
    value = get(c, field)
    ok = isinstance(value, tuple | list) and (allow_empty or len(value) > 0)
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    if not ok:
        empty = "a possibly empty" if allow_empty else "a non-empty"
        fail(field, value, f"expected {empty} tuple of positive integers")


def path(c, field: str) -> None:
    value = get(c, field)
    if value is not None and not isinstance(value, str):
        fail(field, value, "expected a path or None")


def get(c, field: str) -> Any:
    node = c
    for part in field.split("."):
        if part not in node:
            raise UsageError(f"config.{field} is missing; default_config() defines it")
        node = node[part]
    return node


__all__ = ["boolean", "choice", "fail", "get", "int_tuple", "integer", "number", "path"]
