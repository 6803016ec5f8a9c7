"""The one config validator: every field that cannot work fails here, before
any data is read or any program compiled, with one line naming the field.

Each registry checks the fields that choose from it, through a public
`check_config` beside the registry, so a new text encoder, loss or index
is valid as soon as it is registered and this module reads no layer's
internals: `models.two_branch.check_config` (encoders, pooling),
`train.losses.check_config` (loss kind, negatives),
`serve.search_index.check_config` (export index),
`data.descriptors.check_config` (transform, descriptor list). The modes
and the benchmark kinds sit above this module and check their own fields
(`modes.run_mode`, `experiments.benchmark.check_config`).

  validate_common(config)     every named choice and every number's range
                              (all modes, `modes.run_mode`)
  validate_data(config.data)  preprocessing fields (before minutes of work)
  validate(config, devices)   training: the above plus batch arithmetic
"""

import math
from typing import Any, Callable

import ml_collections

from mardjax import plan as plan_lib
from mardjax.data import descriptors as desc_lib
from mardjax.errors import need
from mardjax.evaluation import word_evidence
from mardjax.models import two_branch
from mardjax.serve import search_index
from mardjax.train import losses
from mardjax.train import prototype_init

PARALLELISM = plan_lib.PARALLELISMS
EMBEDDING_UPDATES = plan_lib.EMBEDDING_UPDATES
EVAL_SPLITS = ('dev', 'test')
BATCH_ASSEMBLY = plan_lib.BATCH_ASSEMBLIES
LR_SCALING = ('none', 'linear', 'sqrt')
LR_SCHEDULES = ('constant', 'cosine')


def _choice(config: ml_collections.ConfigDict, field: str, choices) -> None:
  section, name = field.split('.')
  value = config[section][name]
  need(value in choices, field, value, f'choose from {tuple(choices)}')


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and (
      math.isfinite(x))


def _positive(x) -> bool:
  return _finite(x) and x > 0


def _at_least(low) -> Callable[[Any], bool]:
  return lambda x: _finite(x) and x >= low


def _fraction(top_included: bool) -> Callable[[Any], bool]:
  """0 <= x <= 1, or 0 <= x < 1."""
  return lambda x: _finite(x) and 0 <= x and (x <= 1 if top_included
                                              else x < 1)


# Numeric fields every mode relies on: (field, test, what it must be).
_RANGES = (
    ('model.word_dim', _at_least(1), 'at least 1'),
    ('model.hidden_dim', _at_least(1), 'at least 1'),
    ('model.embed_dim', _at_least(1), 'at least 1'),
    ('model.lstm_dim', _at_least(1), 'at least 1'),
    ('model.max_tracks', _at_least(1), 'at least 1'),
    ('model.dropout', _fraction(False), 'in [0, 1)'),
    ('model.word_dropout', _fraction(False), 'in [0, 1)'),
    ('loss.margin', _at_least(0), 'a finite number >= 0'),
    ('loss.temperature', _positive, 'a finite number > 0'),
    ('loss.sigmoid_bias', _finite, 'a finite number'),
    ('train.batch_size', _at_least(1), 'at least 1'),
    ('train.learning_rate', _positive, 'a finite number > 0'),
    ('train.lr_base_batch', _at_least(1), 'at least 1'),
    ('train.warmup_steps', _at_least(0), 'a whole number >= 0'),
    ('train.lr_final_fraction', _fraction(True), 'a number in [0, 1]'),
    ('train.early_stop_patience', _at_least(0),
     'a whole number >= 0 (0: never stop early)'),
    ('train.num_steps', _at_least(0), 'a whole number >= 0'),
    ('train.num_epochs', _at_least(0), 'a finite number >= 0'),
    ('train.log_every', _at_least(1), 'at least 1 (steps)'),
    ('train.checkpoint_every', _at_least(1), 'at least 1 (steps)'),
    ('train.eval_every', _at_least(1), 'at least 1 (steps)'),
    ('train.keep_checkpoints', _at_least(1),
     'at least 1 (a run keeps a checkpoint to resume from)'),
    ('train.vocab_bucket', _at_least(1), 'at least 1'),
    ('train.lstm_pack_rows', _at_least(0), 'at least 0'),
    ('train.token_bucket', _at_least(0), 'at least 0'),
    ('train.prefetch_batches', _at_least(-1), 'at least -1 (-1: auto)'),
    ('train.steps_per_dispatch', _at_least(0), 'at least 0 (0: auto)'),
    ('train.optimizer_shard_min_size', _at_least(1), 'at least 1'),
    ('eval.bootstrap', _at_least(0), 'at least 0'),
    ('eval.train_sample', _at_least(0), 'at least 0 (0: off)'),
    ('eval.validation_fraction', _fraction(False),
     'a number in [0, 1) (0: select on the dev split)'),
    ('export.hnsw_m', _at_least(2), 'at least 2'),
    ('export.hnsw_ef_construction', _at_least(1), 'at least 1'),
    ('export.hnsw_ef_search', _at_least(1), 'at least 1'),
    ('embed.max_document_mb', _at_least(0),
     'a size in MB, >= 0 (0: no cap)'),
    ('serve.max_upload_mb', _positive, 'a finite number of MB > 0'),
    ('serve.max_query_kb', _positive, 'a finite number of KB > 0'),
    ('serve.analysis_workers', _at_least(0), 'at least 0 (0: one per core)'),
    ('serve.analyses_per_worker', _at_least(1), 'at least 1'),
    ('serve.max_audio_seconds', _at_least(1), 'at least 1 (seconds)'),
    ('serve.analysis_timeout_s', _at_least(1), 'at least 1 (seconds)'),
    ('serve.max_waiting', _at_least(0), 'at least 0'),
    ('serve.worker_memory_mb', lambda v: v == 0 or _at_least(512)(v),
     '0 (no limit) or at least 512'),
)


# Sizes no machine can hold or no server should accept: refused at once
# rather than after minutes of loading, or in an allocation deep in XLA.
_CEILINGS = (
    ('model.word_dim', 2**16),
    ('model.hidden_dim', 2**16),
    ('model.embed_dim', 2**16),
    ('model.lstm_dim', 2**16),
    ('model.max_tracks', 2**16),
    ('data.vocab_size', 2**26),
    ('data.max_len', 2**20),
    ('train.batch_size', 2**24),
    ('eval.bootstrap', 10**6),
    ('serve.max_upload_mb', 4096),
    ('serve.max_query_kb', 2**20),
    ('serve.analysis_workers', 1024),
)
# Parameters plus two optimizer moments of the word embedding, in bytes.
_MAX_EMBEDDING_BYTES = 2**40


def validate_values(config: ml_collections.ConfigDict) -> None:
  """Numbers that are non-finite or out of range, one line each."""
  for field, ok, what in _RANGES:
    section, name = field.split('.')
    value = config[section][name]
    need(ok(value), field, value, f'must be {what}')
  for field, ceiling in _CEILINGS:
    section, name = field.split('.')
    value = config[section][name]
    need(value <= ceiling, field, value, f'must be at most {ceiling:,}')
  table = 3 * 4 * config.data.vocab_size * config.model.word_dim
  need(table <= _MAX_EMBEDDING_BYTES, 'data.vocab_size',
       config.data.vocab_size,
       f'with model.word_dim={config.model.word_dim} the word embedding and '
       f'its optimizer state need {table / 2**30:,.0f} GiB (at most '
       f'{_MAX_EMBEDDING_BYTES // 2**30:,} GiB)')
  weights = tuple(config.loss.weights)
  need(len(weights) == 4 and all(_at_least(0)(w) for w in weights) and
       any(weights), 'loss.weights', weights,
       'needs four finite weights (l1..l4) >= 0, not all zero')


def validate_common(config: ml_collections.ConfigDict) -> None:
  """Every field that names one of several implementations, and every
  number (`validate_values`)."""
  two_branch.check_config(config.model)
  _choice(config, 'model.lstm_loop', plan_lib.LSTM_LOOPS)
  losses.check_config(config.loss)
  _choice(config, 'train.parallelism', PARALLELISM)
  _choice(config, 'train.embedding_update', EMBEDDING_UPDATES)
  _choice(config, 'train.batch_assembly', BATCH_ASSEMBLY)
  _choice(config, 'train.optimizer_sharding', plan_lib.OPTIMIZER_SHARDINGS)
  _choice(config, 'train.lr_scaling', LR_SCALING)
  _choice(config, 'train.compute_dtype', plan_lib.COMPUTE_DTYPES)
  _choice(config, 'train.lr_schedule', LR_SCHEDULES)
  _choice(config, 'eval.split', EVAL_SPLITS)
  search_index.check_config(config.export)
  desc_lib.check_config(config.data)
  word_evidence.check_config(config)
  prototype_init.check_config(config)
  validate_values(config)


def validate_data(data: ml_collections.ConfigDict) -> None:
  """The preprocessing fields (`config.data`)."""
  def check(ok, name, why):
    need(ok, f'data.{name}', data[name], why)
  check(data.vocab_size >= 1, 'vocab_size', 'must be at least 1')
  check(data.min_word_count >= 1, 'min_word_count', 'must be at least 1')
  check(data.max_len >= 1, 'max_len', 'must be at least 1')
  check(0 <= data.dev_fraction < 1, 'dev_fraction', 'must be in [0, 1)')
  check(0 <= data.test_album_fraction < 1, 'test_album_fraction',
        'must be in [0, 1)')
  check(data.examples_per_shard >= 1, 'examples_per_shard', 'must be >= 1')
  check(data.albums_per_shard >= 1, 'albums_per_shard', 'must be >= 1')
  check(data.num_workers >= 1, 'num_workers', 'must be >= 1')
  check(data.text_encoder_max_tokens >= 2, 'text_encoder_max_tokens',
        'must be at least 2')
  check(_at_least(0)(data.max_document_mb), 'max_document_mb',
        'a size in MB, >= 0 (0: no cap)')
  desc_lib.check_config(data)


def validate(config: ml_collections.ConfigDict, num_devices: int,
             process_count: int = 1) -> None:
  """Everything training needs, for `num_devices` local devices on each of
  `process_count` processes."""
  validate_common(config)
  t, l = config.train, config.loss
  devices = num_devices * process_count
  need(t.batch_size % devices == 0, 'train.batch_size', t.batch_size,
       f'not divisible by the {devices} devices')
  per_device = t.batch_size // devices
  mode = losses.NegativeMode.parse(l.negatives)
  candidates = t.batch_size if l.gather_across_devices else per_device
  need(mode.k <= candidates, 'loss.negatives', l.negatives,
       f'K={mode.k} is larger than the {candidates} rows a device ranks '
       'against')
  if t.neighbourhood_sampling:
    need(t.reviews_per_album >= 2, 'train.reviews_per_album',
         t.reviews_per_album, 'must be >= 2')
    need(per_device % t.reviews_per_album == 0, 'train.batch_size',
         t.batch_size, f'the per-device batch {per_device} is not a '
         f'multiple of reviews_per_album={t.reviews_per_album}')
  need(t.num_steps > 0 or t.num_epochs > 0, 'train.num_steps', t.num_steps,
       'set num_steps or num_epochs')
