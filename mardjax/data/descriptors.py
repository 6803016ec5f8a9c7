"""AcousticBrainz low-level descriptors: which values we read, in what order.

The set of descriptors is configuration. A descriptor list is a sequence of
entries `path[:shape]`, where `path` is a dotted path into an AcousticBrainz
low-level document and `shape` says what the path must hold:

  * omitted or `scalar`: one number (`rhythm.bpm`);
  * `N` or `NxM`: a vector or matrix (`lowlevel.mfcc.cov:13x13`), flattened in
    row-major order;
  * `stats`: a dict of the nine frame statistics Essentia writes, taken in the
    fixed order of `STATS` (`lowlevel.spectral_rolloff:stats`);
  * `statsxN`: the same nine statistics, each a vector of N values
    (`lowlevel.barkbands:statsx27`), flattened statistic-major.

Entries are concatenated in the order listed. The default, `paper`, is the
paper's 369 values: MFCC mean (13), MFCC covariance (13x13), MFCC inverse
covariance (13x13), spectral rolloff statistics (9) and zero-crossing-rate
statistics (9).

A document that lacks a path, holds the wrong shape or non-finite values raises
`DescriptorError` with a short machine-readable `reason`, so ingestion can count
skips by reason.
"""

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from mardjax.errors import need_choice
from mardjax.errors import UserError

# Essentia's frame statistics, in the order we flatten them.
STATS = ('min', 'max', 'mean', 'median', 'var', 'dmean', 'dmean2', 'dvar',
         'dvar2')

DESCRIPTOR_SETS = {
    'paper': ('lowlevel.mfcc.mean:13', 'lowlevel.mfcc.cov:13x13',
              'lowlevel.mfcc.icov:13x13', 'lowlevel.spectral_rolloff:stats',
              'lowlevel.zerocrossingrate:stats'),
}

TRANSFORMS = ('signed_log', 'none')


def check_config(data_config) -> None:
  """The data fields that choose from this module: `transform` (one of
  `TRANSFORMS`) and the descriptor list (`parse_descriptor_list`).

  Raises:
    UserError: one line naming the field.
  """
  need_choice('data.transform', data_config.transform, TRANSFORMS)
  try:
    parse_descriptor_list(data_config.descriptors)
  except ValueError as e:
    raise UserError(f'config.data.descriptors: {e}') from None


class DescriptorError(ValueError):
  """A document cannot give the configured descriptors.

  Attributes:
    reason: short skip-count key: `missing_path`, `wrong_shape`, `non_finite`,
      `not_numeric` or `not_a_document`.
  """

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class DescriptorSpec:
  """One entry of a descriptor list.

  Attributes:
    path: dotted path into the document, e.g. `lowlevel.mfcc.cov`.
    stats: whether the path holds a dict of the nine `STATS`.
    shape: shape of the value (of each statistic when `stats`); `()` = scalar.
  """
  path: str
  stats: bool
  shape: tuple[int, ...]

  @property
  def size(self) -> int:
    n = math.prod(self.shape)
    return n * len(STATS) if self.stats else n

  def names(self) -> list[str]:
    """Names of the flattened values, e.g. `lowlevel.mfcc.cov[0,1]`."""
    cells = [''] if not self.shape else [
        '[' + ','.join(map(str, idx)) + ']' for idx in np.ndindex(*self.shape)]
    if self.stats:
      return [f'{self.path}.{s}{c}' for s in STATS for c in cells]
    return [f'{self.path}{c}' for c in cells]

  def __str__(self) -> str:
    shape = 'x'.join(map(str, self.shape))
    if self.stats:
      return f'{self.path}:stats' + (f'x{shape}' if shape else '')
    return f'{self.path}:{shape}' if shape else self.path


def _parse_shape(text: str, entry: str) -> tuple[int, ...]:
  try:
    dims = tuple(int(d) for d in text.split('x'))
  except ValueError:
    dims = ()
  if not dims or any(d <= 0 for d in dims):
    raise ValueError(f'Descriptor entry {entry!r}: bad shape {text!r}; use '
                     '`scalar`, `N`, `NxM`, `stats` or `statsxN`.')
  return dims


def parse_spec_entry(entry: str) -> DescriptorSpec:
  """Parses one `path[:shape]` entry (see the module docstring)."""
  entry = entry.strip()
  path, _, shape = entry.partition(':')
  path, shape = path.strip(), shape.strip()
  if not path or any(not part for part in path.split('.')):
    raise ValueError(f'Descriptor entry {entry!r}: empty path component.')
  if not shape or shape == 'scalar':
    return DescriptorSpec(path, False, ())
  if shape == 'stats':
    return DescriptorSpec(path, True, ())
  if shape.startswith('statsx'):
    return DescriptorSpec(path, True, _parse_shape(shape[len('statsx'):],
                                                   entry))
  return DescriptorSpec(path, False, _parse_shape(shape, entry))


def parse_descriptor_list(value: str | Sequence[str]) -> tuple[DescriptorSpec,
                                                                ...]:
  """Parses a config value: a set name, a comma-separated string or a list.

  Raises:
    ValueError: unknown set name, malformed entry, empty or repeated paths.
  """
  if isinstance(value, str):
    if value.strip() in DESCRIPTOR_SETS:
      value = DESCRIPTOR_SETS[value.strip()]
    else:
      value = [v for v in value.split(',') if v.strip()]
  specs = tuple(parse_spec_entry(v) for v in value)
  if not specs:
    raise ValueError('The descriptor list is empty; name a set '
                     f'({", ".join(DESCRIPTOR_SETS)}) or list paths.')
  paths = [s.path for s in specs]
  if len(set(paths)) != len(paths):
    raise ValueError(f'Descriptor list repeats a path: {paths}')
  return specs


def dim(specs: Sequence[DescriptorSpec]) -> int:
  """Number of values the specs flatten to (369 for `paper`)."""
  return sum(s.size for s in specs)


def feature_names(specs: Sequence[DescriptorSpec]) -> list[str]:
  """Names of all flattened values, in order; len == dim(specs)."""
  return [n for s in specs for n in s.names()]


def _lookup(doc: dict, path: str) -> Any:
  node = doc
  for part in path.split('.'):
    if not isinstance(node, dict) or part not in node:
      raise DescriptorError('missing_path', f'document has no {path!r}')
    node = node[part]
  return node


def _put(out: np.ndarray, pos: int, value: Any, shape: tuple[int, ...],
         where: str) -> None:
  """Writes `value` (checked against `shape`) into out[pos:pos + size]."""
  if not shape:
    # Exact type test: bool is an int subclass but not a descriptor value.
    if type(value) is float or type(value) is int:  # pylint: disable=unidiomatic-typecheck
      try:
        out[pos] = value
      except OverflowError:  # An integer of hundreds of digits is valid JSON.
        raise DescriptorError('non_finite', f'{where} is too large for a '
                              'float') from None
      return
    if isinstance(value, (list, dict)):
      raise DescriptorError('wrong_shape',
                            f'{where} is not a number (expected a scalar)')
    raise DescriptorError('not_numeric', f'{where} is not numeric')
  if not isinstance(value, list):
    kind = 'not_numeric' if isinstance(value, (str, bool, dict)) else (
        'wrong_shape')
    raise DescriptorError(kind, f'{where} is not an array of shape {shape}')
  try:
    arr = np.asarray(value, dtype=np.float64)
  except OverflowError:
    raise DescriptorError('non_finite', f'{where} holds a number too large '
                          'for a float') from None
  except (TypeError, ValueError):
    # Ragged nested lists and strings inside arrays land here.
    raise DescriptorError('wrong_shape',
                          f'{where} is not a numeric array of shape {shape}'
                          ) from None
  if arr.shape != shape:
    raise DescriptorError('wrong_shape',
                          f'{where} has shape {arr.shape}, expected {shape}')
  out[pos:pos + arr.size] = arr.ravel()


def extract(doc: Any, specs: Sequence[DescriptorSpec]) -> np.ndarray:
  """Flattens the configured descriptors of one low-level document.

  Args:
    doc: a parsed AcousticBrainz low-level document (dict).
    specs: from `parse_descriptor_list`.

  Returns:
    float32 array of shape (dim(specs),).

  Raises:
    DescriptorError: missing path, wrong shape, non-numeric or non-finite
      values (including values too large for float32).
  """
  if not isinstance(doc, dict):
    raise DescriptorError('not_a_document',
                          f'expected a JSON object, got {type(doc).__name__}')
  out = np.empty(dim(specs), np.float64)
  pos = 0
  for spec in specs:
    value = _lookup(doc, spec.path)
    if spec.stats:
      if not isinstance(value, dict):
        raise DescriptorError('wrong_shape',
                              f'{spec.path} is not a dict of statistics')
      step = spec.size // len(STATS)
      for stat in STATS:
        if stat not in value:
          raise DescriptorError('missing_path',
                                f'document has no {spec.path}.{stat!r}')
        _put(out, pos, value[stat], spec.shape, f'{spec.path}.{stat}')
        pos += step
    else:
      _put(out, pos, value, spec.shape, spec.path)
      pos += spec.size
  with np.errstate(over='ignore'):  # Overflow is reported just below.
    out32 = out.astype(np.float32)
  if not np.isfinite(out32).all():
    bad = feature_names(specs)[int(np.argmin(np.isfinite(out32)))]
    raise DescriptorError('non_finite', f'{bad} is not finite (or overflows '
                          'float32)')
  return out32


def extractor_version(doc: Any) -> str:
  """The extractor that wrote a document (`music 1.0`), or '' if unknown."""
  try:
    return str(doc['metadata']['version']['extractor'])
  except (KeyError, TypeError):
    return ''


def transform(x: np.ndarray, kind: str) -> np.ndarray:
  """Stable transform for heavy-tailed values, applied before standardising.

  `signed_log` maps x to sign(x) * log1p(|x|): covariances in the thousands
  and rolloff variances in the millions end up within a few units, signs kept.

  Args:
    x: (..., dim) raw descriptor values.
    kind: one of `TRANSFORMS`.
  """
  if kind == 'signed_log':
    return np.sign(x) * np.log1p(np.abs(x))
  if kind == 'none':
    return x
  raise ValueError(f'Unknown descriptor transform {kind!r}; '
                   f'choose from {TRANSFORMS}.')


class RunningMoments:
  """Streaming per-feature mean and variance (Chan et al.'s batch merge).

  Fitted on training tracks only; float64 so a million tracks do not drift.
  """

  def __init__(self, dim_: int):
    self.count = 0
    self.mean = np.zeros(dim_, np.float64)
    self.m2 = np.zeros(dim_, np.float64)

  def update(self, batch: np.ndarray) -> None:
    """Adds a (n, dim) batch."""
    batch = np.asarray(batch, np.float64)
    n = batch.shape[0]
    if n == 0:
      return
    b_mean = batch.mean(axis=0)
    b_m2 = ((batch - b_mean) ** 2).sum(axis=0)
    total = self.count + n
    delta = b_mean - self.mean
    self.mean = self.mean + delta * (n / total)
    self.m2 = self.m2 + b_m2 + delta ** 2 * (self.count * n / total)
    self.count = total

  def std(self, eps: float = 1e-6) -> np.ndarray:
    """Population standard deviation; constant features get 1 (no blow-up)."""
    if self.count == 0:
      raise ValueError('No training tracks to fit feature statistics on.')
    std = np.sqrt(self.m2 / self.count)
    return np.where(std < eps, 1.0, std)


def normalize(x: np.ndarray, kind: str, mean: np.ndarray,
              std: np.ndarray) -> np.ndarray:
  """transform + standardise with training statistics; (..., dim) float32."""
  return ((transform(np.asarray(x, np.float64), kind) - mean) / std).astype(
      np.float32)
