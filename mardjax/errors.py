"""Errors that mean "the user's input or config is wrong", not a bug.

`launch.py` prints these as one clear line (and exits non-zero) instead of a
traceback; anything else is a bug and keeps its traceback.
"""

from typing import Any, Collection


class UserError(Exception):
  """Bad config, bad data or a missing file: the message says what to fix."""


def need(ok: bool, field: str, value: Any, why: str) -> None:
  """Raises the one-line error for `config.<field>` when not `ok`.

  The form every config check uses, whichever layer owns the field:
  `config.<field>=<value!r>: <why>`.
  """
  if not ok:
    raise UserError(f'config.{field}={value!r}: {why}')


def need_choice(field: str, value: Any, choices: Collection[str]) -> None:
  """Raises the one-line error unless `value` names one of `choices` (the
  keys of a registry)."""
  need(value in choices, field, value, f'choose from {tuple(choices)}')
