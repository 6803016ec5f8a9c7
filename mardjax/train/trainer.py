"""The training loop: data, state, steps, checkpoints, metrics, evaluation.

`train_and_evaluate(config, workdir, data_dir, make_evaluator)` trains the
configured model on the preprocessed TFRecords in `data_dir`, resuming from
the newest readable checkpoint in `workdir/checkpoints`, checks dev recall@K
every `config.train.eval_every` steps with the evaluator it is handed (the
best-by-recall checkpoint is kept apart in `workdir/best`), and returns the
final state and metrics.

The evaluator comes from the layer above (`mardjax.evaluation.evaluate.
dev_evaluator`, wired by `mardjax.modes.train_and_evaluate`): training never
imports evaluation. Only this Python loop holds the iterator, the writers and
the checkpoint managers; the step itself is pure (`mardjax.train.train_step`).
"""

import collections
import contextlib
import dataclasses
import gc
import json
import math
import os
import time
from typing import Any, Callable, Iterator, NamedTuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from mardjax import progress
from mardjax.data import input_pipeline
from mardjax.data import manifest as manifest_lib
from mardjax.data import prefetch
from mardjax.data import tables
from mardjax.errors import UserError
from mardjax.models import two_branch
from mardjax.train import checkpoints
from mardjax.train import index_batches
from mardjax.train import losses
from mardjax.train import sparse_embedding
from mardjax.train import train_step


class TrainingData(NamedTuple):
  """What the loop trains on: the manifest and this process's tables."""
  manifest: manifest_lib.Manifest
  audio: tables.AudioTable
  reviews: tables.ReviewTable


def load_training_data(config: ml_collections.ConfigDict, data_dir: str
                       ) -> TrainingData:
  """The records of `data_dir`, read once through tf.data into tables."""
  manifest = manifest_lib.load(data_dir)
  return TrainingData(manifest, input_pipeline.load_audio_table(manifest),
                      input_pipeline.load_review_table(
                          manifest, config.data.max_len,
                          process_index=jax.process_index(),
                          process_count=jax.process_count()))


# variables -> metrics with 'recall@1', 'recall@5', 'recall@10'.
Evaluator = Callable[[dict[str, Any]], dict[str, Any]]
# (config, model, manifest, audio table) -> Evaluator; called once per run.
EvaluatorFactory = Callable[[ml_collections.ConfigDict, two_branch.TwoBranch,
                             manifest_lib.Manifest, tables.AudioTable],
                            Evaluator]


def total_steps(config: ml_collections.ConfigDict,
                manifest: manifest_lib.Manifest) -> int:
  t = config.train
  if t.num_steps > 0:
    return int(t.num_steps)
  per_epoch = max(1, manifest.counts.reviews['train'] // t.batch_size)
  return int(math.ceil(t.num_epochs * per_epoch))


@dataclasses.dataclass
class _Run:
  """Everything one training run holds between its stages."""
  config: ml_collections.ConfigDict
  workdir: str
  manifest: manifest_lib.Manifest
  model: two_branch.TwoBranch
  state: Any
  batches: Callable[[int, int], Iterator]  # Batches, or their indices.
  # (state, batches' items, first step, train_step.StepKeys) ->
  # (state, metrics).
  step_fn: Callable
  evaluator: Evaluator
  ckpt: checkpoints.Checkpoints
  best: checkpoints.Checkpoints
  writer: Any
  steps: int
  start_step: int = 0
  position: tuple[int, int] = (0, 0)
  best_recall: float = -1.0
  best_eval: dict[str, Any] | None = None  # The best evaluation, whole.
  stopped_early: bool = False
  history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  last_eval: dict[str, Any] | None = None
  steps_per_dispatch: int = 1
  batch_assembly: str = 'host'
  # steps/s of each log window after the first (which holds compilation).
  window_rates: list[float] = dataclasses.field(default_factory=list)
  # Wall seconds by part of the run ('eval', 'checkpoint', 'compile', 'loop').
  seconds: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)
  # Programs compiled in the loop (the step's, mostly).
  compiles: int = 0

  def meta(self, step: int) -> dict[str, Any]:
    return {'step': step, 'position': list(self.position),
            'manifest_hash': self.manifest.sha256,
            'config': self.config.to_json_best_effort(sort_keys=True),
            'best_recall': self.best_recall, 'best_eval': self.best_eval,
            'stopped_early': self.stopped_early, 'history': self.history}

  def evals_since_best(self) -> int:
    """Evaluations after the best one (the best is the first to reach the
    best recall, as `_evaluate` keeps it)."""
    recalls = [h['recall@10'] for h in self.history]
    return len(recalls) - 1 - recalls.index(max(recalls)) if recalls else 0


def batch_assembly(config: ml_collections.ConfigDict, parallel: bool,
                   data: TrainingData) -> str:
  """'device' or 'host': where each step's batch is assembled.

  On the device (`train_step.index_step`) the tables are copied to the
  device once (one copy per device under pmap, replicated on a shard_map
  mesh) and the host sends per step the row indices and what it decides
  from them in the prefetch thread (`index_batches`: for the packed LSTM
  where each review goes, from lengths alone; for the lazy update the
  batch's word list); this serves the mean and the LSTM encoders with
  either embedding update, on one device or several, and under pmap across
  processes too (each process's devices hold its own albums); also the
  album LSTM's audio and a pretrained encoder's features. 'auto' picks it,
  but for the lazy update on CPUs (measured slower there). The host path
  serves everything, also shard_map across processes (a replicated table
  would have to be the same in every process).
  """
  wanted = config.train.batch_assembly
  reasons = [why for bad, why in (
      (parallel and config.train.parallelism == 'shard_map'
       and jax.process_count() > 1, 'shard_map across processes'),)
             if bad]
  if wanted == 'device' and reasons:
    raise UserError("config.train.batch_assembly='device' does not serve "
                    f'{", ".join(reasons)} yet: use \'host\' or \'auto\'.')
  if wanted == 'host' or reasons:
    return 'host'
  if (wanted == 'auto' and jax.default_backend() == 'cpu'
      and train_step.embedding_update(config) == 'lazy'):
    # Measured (train_loop benchmark, 2-core CPU, batch 128, 2,000 steps,
    # two pairs of runs, in either order): log windows ran at 7,037 and
    # 7,781 examples/s with host assembly, 6,245 and 7,521 with device
    # assembly. On a CPU the device is the same two cores, so
    # the token gather and word lookup moved into the step lengthen it
    # (the likely cause: the step alone ran as fast either way; the loop
    # was not profiled).
    return 'host'
  return 'device'


# The most steps per dispatch that 'auto' gives an accelerator.
AUTO_STEPS_PER_DISPATCH = 32
# Batches a prefetch thread builds ahead on accelerators under 'auto'.
AUTO_PREFETCH_BATCHES = 2


def prefetch_batches(config: ml_collections.ConfigDict) -> int:
  """Batches built ahead in a thread: `train.prefetch_batches`, or with -1
  (auto) none on CPUs and `AUTO_PREFETCH_BATCHES` on accelerators.

  On a CPU the step already runs asynchronously on the same cores while
  the loop's thread builds the next batch, and a second Python thread only
  adds contention: measured on a 2-core CPU (paper sizes, batch 128, 1,000
  steps of the train_loop tables, three rounds), log windows ran at
  11,900-12,350 examples/s without the thread and 10,900-11,650 with it.
  """
  n = config.train.prefetch_batches
  if n >= 0:
    return int(n)
  return 0 if jax.default_backend() == 'cpu' else AUTO_PREFETCH_BATCHES


def steps_per_dispatch(config: ml_collections.ConfigDict, assembly: str
                       ) -> int:
  """Steps in one dispatch: `train.steps_per_dispatch`, or with 0 (auto)
  1 on CPUs, where a step is long enough that Python's dispatch does not
  show, and on accelerators the largest number up to
  `AUTO_STEPS_PER_DISPATCH` that divides the log, checkpoint and
  evaluation intervals (25 for the defaults' 50 / 1,000 / 1,000): a
  dispatch that would run past one of them falls back to single steps,
  one more program to compile for each layout size (16 steps per
  dispatch left 2 single steps in every 50). Several steps need batches
  assembled on the device."""
  n = config.train.steps_per_dispatch
  if assembly != 'device':
    if n > 1:
      raise UserError(f'config.train.steps_per_dispatch={n} needs batches '
                      "assembled on the device (train.batch_assembly; "
                      'see batch_assembly for when they can be).')
    return 1
  if n:
    return int(n)
  if jax.default_backend() == 'cpu':
    return 1
  t = config.train
  every = math.gcd(t.log_every, t.checkpoint_every, t.eval_every)
  return max(d for d in range(1, AUTO_STEPS_PER_DISPATCH + 1)
             if every % d == 0)


def positive_widths(config: ml_collections.ConfigDict, data: TrainingData,
                    parallel: bool) -> train_step.ProgramSizes:
  """The run's widths of the positive lists (`losses.positive_lists`),
  starting wider than the most rows one album holds in any batch of the
  first epoch (agreed between processes): one program for nearly every
  batch, where each batch's own width (4, 8 or 16 at batch 1,024 of the
  MARD-shaped benchmark tables) would compile the step up to three times.
  Wider by at least one row: at batch 128 of those tables the first
  epoch's most was 4, and a batch of 6 in each later epoch (one in 1,631)
  compiled the step twice more within 5,000 steps at a width of 4; lists
  of 8 cost the CPU step nothing measurable there.
  """
  widths = train_step.ProgramSizes()
  if train_step.positive_options(config, parallel):
    t = config.train
    first_epoch = input_pipeline.epoch_order(
        data.reviews, data.audio,
        batch_size=t.batch_size // jax.process_count(), seed=config.seed,
        epoch=0, neighbourhood=t.neighbourhood_sampling,
        reviews_per_album=(t.reviews_per_album if t.neighbourhood_sampling
                           else 1))
    most = input_pipeline.most_album_rows(data.reviews, first_epoch)
    widths({'positives': train_step.program_width(
        losses.positive_width(most + 1),
        train_step.ProcessSync() if jax.process_count() > 1 else None)})
  return widths


def _step(config: ml_collections.ConfigDict, state, parallel: bool,
          assembly: str, data: TrainingData,
          planner: index_batches.Planner | None,
          widths: train_step.ProgramSizes | None = None):
  """(state, fn(state, items, step0, keys) -> (state, metrics)) for the
  configured parallelism (one device, pmap, or jit(shard_map) over a mesh)
  and batch assembly: `items` are the iterator's batches (or indices) for
  steps step0, step0 + 1, ...; one on the host path. Device assembly takes
  `planner` (`make_planner`); the host path the run's `positive_widths`."""
  t = config.train
  if assembly == 'device':
    return index_step_fn(config, state, parallel, data, planner)
  sync = train_step.ProcessSync() if jax.process_count() > 1 else None
  options = train_step.batch_options(config)
  positives = train_step.positive_options(config, parallel)
  sizes = train_step.ProgramSizes(sync)

  def prepare(s, batch):
    return train_step.prepare_batch(s, batch, t.vocab_bucket, sync=sync,
                                    sizes=sizes, positives=positives,
                                    widths=widths, **options)
  if t.parallelism == 'pmap' or not parallel:
    if parallel:
      fn = train_step.pmap_step(config.loss)

      def place(b):
        return b
    else:
      fn = train_step.single_device_step(config.loss)

      def place(b):
        return {k: v[0] for k, v in b.items()}
  else:
    mesh = train_step.make_mesh()
    # A restored state lives on one device; replicate it over the mesh.
    state = jax.device_put(state, NamedSharding(mesh, P()))
    fn = train_step.shard_map_step(config.loss, mesh)

    def place(b):
      return train_step.shard_batch(b, mesh)
  return state, lambda s, items, step0, keys: fn(
      s, place(prepare(s, items[0])), keys(step0))


def make_planner(config: ml_collections.ConfigDict, state,
                 data: TrainingData, parallel: bool = False,
                 widths: train_step.ProgramSizes | None = None
                 ) -> index_batches.Planner:
  """What the host decides for this run's device-assembled steps
  (`widths`: the run's `positive_widths`; None: each dispatch's own)."""
  lazy = train_step.lazy_embedding(config, state.params)
  return index_batches.Planner(
      config, data.reviews,
      sparse_embedding.split_table(state.params)[0].shape[0] if lazy else 0,
      train_step.ProcessSync() if jax.process_count() > 1 else None,
      train_step.positive_options(config, parallel), widths)


def index_step_fn(config: ml_collections.ConfigDict, state, parallel: bool,
                  data: TrainingData, planner: index_batches.Planner):
  """`_step` for batches assembled on the device: the tables copied there
  once, the step fed each batch's row and track indices and what
  `planner` decides from them (its items come from `planner.with_plans`).
  """
  max_len = config.data.max_len
  tables_ = train_step.device_tables(data.reviews, data.audio, max_len)
  pmap = parallel and config.train.parallelism == 'pmap'
  if pmap:
    tables_ = train_step.replicate_tables(tables_)
    one = train_step.index_pmap_step(config.loss, max_len)
    many = train_step.index_pmap_steps(config.loss, max_len)
  else:
    mesh = train_step.make_mesh() if parallel else None
    if mesh:  # A restored state lives on one device; replicate it.
      state = jax.device_put(state, NamedSharding(mesh, P()))
      tables_ = jax.device_put(tables_, NamedSharding(mesh, P()))
    one = train_step.index_step(config.loss, max_len, mesh)
    many = train_step.index_steps(config.loss, max_len, mesh)

  def device_fn(s, items, step0, keys):
    idx, sizes = planner(items, pmap)
    if len(items) == 1:
      return one(s, tables_, idx, keys(step0), sizes)
    return many(s, tables_, idx, keys.base_key, np.int32(step0), sizes)
  return state, device_fn


def _setup(config: ml_collections.ConfigDict, workdir: str,
           data: TrainingData, make_evaluator: EvaluatorFactory) -> _Run:
  """Builds the model and state from the data, restores, compiles."""
  manifest, audio, reviews = data
  num_devices = jax.local_device_count()
  process_count = jax.process_count()
  t = config.train
  parallel = num_devices * process_count > 1
  model = two_branch.from_manifest(
      config, manifest, bn_axis_name=train_step.AXIS if parallel else None,
      dtype=train_step.compute_dtype(config))

  assembly = batch_assembly(config, parallel, data)
  order = dict(batch_size=t.batch_size // process_count,
               num_devices=num_devices, seed=config.seed,
               neighbourhood=t.neighbourhood_sampling,
               reviews_per_album=t.reviews_per_album)

  def batches(epoch, batch):
    return input_pipeline.train_batches(
        reviews, audio, max_len=config.data.max_len, start_epoch=epoch,
        start_batch=batch, album_tracks=two_branch.album_tracks(config),
        **order)

  def indices(epoch, batch):
    return planner.with_plans(input_pipeline.train_indices(
        reviews, audio, start_epoch=epoch, start_batch=batch, **order))

  try:
    (_, first) = next(batches(0, 0))
  except ValueError as e:
    raise UserError(str(e)) from None
  state = train_step.create_state(model, config,
                                  jax.random.PRNGKey(config.seed),
                                  {k: v[0] for k, v in first.items()},
                                  num_steps=total_steps(config, manifest))
  if config.model.pooling == 'idf':
    state = train_step.set_word_scores(state, _idf(reviews, manifest))
  widths = positive_widths(config, data, parallel)
  planner = (make_planner(config, state, data, parallel, widths)
             if assembly == 'device' else None)
  run = _Run(
      config=config, workdir=workdir, manifest=manifest, model=model,
      state=state, batches=indices if assembly == 'device' else batches,
      step_fn=None,
      # Evaluated in float32 whatever the training dtype, so that dev
      # figures compare across runs.
      evaluator=make_evaluator(config, model.clone(dtype=jnp.float32),
                               manifest, audio),
      ckpt=checkpoints.Checkpoints(
          os.path.join(workdir, checkpoints.CHECKPOINT_DIR),
          t.keep_checkpoints),
      # In the background on one process; across processes two managers'
      # saves in flight at once (best and rolling, at the same step) hang
      # in orbax's barriers, so there the best copy is written at once.
      best=checkpoints.Checkpoints(
          os.path.join(workdir, checkpoints.BEST_DIR), 1,
          async_save=jax.process_count() == 1),
      writer=progress.metric_writer(workdir,
                                    just_logging=jax.process_index() > 0),
      steps=total_steps(config, manifest))
  _restore(run)
  run.state, run.step_fn = _step(config, run.state, parallel, assembly, data,
                                 planner, widths)
  run.steps_per_dispatch = steps_per_dispatch(config, assembly)
  run.batch_assembly = assembly
  logging.info('Batches assembled on the %s, %d step(s) per dispatch.',
               assembly, run.steps_per_dispatch)
  return run


def _idf(reviews: tables.ReviewTable, manifest: manifest_lib.Manifest
         ) -> np.ndarray:
  """Word scores from the document frequencies of the training reviews of
  every process (each holds a share), so that all start alike."""
  df = reviews.document_frequency(manifest.vocab.size)
  n = np.int64(len(reviews))
  if jax.process_count() > 1:
    df = np.asarray(multihost_utils.process_allgather(df)).sum(0)
    n = np.asarray(multihost_utils.process_allgather(n)).sum()
  return two_branch.idf_scores(df, int(n))


def _restore(run: _Run) -> None:
  """Continues from the newest readable checkpoint, when there is one."""
  restored = run.ckpt.restore_latest(
      run.state, check_meta=lambda m: checkpoints.check_same_data(
          m, run.manifest.sha256, run.workdir))
  if restored is None:
    return
  run.start_step, run.state, meta = restored
  run.position = tuple(meta['position'])
  run.best_recall = meta.get('best_recall', -1.0)
  run.best_eval = meta.get('best_eval')
  run.stopped_early = meta.get('stopped_early', False)
  # Evaluations up to the restored step (checkpoints before the field: none).
  run.history = [h for h in meta.get('history', [])
                 if h['step'] <= run.start_step]
  logging.info('Resumed from step %d at input position %s.', run.start_step,
               run.position)


def _evaluate(run: _Run, step: int) -> dict[str, Any]:
  """Dev metrics of the current state, logged; keeps the best-by-recall
  checkpoint."""
  start = time.perf_counter()
  result = run.evaluator(checkpoints.inference_variables(run.state))
  run.seconds['eval'] += time.perf_counter() - start
  run.writer.write_scalars(step, {f'dev/{k}': v for k, v in result.items()})
  run.history.append({'step': step, **{k: result[k] for k in (
      'recall@1', 'recall@5', 'recall@10', 'train_recall@10')
                                        if k in result}})
  logging.info('step %d dev %s', step, json.dumps(result))
  if result['recall@10'] > run.best_recall:
    run.best_recall = result['recall@10']
    run.best_eval = {'step': step, **result}
    start = time.perf_counter()
    # The model's variables only (what eval, export and serve read; no run
    # resumes from here): a third of the state's bytes, written in the
    # background like the rolling checkpoints on one process (a synchronous
    # save of the whole state took 0.8 s at paper sizes on a 2-core CPU,
    # async 0.1 s).
    run.best.save(step, checkpoints.inference_variables(run.state),
                  run.meta(step))
    run.seconds['checkpoint'] += time.perf_counter() - start
  return result


def _check_finite(run: _Run, step: int, m: dict[str, Any]) -> None:
  """Stops the run when step `step` left a non-finite loss, gradient or
  parameter, naming the last good checkpoint; nothing non-finite is ever
  saved or promoted, since saves and evaluations come after this check."""
  # Only the flag crosses to the host every step; the rest when it fails.
  if float(m['finite']) >= 1:
    return
  m = jax.device_get(m)
  run.ckpt.wait()
  latest = run.ckpt.manager.latest_step()
  raise UserError(
      f'The loss became {float(m["loss"])} at step {step} (gradient norm '
      f'{float(m["grad_norm"])}; the state is no longer finite). The last '
      'good checkpoint'
      + (f' is step {latest} in '
         f'{os.path.join(run.workdir, checkpoints.CHECKPOINT_DIR)}'
         if latest is not None else ' does not exist (none saved yet)')
      + '; lower config.train.learning_rate or check the data.')


def _log(run: _Run, step: int, m: dict[str, Any], rate: float) -> None:
  """Train metrics to the writers, and a progress line with the ETA."""
  run.writer.write_scalars(step, {f'train/{k}': float(v) for k, v in
                                  m.items()} | {'steps_per_sec': rate})
  logging.info('step %d/%d loss %.4f  %.1f steps/s  %.0f examples/s  '
               'ETA %.0fs', step, run.steps, float(m['loss']), rate,
               rate * run.config.train.batch_size,
               (run.steps - step) / max(rate, 1e-9))


class _Window:
  """The loop's log windows: each ends at a log boundary with its rate and
  the metrics of the dispatch there. Where nothing else needs the device
  (no save or evaluation), those metrics are fetched after the next
  dispatch is queued (`flush`), so the device need not wait while the
  host fetches, logs and plans (fetched at once, the windows ran at 0.87
  of the step alone at batch 1,024 on an H200; not measured there
  since). Rates are taken at each boundary's dispatch."""

  def __init__(self, run: _Run):
    self.run = run
    self.time, self.step = time.time(), run.start_step
    self.pending: tuple[int, Any, float] | None = None

  def end(self, step: int, m: dict[str, Any], now: bool) -> None:
    """Ends a window at `step` (m: its dispatch's metrics); logged now, or
    one dispatch late."""
    self.pending = (step, m, time.time())
    if now:
      self.flush()

  def flush(self) -> None:
    if self.pending is None:
      return
    step, m, at = self.pending
    self.pending = None
    rate = (step - self.step) / max(at - self.time, 1e-9)
    _log(self.run, step, jax.device_get(m), rate)
    if self.step > self.run.start_step:
      self.run.window_rates.append(rate)
    self.time, self.step = at, step


def _dispatch_size(run: _Run, step: int) -> int:
  """Steps in the next dispatch: `run.steps_per_dispatch`, or 1 when a log,
  checkpoint, evaluation or the end falls sooner (two compiled sizes)."""
  n = run.steps_per_dispatch
  if n == 1:
    return 1
  t = run.config.train
  boundary = min([run.steps] + [(step // every + 1) * every for every in (
      t.log_every, t.checkpoint_every, t.eval_every)])
  return n if boundary - step >= n else 1


# jax's monitoring events of a compilation's three stages (trace, lowering,
# XLA), in `jax._src.dispatch`; 'backend' counts the programs compiled.
_COMPILE_EVENTS = {'/jax/core/compile/jaxpr_trace_duration': 'trace',
                   '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lower',
                   '/jax/core/compile/backend_compile_duration': 'backend'}


@contextlib.contextmanager
def _compile_time(run: _Run) -> Iterator[None]:
  """Adds the seconds jax spends compiling meanwhile to
  run.seconds['compile'] and the programs it compiles to run.compiles: a
  cost a long run pays once per program, apart from the steps' rate."""
  def listen(event: str, duration: float, **_):
    stage = _COMPILE_EVENTS.get(event)
    if stage:
      run.seconds['compile'] += duration
      run.compiles += stage == 'backend'
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
  """Keeps what is alive when the loop starts out of the garbage
  collector's full passes until it ends.

  The model, the tables and jax's caches (about 515,000 objects at MARD's
  shape) live through the whole run, yet each full collection walked them
  all: 0.35 s, once every ~3,000 steps at batch 128 on a 2-core CPU.
  Frozen (`gc.freeze`), a full pass walks only what the loop made and
  ran in milliseconds. Setup's garbage is collected first (0.26 s once),
  so that none of it is kept for the run; `gc.unfreeze` at the end hands
  everything back to the collector (a process may train again, as
  --mode=ablate does).
  """
  gc.collect()
  gc.freeze()
  try:
    yield
  finally:
    gc.unfreeze()


def _loop(run: _Run) -> None:
  """Steps from the restored position to `run.steps`, with logging,
  checkpoints and periodic evaluation."""
  # Built in a thread, prefetch_batches ahead, while the step computes.
  it = prefetch.prefetch(run.batches(*run.position),
                         prefetch_batches(run.config))
  try:
    with _frozen_heap(), _compile_time(run):
      _steps(run, it)
  finally:
    it.close()


def _steps(run: _Run, it: Iterator) -> None:
  """The body of `_loop`: dispatches from the restored step on, their
  batches (or indices) from `it`."""
  t = run.config.train
  keys = train_step.StepKeys(jax.random.PRNGKey(run.config.seed + 1))
  window = _Window(run)
  step = run.start_step
  previous = None  # The last dispatch's (step, metrics), checked one late.
  while step < run.steps:
    n = _dispatch_size(run, step)
    items = [next(it) for _ in range(n)]
    run.state, m = run.step_fn(run.state, [b for _, b in items], step,
                               keys)
    # Checked and logged while this dispatch runs, so the device never
    # waits for the host.
    if previous is not None:
      _check_finite(run, *previous)
    window.flush()
    step += n
    previous = (step, m)
    epoch, batch_no = items[-1][0]
    run.position = (epoch, batch_no + 1)
    log_now = step % t.log_every == 0 or step == run.steps
    save_now = step % t.checkpoint_every == 0 or step == run.steps
    eval_now = step % t.eval_every == 0 or step == run.steps
    if save_now or eval_now:
      m = jax.device_get(m)
      _check_finite(run, step, m)
      previous = None  # Checked now, before the save or evaluation.
    if log_now:
      window.end(step, m, now=save_now or eval_now)
    if eval_now:  # Before the save, whose record then holds its result.
      run.last_eval = _evaluate(run, step)
      patience = t.early_stop_patience
      run.stopped_early = bool(patience) and step < run.steps and (
          run.evals_since_best() >= patience)
    if save_now or run.stopped_early:
      start = time.perf_counter()
      run.ckpt.save(step, run.state, run.meta(step))
      run.seconds['checkpoint'] += time.perf_counter() - start
    if run.stopped_early:
      logging.info('Stopping early at step %d: dev recall@10 has not '
                   'improved for %d evaluations (best %.4f at step %d).',
                   step, run.evals_since_best(), run.best_recall,
                   run.best_eval['step'])
      run.steps = step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       data: str | TrainingData,
                       make_evaluator: EvaluatorFactory
                       ) -> tuple[Any, dict[str, Any]]:
  """Trains, checkpoints and evaluates; returns (final state, final metrics).

  Args:
    config: a validated config (`mardjax.config_check.validate`).
    workdir: checkpoints, best checkpoint and TensorBoard events go here.
    data: the preprocessed records' directory, or tables already in memory
      (the train-loop benchmark's, which needs no TensorFlow).
    make_evaluator: builds the dev evaluator once per run.

  Returns:
    (state, metrics): the dev metrics of the run's model, the best
    evaluation's (kept in `best/`, which eval, export and serve read), with
    'model_step' (the step it is from), 'last' (the last evaluation's step
    and recall@K), 'stopped_early', 'steps' (the last step trained),
    'resumed_from', 'best_dev_recall_at_10', 'history', 'params_sha256',
    'seconds' (wall time of the loop; of evaluation and checkpointing in
    the whole run, step 0's included; 'loop_eval' and 'loop_checkpoint':
    theirs within the loop; 'loop_compile': jax compiling within it, with
    'compiles' programs) and 'steady_steps_per_s' (the median rate of
    the log windows after the first, which holds compilation; windows with
    an evaluation or a save count as they are), 'batch_assembly' and
    'steps_per_dispatch' (as `batch_assembly` and `steps_per_dispatch`
    chose them).
  """
  if isinstance(data, str):
    data = load_training_data(config, data)
  run = _setup(config, workdir, data, make_evaluator)
  if run.stopped_early:  # A finished run: report it, train no further.
    run.steps = run.start_step
  if run.start_step == 0:
    run.writer.write_hparams(_flatten(config.to_dict()))
    _evaluate(run, 0)
  before_loop = collections.Counter(run.seconds)
  start = time.perf_counter()
  _loop(run)
  if run.steps > run.start_step:
    last = run.last_eval  # The loop's evaluation of the last step.
  else:  # Already trained: report, save nothing.
    last = run.evaluator(checkpoints.inference_variables(run.state))
  # Checkpoints from before the best evaluation was recorded: the last.
  best = run.best_eval or {'step': run.steps, **last}
  metrics = {k: v for k, v in best.items() if k != 'step'}
  closing = time.perf_counter()
  run.ckpt.close()  # Waits for the last asynchronous save.
  run.best.close()
  run.seconds['checkpoint'] += time.perf_counter() - closing
  run.seconds['loop'] = time.perf_counter() - start
  for part in ('eval', 'checkpoint', 'compile'):  # Their time in the loop.
    run.seconds[f'loop_{part}'] = run.seconds[part] - before_loop[part]
  run.writer.flush()
  metrics = dict(metrics, model_step=best['step'],
                 last={'step': run.steps, **{k: last[k] for k in (
                     'recall@1', 'recall@5', 'recall@10')}},
                 stopped_early=run.stopped_early,
                 steps=run.steps, resumed_from=run.start_step,
                 best_dev_recall_at_10=run.best_recall, history=run.history,
                 params_sha256=checkpoints.params_fingerprint(
                     run.state.params),
                 seconds={k: round(v, 3) for k, v in run.seconds.items()},
                 batch_assembly=run.batch_assembly, compiles=run.compiles,
                 steps_per_dispatch=run.steps_per_dispatch,
                 steady_steps_per_s=round(float(np.median(run.window_rates)),
                                          2) if run.window_rates else None)
  return run.state, metrics


def _flatten(d: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v if isinstance(v, (int, float, str, bool)) else (
          str(v))
  return out
