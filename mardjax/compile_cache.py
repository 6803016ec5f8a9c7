"""jax's persistent compilation cache, on by default for `launch.py`.

A run compiles its train step, evaluation and embedding programs, seconds
each on a GPU (more than a short run's steps). With the cache on, the
compiled programs are written to a directory and a later run of the same
program (same code, shapes, flags, jax version and device) reads them back
instead of compiling: a second run of a config compiles nothing.

`launch.py --compile_cache=DIR` keeps them in DIR, by default the user's
cache directory (`default_dir`: `$XDG_CACHE_HOME/mardjax/jax`, else
`~/.cache/mardjax/jax`; the environment variable `MARDJAX_COMPILE_CACHE`
sets another default); `off` (or an empty value) turns the cache off.
"""

import os

from absl import logging

# Programs are kept whatever their compile time: the small ones are cheap
# to write, and a run compiles dozens of them.
MIN_COMPILE_SECONDS = 0.0
# Beyond this the least recently used entries are dropped.
MAX_BYTES = 4 * 2**30


def default_dir() -> str:
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'mardjax', 'jax')


def flag_default() -> str:
  """The flag's default: `MARDJAX_COMPILE_CACHE`, else `default_dir()`."""
  return os.environ.get('MARDJAX_COMPILE_CACHE') or default_dir()


def resolve(setting: str) -> str | None:
  """The cache directory `setting` names: 'off' or '' -> None, else the
  path itself (`~` expanded, made absolute)."""
  setting = (setting or '').strip()
  if setting.lower() in ('', 'off', 'none', 'false', '0'):
    return None
  return os.path.abspath(os.path.expanduser(setting))


def enable(setting: str) -> str | None:
  """Turns the cache on in the directory `setting` names (`resolve`);
  returns it, or None when off or when the directory cannot be made (a
  warning then: compiling without the cache is slower, not wrong)."""
  path = resolve(setting)
  if path is None:
    return None
  try:
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK):
      raise PermissionError(f'{path} is not writable')
  except OSError as e:
    logging.warning('Compilation cache off: %s (--compile_cache=off '
                    'silences this).', e)
    return None
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs',
                    MIN_COMPILE_SECONDS)
  jax.config.update('jax_compilation_cache_max_size', MAX_BYTES)
  return path
