"""Errors that mean "the user's input or config is wrong", not a bug.

`launch.py` prints these as one clear line (and exits non-zero) instead of a
traceback; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """Bad config, bad data or a missing file: the message says what to fix."""
