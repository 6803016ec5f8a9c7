"""The execution plan: how a run executes, resolved once from the config.

Several config fields leave a choice to the machine: `train.embedding_update`,
`train.batch_assembly` and `model.lstm_loop` ('auto'),
`train.steps_per_dispatch` (0) and `train.prefetch_batches` (-1). `resolve`
turns them, with the backend and the device and process counts, into one
frozen `Plan`; every other module reads the plan and none resolves a choice
again. The per-backend defaults live in `BACKEND_DEFAULTS`, this module
only. A run logs its plan first, and writes it into its JSON result and its
checkpoints' metadata.

This module sits beside `errors` under every layer: the model, the trainer,
the benchmarks and the server all read the same plan.
"""

import dataclasses
import math
from typing import Any

import ml_collections

from mardjax.errors import UserError

AUTO = 'auto'
# The values each plan field may take in the config ('auto' included).
EMBEDDING_UPDATES = (AUTO, 'lazy', 'dense')
BATCH_ASSEMBLIES = (AUTO, 'host', 'device')
LSTM_LOOPS = (AUTO, 'per_direction', 'bidirectional')
PARALLELISMS = ('pmap', 'shard_map')
COMPUTE_DTYPES = ('float32', 'bfloat16')
OPTIMIZER_SHARDINGS = (AUTO, 'replicated', 'sharded')
# The text encoder's batch layouts (`Plan.text_layout`).
TEXT_LAYOUTS = ('padded', 'flat', 'split_bag', 'packed', 'features')

# What an 'auto' field becomes, per kind of backend. On a CPU the device is
# the host's own cores: a pass over the whole embedding table dominates a
# step, so the lazy update (only the batch's rows) wins; a prefetch thread
# or device-side assembly only competes with the step for the same cores,
# and one step is long enough that Python's dispatch does not show. On an
# accelerator the dense update is one fused pass at memory speed, latency
# per launched program decides at small batches (several steps per
# dispatch, both LSTM directions in one loop), and the host builds batches
# ahead while the device computes. Chosen with the `train` and
# `train_loop` benchmarks (docs/performance.md).
BACKEND_DEFAULTS = {
    'cpu': {'embedding_update': 'lazy',
            # Under the lazy update the host assembles (the token gather
            # moved into the step lengthens it on shared cores); the
            # dense update assembles on the device.
            'batch_assembly': {'lazy': 'host', 'dense': 'device'},
            'max_steps_per_dispatch': 1, 'max_dispatch_examples': 65536,
            'prefetch_batches': 0, 'lstm_loop': 'per_direction'},
    'accelerator': {'embedding_update': 'dense',
                    'batch_assembly': {'lazy': 'device', 'dense': 'device'},
                    'max_steps_per_dispatch': 32, 'prefetch_batches': 2,
                    # Several steps per dispatch amortise the launch of a
                    # program over short steps; at large batches a step
                    # is long enough alone, and fewer steps per dispatch
                    # keep each transfer of indices and the prefetch
                    # queue small and the host's planning ahead short.
                    'max_dispatch_examples': 65536,
                    'lstm_loop': 'bidirectional'},
}


@dataclasses.dataclass(frozen=True)
class Plan:
  """How one run executes; every field is resolved (no 'auto' left).

  Attributes:
    backend: jax's default backend ('cpu', 'gpu', 'tpu', ...).
    devices: local devices (this process's).
    processes: processes of the run.
    parallelism: 'single' (one device), 'pmap' or 'shard_map'.
    embedding_update: 'lazy' (the batch's rows of the word table, lazy
      Adam) or 'dense' (plain Adam on the whole table).
    batch_assembly: 'host' (the host builds each batch and copies it) or
      'device' (the tables live on the device; the host sends indices).
    steps_per_dispatch: training steps in one compiled call (a lax.scan).
    prefetch_batches: dispatches a host thread builds the batches of
      ahead (each `steps_per_dispatch` batches; 0: none).
    lstm_loop: the BiLSTM's directions, 'per_direction' (a loop each) or
      'bidirectional' (both in one loop).
    text_layout: the text batch's layout: 'padded' (b, max_len) tokens,
      'flat' (the mean encoder's real tokens end to end), 'split_bag' (the
      lazy update's bag-of-words product over the batch's first words and
      the rest summed one by one), 'packed' (the LSTM's reviews end to end
      in rows) or 'features' (pretrained text features).
    pack_rows: 'packed': rows rounded up to a multiple of this.
    token_bucket: 'flat': tokens rounded up to a multiple of this.
    compute_dtype: 'float32' or 'bfloat16', of products and activations.
    positives: the ranking loss's positive lists: 'local' (among a
      device's rows), 'across' (among every device's), or '' (none).
    optimizer_sharding: 'sharded' (shard_map: the large optimizer leaves'
      moments split by rows over the devices, `train.sharded_optimizer`)
      or 'replicated'.
  """
  backend: str
  devices: int
  processes: int
  parallelism: str
  embedding_update: str
  batch_assembly: str
  steps_per_dispatch: int
  prefetch_batches: int
  lstm_loop: str
  text_layout: str
  pack_rows: int
  token_bucket: int
  compute_dtype: str
  positives: str
  optimizer_sharding: str = 'replicated'

  @property
  def parallel(self) -> bool:
    """More than one device in the run (pmap or shard_map)."""
    return self.parallelism != 'single'

  @property
  def split_bag(self) -> bool:
    return self.text_layout == 'split_bag'

  def asdict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def describe(self) -> str:
    """One line for the run's log."""
    return ', '.join(f'{k}={v}' for k, v in self.asdict().items())


def backend_defaults(backend: str) -> dict[str, Any]:
  return BACKEND_DEFAULTS['cpu' if backend == 'cpu' else 'accelerator']


def _choice(field: str, value: str, choices: tuple[str, ...]) -> str:
  if value not in choices:
    raise UserError(f'config.{field}={value!r}: choose from {choices}.')
  return value


def lstm_loop(model_config: ml_collections.ConfigDict, backend: str) -> str:
  """`model.lstm_loop` resolved for `backend` (also at inference, where no
  training plan exists)."""
  loop = _choice('model.lstm_loop', model_config.get('lstm_loop', AUTO),
                 LSTM_LOOPS)
  return backend_defaults(backend)['lstm_loop'] if loop == AUTO else loop


def _batch_assembly(config: ml_collections.ConfigDict, update: str,
                    backend: str) -> str:
  wanted = _choice('train.batch_assembly', config.train.batch_assembly,
                   BATCH_ASSEMBLIES)
  if wanted == AUTO:
    return backend_defaults(backend)['batch_assembly'][update]
  return wanted


def _steps_per_dispatch(config: ml_collections.ConfigDict, assembly: str,
                        backend: str, processes: int) -> int:
  """`train.steps_per_dispatch`, or with 0 the largest count up to the
  backend's most that divides the log, checkpoint and evaluation
  intervals (a dispatch that would cross one falls back to single steps,
  one more program) and holds at most the backend's most examples of one
  process. Several steps need batches assembled on the device."""
  t = config.train
  n = int(t.steps_per_dispatch)
  if assembly != 'device':
    if n > 1:
      raise UserError(f'config.train.steps_per_dispatch={n} needs batches '
                      "assembled on the device: set train.batch_assembly="
                      "'device' (or 'auto' where it picks the device).")
    return 1
  if n:
    return n
  every = math.gcd(t.log_every, t.checkpoint_every, t.eval_every)
  defaults = backend_defaults(backend)
  most = min(defaults['max_steps_per_dispatch'],
             max(1, defaults['max_dispatch_examples'] * processes
                 // max(int(t.batch_size), 1)))
  return max(d for d in range(1, most + 1) if every % d == 0)


def _text_layout(config: ml_collections.ConfigDict, update: str
                 ) -> tuple[str, int, int]:
  """(text_layout, pack_rows, token_bucket) for the configured encoder."""
  t, encoder = config.train, config.model.text_encoder
  if encoder == 'lstm':
    rows = int(t.lstm_pack_rows)
    return ('packed' if rows else 'padded'), rows, 0
  if encoder == 'mean':
    # The dense update reads the batch's real tokens end to end; the lazy
    # update keeps its product over the batch's distinct words.
    if update == 'dense' and t.token_bucket:
      return 'flat', 0, int(t.token_bucket)
    if update == 'lazy' and t.split_bag:
      return 'split_bag', 0, 0
    return 'padded', 0, 0
  return 'features', 0, 0


def _optimizer_sharding(config: ml_collections.ConfigDict,
                        parallelism: str) -> str:
  """'sharded' under shard_map ('auto' or asked for; served on one
  process), else 'replicated'. pmap takes the state unreplicated, one copy
  a device, and one device has nothing to share its state with."""
  wanted = _choice('train.optimizer_sharding', config.train.optimizer_sharding,
                   OPTIMIZER_SHARDINGS)
  if wanted == 'replicated' or parallelism == 'single':
    return 'replicated'
  if parallelism == 'shard_map':
    return 'sharded'
  if wanted == AUTO:
    return 'replicated'
  raise UserError(
      "config.train.optimizer_sharding='sharded' needs "
      f"train.parallelism='shard_map' (this run: {parallelism}): use 'auto' "
      "or 'replicated'.")


def _positives(config: ml_collections.ConfigDict, parallel: bool,
               processes: int) -> str:
  """The ranking loss's hinges over each row's positives only, 'across' the
  devices when the loss gathers its candidates from all of them; none for
  other losses, nor where candidates come from several processes (each
  holds only its own rows' albums, and the loss pairs every candidate)."""
  loss = config.loss
  if loss.kind != 'ranking':
    return ''
  if loss.gather_across_devices and parallel:
    return '' if processes > 1 else 'across'
  return 'local'


def resolve(config: ml_collections.ConfigDict, backend: str | None = None,
            devices: int | None = None, processes: int | None = None
            ) -> Plan:
  """The plan of a training run with `config` on this machine.

  Args:
    config: the run's config.
    backend, devices, processes: jax's default backend, local device count
      and process count, unless given (tests plan for other machines).

  Raises:
    UserError: a field outside its choices, or a combination not served.
  """
  if backend is None or devices is None or processes is None:
    import jax  # pylint: disable=g-import-not-at-top
    backend = backend or jax.default_backend()
    devices = devices or jax.local_device_count()
    processes = processes or jax.process_count()
  t = config.train
  parallelism = ('single' if devices * processes == 1 else
                 _choice('train.parallelism', t.parallelism, PARALLELISMS))
  if parallelism == 'shard_map' and processes > 1:
    # The step's mesh holds one process's devices: under shard_map the
    # processes would each train alone, never averaging their gradients.
    raise UserError("config.train.parallelism='shard_map' across processes "
                    "is not served: each process's mesh would hold only its "
                    "own devices and the processes would not average their "
                    "gradients; use 'pmap' (the default).")
  update = _choice('train.embedding_update', t.embedding_update,
                   EMBEDDING_UPDATES)
  if update == AUTO:
    update = backend_defaults(backend)['embedding_update']
  assembly = _batch_assembly(config, update, backend)
  prefetch = int(t.prefetch_batches)
  layout, pack_rows, token_bucket = _text_layout(config, update)
  return Plan(
      backend=backend, devices=devices, processes=processes,
      parallelism=parallelism, embedding_update=update,
      batch_assembly=assembly,
      steps_per_dispatch=_steps_per_dispatch(config, assembly, backend,
                                             processes),
      prefetch_batches=(prefetch if prefetch >= 0 else
                        backend_defaults(backend)['prefetch_batches']),
      lstm_loop=lstm_loop(config.model, backend), text_layout=layout,
      pack_rows=pack_rows, token_bucket=token_bucket,
      compute_dtype=_choice('train.compute_dtype', t.compute_dtype,
                            COMPUTE_DTYPES),
      positives=_positives(config, parallelism != 'single', processes),
      optimizer_sharding=_optimizer_sharding(config, parallelism))
