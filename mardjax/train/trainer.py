"""The training loop: data, state, steps, checkpoints, metrics, evaluation.

`train_and_evaluate(config, workdir, data_dir, make_evaluator)` trains the
configured model on the preprocessed TFRecords in `data_dir`, resuming from
the newest readable checkpoint in `workdir/checkpoints`, checks recall@K
every `config.train.eval_every` steps with the evaluator it is handed, on the
selection split (the training reviews held out by
`config.eval.validation_fraction`, or dev when it is 0; the best-by-recall
checkpoint is kept apart in `workdir/best`), and returns the final state and
the dev metrics of that best model.

The evaluator comes from the layer above (`mardjax.evaluation.evaluate.
dev_evaluator`, wired by `mardjax.stages.train_and_evaluate`): training never
imports evaluation. Only this Python loop holds the iterator, the writers and
the checkpoint managers; the step itself is pure (`mardjax.train.train_step`).
"""

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Iterator, NamedTuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from mardjax import plan as plan_lib
from mardjax import progress
from mardjax.data import input_pipeline
from mardjax.data import manifest as manifest_lib
from mardjax.data import prefetch
from mardjax.data import tables
from mardjax.errors import UserError
from mardjax.models import two_branch
from mardjax.train import checkpoints
from mardjax.train import prototype_init
from mardjax.train import step_builder
from mardjax.train import timing
from mardjax.train import train_step


class TrainingData(NamedTuple):
  """What the loop trains on: the manifest and this process's tables; and
  `validation`, the training reviews held out for model selection (every
  process's, as `input_pipeline.load_reviews` gives a split), or None:
  selection reads the dev split."""
  manifest: manifest_lib.Manifest
  audio: tables.AudioTable
  reviews: tables.ReviewTable
  validation: dict[str, np.ndarray] | None = None


def load_training_data(config: ml_collections.ConfigDict, data_dir: str
                       ) -> TrainingData:
  """The records of `data_dir`, read once through tf.data into tables,
  less the reviews `config.eval.validation_fraction` holds out of training
  (`splits.in_validation`).

  Raises:
    UserError: the fraction holds out no review (too few training reviews
      for it: raise it, or set it to 0 to select on the dev split).
  """
  manifest = manifest_lib.load(data_dir)
  fraction = config.eval.validation_fraction
  reviews, validation = input_pipeline.load_training_reviews(
      manifest, config.data.max_len, fraction, config.data.split_salt,
      process_index=jax.process_index(), process_count=jax.process_count())
  if fraction > 0 and not len(validation['album']):
    raise UserError(
        f'config.eval.validation_fraction={fraction} holds out none of the '
        f'{manifest.counts.reviews["train"]} training reviews for model '
        'selection: raise it, or set it to 0 to select on the dev split.')
  return TrainingData(manifest, input_pipeline.load_audio_table(manifest),
                      reviews, validation if fraction > 0 else None)


# variables -> metrics with 'recall@1', 'recall@5', 'recall@10'.
Evaluator = Callable[[dict[str, Any]], dict[str, Any]]
# (config, model, manifest, audio table, reviews) -> Evaluator on those
# reviews (`TrainingData.validation`), or on the dev split with None.
EvaluatorFactory = Callable[[ml_collections.ConfigDict, two_branch.TwoBranch,
                             manifest_lib.Manifest, tables.AudioTable,
                             dict[str, np.ndarray] | None], Evaluator]


def total_steps(config: ml_collections.ConfigDict,
                manifest: manifest_lib.Manifest, held_out: int = 0) -> int:
  """`train.num_steps`, or `train.num_epochs` over the training reviews
  less the `held_out` for model selection."""
  t = config.train
  if t.num_steps > 0:
    return int(t.num_steps)
  per_epoch = max(1, (manifest.counts.reviews['train'] - held_out)
                  // t.batch_size)
  return int(math.ceil(t.num_epochs * per_epoch))


@dataclasses.dataclass
class _Run:
  """Everything one training run holds between its stages."""
  config: ml_collections.ConfigDict
  workdir: str
  manifest: manifest_lib.Manifest
  model: two_branch.TwoBranch
  plan: plan_lib.Plan
  state: Any
  batches: Callable[[int, int], Iterator]  # Batches, or their indices.
  # (state, batches' items, first step) -> (state, metrics).
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
  # steps/s of each log window after the first (which holds compilation).
  window_rates: list[float] = dataclasses.field(default_factory=list)
  clock: timing.Clock = dataclasses.field(default_factory=timing.Clock)
  # The state as checkpoints hold it (`step_builder.Step.saveable`).
  saveable: Callable = lambda state: state
  # The split model selection reads: 'validation' or 'dev'.
  selection: str = 'dev'

  def meta(self, step: int) -> dict[str, Any]:
    return {'step': step, 'position': list(self.position),
            'manifest_hash': self.manifest.sha256,
            'config': self.config.to_json_best_effort(sort_keys=True),
            'plan': self.plan.asdict(),
            'best_recall': self.best_recall, 'best_eval': self.best_eval,
            'stopped_early': self.stopped_early, 'history': self.history}

  def evals_since_best(self) -> int:
    """Evaluations after the best one (the best is the first to reach the
    best recall, as `_evaluate` keeps it)."""
    recalls = [h['recall@10'] for h in self.history]
    return len(recalls) - 1 - recalls.index(max(recalls)) if recalls else 0


def batch_order(config: ml_collections.ConfigDict, plan: plan_lib.Plan
                ) -> dict[str, Any]:
  """The arguments of this process's batch order
  (`input_pipeline.train_batches`, `train_indices`), but where it starts."""
  t = config.train
  return dict(batch_size=t.batch_size // plan.processes,
              num_devices=plan.devices, seed=config.seed,
              neighbourhood=t.neighbourhood_sampling,
              reviews_per_album=t.reviews_per_album, fill=t.fill_groups)


def _setup(config: ml_collections.ConfigDict, workdir: str,
           data: TrainingData, make_evaluator: EvaluatorFactory,
           plan: plan_lib.Plan) -> _Run:
  """Builds the model and state from the data, restores, builds the step."""
  manifest, audio, reviews = data.manifest, data.audio, data.reviews
  held_out = 0 if data.validation is None else len(data.validation['album'])
  t = config.train
  model = two_branch.from_manifest(
      config, manifest,
      bn_axis_name=train_step.AXIS if plan.parallel else None,
      dtype=train_step.compute_dtype(plan), lstm_loop=plan.lstm_loop)
  order = batch_order(config, plan)
  if t.neighbourhood_sampling and not t.fill_groups:
    albums, rows = input_pipeline.left_out(reviews, audio,
                                           t.reviews_per_album)
    if albums:
      logging.warning(
          'Neighbourhood sampling leaves out %d albums with fewer than %d '
          'training reviews (%d reviews, %.0f%%); '
          '--config.train.fill_groups=True trains them.', albums,
          t.reviews_per_album, rows, 100 * rows / max(1, len(reviews)))

  def batches(epoch, batch):
    return input_pipeline.train_batches(
        reviews, audio, max_len=config.data.max_len, start_epoch=epoch,
        start_batch=batch, album_tracks=two_branch.album_tracks(config),
        **order)

  try:
    (_, first) = next(batches(0, 0))
  except ValueError as e:
    raise UserError(str(e)) from None
  state = train_step.create_state(model, config, plan,
                                  jax.random.PRNGKey(config.seed),
                                  {k: v[0] for k, v in first.items()},
                                  num_steps=total_steps(config, manifest,
                                                        held_out))
  if config.model.pooling == 'idf':
    state = train_step.set_word_scores(state, _idf(reviews, manifest))
  if config.model.init == 'prototypes':
    state = state.replace(params=prototype_init.initial_params(
        state.params, _all_training_reviews(config, manifest, reviews),
        audio, config.model.prototype_shrink))
  run = _Run(
      config=config, workdir=workdir, manifest=manifest, model=model,
      plan=plan, state=state, batches=batches, step_fn=None,
      # Evaluated in float32 whatever the training dtype, so that dev
      # figures compare across runs.
      evaluator=make_evaluator(config, model.clone(dtype=jnp.float32),
                               manifest, audio, data.validation),
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
      steps=total_steps(config, manifest, held_out),
      selection='dev' if data.validation is None else 'validation')
  _restore(run)
  step = step_builder.build_step(
      plan, config, run.state, reviews, audio,
      jax.random.PRNGKey(config.seed + 1),
      step_builder.positive_widths(config, plan, reviews, audio))
  run.state, run.step_fn, run.saveable = step.state, step.run, step.saveable
  if step.planner is not None:  # Indices, planned in the iterator.
    def indices(epoch, batch):
      return step.planner.with_plans(input_pipeline.train_indices(
          reviews, audio, start_epoch=epoch, start_batch=batch, **order))
    run.batches = indices
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
  def check(meta):
    checkpoints.check_same_data(meta, run.manifest.sha256, run.workdir)
    _check_same_selection(meta, run.config.eval.validation_fraction,
                          run.workdir)
  restored = run.ckpt.restore_latest(run.state, check_meta=check)
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


def _check_same_selection(meta: dict[str, Any], fraction: float,
                          workdir: str) -> None:
  """Refuses to resume a run that held out another share of the training
  reviews (runs from before the field selected on dev: 0): its training
  data, input order and best recall belong to that share.

  Raises:
    UserError: the fractions differ.
  """
  stored = json.loads(meta.get('config') or '{}').get('eval', {}).get(
      'validation_fraction', 0.0)
  if stored != fraction:
    raise UserError(
        f'{workdir} holds a run that held out eval.validation_fraction='
        f'{stored} of the training reviews for model selection, and this '
        f'config holds out {fraction}: resume it with '
        f'--config.eval.validation_fraction={stored}, or train in another '
        'workdir.')


def _all_training_reviews(config: ml_collections.ConfigDict,
                          manifest: manifest_lib.Manifest,
                          own: tables.ReviewTable) -> tables.ReviewTable:
  """The reviews every process trains on (`own`, this process's share,
  when it is the only one): what starts every process's parameters alike."""
  if jax.process_count() == 1:
    return own
  every, _ = input_pipeline.load_training_reviews(
      manifest, config.data.max_len, config.eval.validation_fraction,
      config.data.split_salt)
  return every


def _evaluate(run: _Run, step: int) -> dict[str, Any]:
  """Metrics of the current state on the selection split, logged; keeps
  the best-by-recall checkpoint."""
  with run.clock.part('eval'):
    result = run.evaluator(checkpoints.inference_variables(run.state))
  run.writer.write_scalars(step, {f'{run.selection}/{k}': v
                                  for k, v in result.items()})
  run.history.append({'step': step, **{k: result[k] for k in (
      'recall@1', 'recall@5', 'recall@10', 'train_recall@10')
                                        if k in result}})
  logging.info('step %d %s %s', step, run.selection, json.dumps(result))
  if result['recall@10'] > run.best_recall:
    run.best_recall = result['recall@10']
    run.best_eval = {'step': step, **result}
    # The model's variables only (what eval, export and serve read; no run
    # resumes from here): a third of the state's bytes, written in the
    # background like the rolling checkpoints on one process.
    with run.clock.part('checkpoint'):
      run.best.save(step, checkpoints.inference_variables(run.state),
                    run.meta(step))
  return result


def _check_finite(run: _Run, step: int, m: dict[str, Any]) -> None:
  """Stops the run when step `step` left a non-finite loss, gradient or
  parameter, naming the last good checkpoint: the newest that reads back
  intact (`Checkpoints.newest_verified`). Nothing non-finite is ever saved
  or promoted, since saves and evaluations come after this check.

  The first step after a resume runs alone (`_dispatch_size`): a loss or
  gradient that is not finite there comes from the restored state itself,
  before any update and whatever the learning rate, so that checkpoint is
  set aside too (finite garbage, such as a value of 1e35 written into it),
  and the next run resumes from the one before instead of stopping the
  same way again.
  """
  # Only the flag crosses to the host every step; the rest when it fails.
  if float(m['finite']) >= 1:
    return
  m = jax.device_get(m)
  loss, grad_norm = float(m['loss']), float(m['grad_norm'])
  where = os.path.join(run.workdir, checkpoints.CHECKPOINT_DIR)
  resumed = run.start_step
  if (resumed and step == resumed + 1 and
      resumed in run.ckpt.manager.all_steps() and
      not (math.isfinite(loss) and math.isfinite(grad_norm))):
    aside = run.ckpt.set_aside(
        resumed, f'gives a non-finite loss ({loss}) at the first step after '
        'resuming from it, before any update')
    latest = run.ckpt.newest_verified()
    raise UserError(
        f'The loss became {loss} at step {step}, the first after resuming '
        f'from step {resumed}, before any update (gradient norm {grad_norm}): '
        f'the checkpoint of step {resumed} is bad and was moved to {aside}. '
        + (f'The last good checkpoint is step {latest} in {where}; run again '
           'to resume from it.' if latest is not None else
           'No earlier checkpoint is intact: run again to start from step 0.'))
  latest = run.ckpt.newest_verified()
  suspect = ''
  if latest is not None and latest == resumed:
    suspect = (f' (this run diverged {step - resumed} steps after resuming '
               f'from step {resumed}: if it does so again at a lower rate, '
               f'that checkpoint is suspect; move {where}/{resumed} aside to '
               'resume from the one before)')
  raise UserError(
      f'The loss became {loss} at step {step} (gradient norm {grad_norm}; the '
      'state is no longer finite). The last good checkpoint'
      + (f' is step {latest} in {where}' if latest is not None else
         ' does not exist (none intact saved yet)')
      + f'; lower config.train.learning_rate or check the data{suspect}.')


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
  host fetches, logs and plans (the `train_loop` benchmark measures what
  is left of the step alone's rate). Rates are taken at each boundary's
  dispatch."""

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
  """Steps in the next dispatch: the plan's `steps_per_dispatch`, or 1 when
  a log, checkpoint, evaluation or the end falls sooner, and for the first
  step after a resume (two compiled sizes)."""
  n = run.plan.steps_per_dispatch
  # The first step after a resume alone: its loss and gradient are those of
  # the restored state (`_check_finite`).
  if n == 1 or (step == run.start_step > 0):
    return 1
  t = run.config.train
  boundary = min([run.steps] + [(step // every + 1) * every for every in (
      t.log_every, t.checkpoint_every, t.eval_every)])
  return n if boundary - step >= n else 1


def _loop(run: _Run) -> None:
  """Steps from the restored position to `run.steps`, with logging,
  checkpoints and periodic evaluation."""
  # Built in a thread while the step computes, the plan's prefetch_batches
  # dispatches ahead: a dispatch takes steps_per_dispatch batches at once,
  # so a queue of fewer would leave the thread one dispatch's work behind
  # at each.
  it = prefetch.prefetch(run.batches(*run.position),
                         run.plan.prefetch_batches *
                         max(1, run.plan.steps_per_dispatch))
  try:
    _steps(run, it)
  finally:
    it.close()


def _steps(run: _Run, it: Iterator) -> None:
  """The body of `_loop`: dispatches from the restored step on, their
  batches (or indices) from `it`."""
  t = run.config.train
  window = _Window(run)
  step = run.start_step
  previous = None  # The last dispatch's (step, metrics), checked one late.
  while step < run.steps:
    n = _dispatch_size(run, step)
    items = [next(it) for _ in range(n)]
    run.state, m = run.step_fn(run.state, [b for _, b in items], step)
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
      with run.clock.part('checkpoint'):
        run.ckpt.save(step, run.saveable(run.state), run.meta(step))
    if run.stopped_early:
      logging.info('Stopping early at step %d: dev recall@10 has not '
                   'improved for %d evaluations (best %.4f at step %d).',
                   step, run.evals_since_best(), run.best_recall,
                   run.best_eval['step'])
      run.steps = step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       data: str | TrainingData,
                       make_evaluator: EvaluatorFactory,
                       plan: plan_lib.Plan | None = None
                       ) -> tuple[Any, dict[str, Any]]:
  """Trains, checkpoints and evaluates; returns (final state, final metrics).

  Args:
    config: a validated config (`mardjax.config_check.validate`).
    workdir: checkpoints, best checkpoint and TensorBoard events go here.
    data: the preprocessed records' directory, or tables already in memory
      (the train-loop benchmark's, which needs no TensorFlow).
    make_evaluator: builds the selection split's evaluator once per run
      (and a dev evaluator at the end when selection reads validation).
    plan: the run's execution plan; None: `mardjax.plan.resolve(config)`.

  Returns:
    (state, metrics): the dev metrics of the run's model, the best
    evaluation's on the selection split (kept in `best/`, which eval,
    export and serve read), with 'model_step' (the step it is from),
    'selection' (the split, 'validation' or 'dev', that step and its
    recall@K there), 'last' (the last evaluation's step and recall@K on
    the selection split), 'stopped_early', 'steps' (the last step
    trained), 'resumed_from', 'history' (the selection split's recall@K at
    each evaluation), 'params_sha256',
    'seconds' (wall time of the loop; of evaluation and checkpointing in
    the whole run, step 0's included; 'loop_eval' and 'loop_checkpoint':
    theirs within the loop; 'loop_compile': jax compiling within it, with
    'compiles' programs) and 'steady_steps_per_s' (the median rate of
    the log windows after the first, which holds compilation; windows with
    an evaluation or a save count as they are), and 'plan' (the run's
    `mardjax.plan.Plan`, as a dict).
  """
  if plan is None:  # Else the caller logged it first.
    plan = plan_lib.resolve(config)
    logging.info('Plan: %s', plan.describe())
  if isinstance(data, str):
    data = load_training_data(config, data)
  run = _setup(config, workdir, data, make_evaluator, plan)
  if run.stopped_early:  # A finished run: report it, train no further.
    run.steps = run.start_step
  if run.start_step == 0:
    run.writer.write_hparams(_flatten(config.to_dict()))
    _evaluate(run, 0)
  with run.clock.loop():
    _loop(run)
    if run.steps > run.start_step:
      last = run.last_eval  # The loop's evaluation of the last step.
    else:  # Already trained: report, save nothing.
      last = run.evaluator(checkpoints.inference_variables(run.state))
    with run.clock.part('checkpoint'):
      run.ckpt.close()  # Waits for the last asynchronous save.
      run.best.close()
  # Checkpoints from before the best evaluation was recorded: the last.
  best = run.best_eval or {'step': run.steps, **last}
  metrics = _dev_metrics(run, best, make_evaluator, data)
  run.writer.flush()
  metrics = dict(metrics, model_step=best['step'],
                 last={'step': run.steps, **{k: last[k] for k in (
                     'recall@1', 'recall@5', 'recall@10')}},
                 stopped_early=run.stopped_early,
                 steps=run.steps, resumed_from=run.start_step,
                 selection={'split': run.selection, 'step': best['step'],
                            **{k: best[k] for k in (
                                'recall@1', 'recall@5', 'recall@10')}},
                 history=run.history,
                 params_sha256=checkpoints.params_fingerprint(
                     run.state.params),
                 seconds=run.clock.rounded(), compiles=run.clock.compiles,
                 plan=plan.asdict(),
                 steady_steps_per_s=round(float(np.median(run.window_rates)),
                                          2) if run.window_rates else None)
  return run.saveable(run.state), metrics


def _dev_metrics(run: _Run, best: dict[str, Any],
                 make_evaluator: EvaluatorFactory,
                 data: TrainingData) -> dict[str, Any]:
  """The dev metrics of the run's model (the best evaluation's): that
  evaluation's own when selection read the dev split, else the best
  checkpoint evaluated on dev now."""
  if run.selection == 'dev':
    return {k: v for k, v in best.items() if k != 'step'}
  trained = checkpoints.load_for_inference(run.config, run.workdir,
                                           run.manifest)
  with run.clock.part('eval'):
    dev = make_evaluator(run.config, trained.model, run.manifest, data.audio,
                         None)(trained.variables)
  logging.info('step %d (the model) dev %s', best['step'], json.dumps(dev))
  return dev


def _flatten(d: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v if isinstance(v, (int, float, str, bool)) else (
          str(v))
  return out
