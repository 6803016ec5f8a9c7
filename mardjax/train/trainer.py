"""The training loop: data, state, steps, checkpoints, metrics, evaluation.

`train_and_evaluate(config, workdir, data_dir)` trains the configured model
on the preprocessed TFRecords in `data_dir`, resuming from the newest
readable checkpoint in `workdir/checkpoints`, evaluates dev recall@K every
`config.train.eval_every` steps (the best-by-recall checkpoint is kept apart
in `workdir/best`), and returns the final state and metrics.

Only this Python loop holds the iterator, the writers and the checkpoint
manager; the step itself is pure (`mardjax.train.train_step`).
"""

import hashlib
import json
import math
import os
import time
from typing import Any

from absl import logging
from clu import metric_writers
import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from mardjax.evaluation import evaluate
from mardjax.data import input_pipeline
from mardjax.train import losses
from mardjax.models import two_branch
from mardjax.data import preprocess
from mardjax.train import train_step
from mardjax.errors import UserError

CHECKPOINT_DIR = 'checkpoints'
BEST_DIR = 'best'


def validate_config(config: ml_collections.ConfigDict, num_devices: int,
                    process_count: int = 1) -> None:
  """Fails before any compile, naming the field, on settings that cannot run."""
  t, m, l = config.train, config.model, config.loss
  def need(ok, field, why):
    if not ok:
      raise UserError(f'config.{field}: {why}')
  need(t.batch_size > 0, 'train.batch_size', 'must be positive')
  need(t.batch_size % (num_devices * process_count) == 0, 'train.batch_size',
       f'{t.batch_size} is not divisible by the {num_devices * process_count} '
       'devices')
  per_device = t.batch_size // (num_devices * process_count)
  need(t.parallelism in ('pmap', 'shard_map'), 'train.parallelism',
       "choose 'pmap' or 'shard_map'")
  need(m.text_encoder in two_branch.TEXT_ENCODERS, 'model.text_encoder',
       f'{m.text_encoder!r} is not one of {two_branch.TEXT_ENCODERS}')
  need(m.audio_encoder in two_branch.AUDIO_ENCODERS, 'model.audio_encoder',
       f'{m.audio_encoder!r} is not one of {two_branch.AUDIO_ENCODERS}')
  need(m.max_tracks >= 1, 'model.max_tracks', 'must be at least 1')
  need(l.kind in ('ranking', 'infonce', 'sigmoid'), 'loss.kind',
       f'{l.kind!r} is not ranking, infonce or sigmoid')
  try:
    mode = losses.NegativeMode.parse(l.negatives)
  except ValueError as e:
    raise UserError(f'config.loss.{e}') from None
  candidates = t.batch_size if l.gather_across_devices else per_device
  need(mode.k <= candidates, 'loss.negatives',
       f'K={mode.k} is larger than the {candidates} rows a device ranks '
       'against')
  need(len(l.weights) == 4, 'loss.weights', 'needs four weights (l1..l4)')
  if t.neighbourhood_sampling:
    need(t.reviews_per_album >= 2, 'train.reviews_per_album', 'must be >= 2')
    need(per_device % t.reviews_per_album == 0, 'train.batch_size',
         f'the per-device batch {per_device} is not a multiple of '
         f'reviews_per_album={t.reviews_per_album}')
  need(t.num_steps > 0 or t.num_epochs > 0, 'train.num_steps',
       'set num_steps or num_epochs')
  need(t.learning_rate > 0, 'train.learning_rate', 'must be positive')
  need(t.embedding_update in ('lazy', 'dense'), 'train.embedding_update',
       f"{t.embedding_update!r} is not 'lazy' or 'dense'")
  need(t.vocab_bucket > 0, 'train.vocab_bucket', 'must be positive')
  need(t.lstm_pack_rows >= 0, 'train.lstm_pack_rows', 'must be >= 0')


def album_tracks(config: ml_collections.ConfigDict) -> int:
  """Tracks per album the pipeline gives the album LSTM (0: one track)."""
  return (config.model.max_tracks
          if config.model.audio_encoder == 'album_lstm' else 0)


def check_text_features(config: ml_collections.ConfigDict,
                        manifest: dict[str, Any]) -> None:
  """The pretrained encoder needs records that hold its features."""
  if (config.model.text_encoder == 'pretrained'
      and not input_pipeline.feature_dim_of(manifest)):
    raise UserError(
        "config.model.text_encoder='pretrained' reads precomputed text "
        'features, and these records hold none: set '
        'config.data.text_encoder_path to a local Hugging Face model '
        'directory (preprocessing then computes them).')


def total_steps(config: ml_collections.ConfigDict,
                manifest: dict[str, Any]) -> int:
  t = config.train
  if t.num_steps > 0:
    return int(t.num_steps)
  per_epoch = max(1, manifest['counts']['reviews']['train'] // t.batch_size)
  return int(math.ceil(t.num_epochs * per_epoch))


def _host_copy(tree):
  """A host copy of the state that later steps cannot touch.

  Train steps donate their input state, and on CPU a device array's host
  view may share its buffer: an async save must write from its own copy.
  """
  return jax.tree_util.tree_map(lambda x: np.array(x, copy=True),
                                jax.device_get(tree))


def _replicated_global(tree):
  """Multi-process: host-local replicated arrays -> global replicated arrays.

  orbax writes only global arrays when several processes take part; each
  process's copy of the (identical) state becomes one replicated array over
  every device. One process: a host copy.
  """
  tree = _host_copy(tree)
  if jax.process_count() == 1:
    return tree
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('all',))
  return multihost_utils.host_local_array_to_global_array(tree, mesh, P())


def _replicated_local(tree):
  """The inverse of `_replicated_global`: this process's copy of each array."""
  if jax.process_count() == 1:
    return tree
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x.addressable_shards[0].data), tree)


def _abstract(tree):
  """Restore targets: shapes, dtypes and, on several processes, shardings."""
  if jax.process_count() == 1:
    return tree
  sharding = NamedSharding(
      jax.sharding.Mesh(np.asarray(jax.devices()), ('all',)), P())
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                     sharding=sharding), tree)


class Checkpoints:
  """orbax CheckpointManager for the state plus a JSON record of the run."""

  def __init__(self, directory: str, keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self.directory = directory
    self.manager = ocp.CheckpointManager(directory, options=options)

  def save(self, step: int, state, meta: dict[str, Any]) -> None:
    if step in self.manager.all_steps():
      # A resumed run reaching a step an earlier run also saved (e.g. the
      # best-by-recall copy written just before a crash): the new one wins.
      self.manager.wait_until_finished()
      self.manager.delete(step)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_replicated_global(state)),
        meta=ocp.args.JsonSave(meta)), force=True)

  def restore_latest(self, abstract_state, check_meta=None):
    """(step, state, meta) of the newest readable checkpoint, or None.

    Args:
      abstract_state: a state of the right structure (values unused).
      check_meta: called with the run record before the state is read; may
        raise (e.g. for another data manifest), which stops the restore.

    An unreadable newest checkpoint (a crash mid-write, a damaged disk) gets a
    warning, is moved aside, and the previous one is tried.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))['meta']
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
        continue
      if check_meta is not None:
        check_meta(meta)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(abstract_state))))
        return step, _replicated_local(restored['state']), meta
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    # Moved, not deleted (someone may want to look at it), so that the
    # resumed run can write this step again.
    aside = os.path.join(os.path.dirname(self.directory),
                         f'unreadable_checkpoints/{step}-{int(time.time())}')
    os.makedirs(os.path.dirname(aside), exist_ok=True)
    os.rename(os.path.join(self.directory, str(step)), aside)
    self.manager.reload()
    logging.warning('Checkpoint at step %d is unreadable (%s: %s); moved it '
                    'to %s and falling back to the previous one.', step,
                    type(error).__name__, error, aside)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _check_same_data(meta: dict[str, Any], manifest_hash: str,
                     workdir: str) -> None:
  """Refuses checkpoints trained on other data (before reading the state)."""
  if meta['manifest_hash'] != manifest_hash:
    raise UserError(
        f'The checkpoints in {workdir} were trained on different data '
        f'(manifest {meta["manifest_hash"][:12]}, now {manifest_hash[:12]}): '
        'use a new --workdir, or the data they were trained on.')


def inference_variables(state) -> dict[str, Any]:
  """The variables model.apply needs: params and BatchNorm statistics."""
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return variables


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       data_dir: str) -> tuple[Any, dict[str, Any]]:
  """Trains, checkpoints and evaluates; returns (final state, final metrics)."""
  manifest = preprocess.load_manifest(data_dir)
  manifest_hash = preprocess.manifest_hash(data_dir)
  num_devices = jax.local_device_count()
  process_count, process_index = jax.process_count(), jax.process_index()
  validate_config(config, num_devices, process_count)
  check_text_features(config, manifest)
  t = config.train
  steps = total_steps(config, manifest)
  local_batch = t.batch_size // process_count
  parallel = num_devices * process_count > 1
  model = two_branch.build(config.model, manifest['vocab']['size'],
                       bn_axis_name=train_step.AXIS if parallel else None)

  audio = input_pipeline.load_audio_table(data_dir, manifest)
  dev = input_pipeline.load_reviews(data_dir, manifest, 'dev',
                                    config.data.max_len)

  reviews = input_pipeline.load_review_table(
      data_dir, manifest, config.data.max_len, process_index=process_index,
      process_count=process_count)

  def batches(epoch, batch):
    return input_pipeline.train_batches(
        reviews, audio, batch_size=local_batch, num_devices=num_devices,
        max_len=config.data.max_len, seed=config.seed,
        neighbourhood=t.neighbourhood_sampling,
        reviews_per_album=t.reviews_per_album, start_epoch=epoch,
        start_batch=batch, album_tracks=album_tracks(config))

  try:
    (_, first) = next(batches(0, 0))
  except ValueError as e:
    raise UserError(str(e)) from None
  sample = {k: v[0] for k, v in first.items()}
  state = train_step.create_state(model, config,
                                  jax.random.PRNGKey(config.seed), sample)

  ckpt = Checkpoints(os.path.join(workdir, CHECKPOINT_DIR),
                     t.keep_checkpoints)
  best = Checkpoints(os.path.join(workdir, BEST_DIR), 1, async_save=False)
  config_json = config.to_json_best_effort(sort_keys=True)
  position = (0, 0)
  start_step = 0
  best_recall = -1.0
  restored = ckpt.restore_latest(
      state, check_meta=lambda m: _check_same_data(m, manifest_hash, workdir))
  if restored is not None:
    start_step, state, meta = restored
    position = tuple(meta['position'])
    best_recall = meta.get('best_recall', -1.0)
    logging.info('Resumed from step %d at input position %s.', start_step,
                 position)

  if t.parallelism == 'pmap' or not parallel:
    step_fn = (train_step.pmap_step(config.loss) if parallel else
               train_step.single_device_step(config.loss))
    def put(b):
      return b if parallel else {k: v[0] for k, v in b.items()}
  else:
    mesh = train_step.make_mesh()
    step_fn = train_step.shard_map_step(config.loss, mesh)
    # A restored state lives on one device; replicate it over the mesh.
    state = jax.device_put(state, NamedSharding(mesh, P()))
    def put(b):
      return train_step.shard_batch(b, mesh)

  writer = metric_writers.create_default_writer(
      workdir, just_logging=process_index > 0)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})
  history = []
  metrics: dict[str, Any] = {}
  last_log_time, last_log_step = time.time(), start_step
  step = start_step
  base_key = jax.random.PRNGKey(config.seed + 1)

  def meta_for(step_, position_):
    return {'step': step_, 'position': list(position_),
            'manifest_hash': manifest_hash, 'config': config_json,
            'best_recall': best_recall}

  def run_eval(step_):
    nonlocal best_recall
    result = evaluate.evaluate(inference_variables(state), model, audio, dev,
                               max_tracks=album_tracks(config))
    writer.write_scalars(step_, {f'dev/{k}': v for k, v in result.items()})
    history.append({'step': step_, **{k: result[k] for k in (
        'recall@1', 'recall@5', 'recall@10')}})
    logging.info('step %d dev %s', step_, json.dumps(result))
    if result['recall@10'] > best_recall:
      best_recall = result['recall@10']
      best.save(step_, state, meta_for(step_, position))
      best.wait()
    return result

  if start_step == 0:
    run_eval(0)
  sync = train_step.ProcessSync() if process_count > 1 else None
  it = batches(*position)
  while step < steps:
    (epoch, batch_no), batch = next(it)
    key = jax.random.fold_in(base_key, step)
    batch = train_step.prepare_batch(state, batch, t.vocab_bucket,
                                     train_step.lstm_pack_rows(config),
                                     sync=sync)
    state, m = step_fn(state, put(batch), key)
    step += 1
    position = (epoch, batch_no + 1)
    log_now = step % t.log_every == 0 or step == steps
    save_now = step % t.checkpoint_every == 0 or step == steps
    if log_now or save_now:  # Never checkpoint a state that went NaN.
      m = jax.device_get(m)
      loss = float(m['loss'])
      if not np.isfinite(loss):
        ckpt.wait()
        latest = ckpt.manager.latest_step()
        raise UserError(
            f'The loss became {loss} at step {step}. The last good checkpoint'
            + (f' is step {latest} in {os.path.join(workdir, CHECKPOINT_DIR)}'
               if latest is not None else ' does not exist (none saved yet)')
            + '; lower config.train.learning_rate or check the data.')
    if log_now:
      now = time.time()
      rate = (step - last_log_step) / max(now - last_log_time, 1e-9)
      eta = (steps - step) / max(rate, 1e-9)
      writer.write_scalars(step, {f'train/{k}': float(v) for k, v in
                                  m.items()} | {'steps_per_sec': rate})
      logging.info('step %d/%d loss %.4f  %.1f steps/s  %.0f examples/s  '
                   'ETA %.0fs', step, steps, loss, rate, rate * t.batch_size,
                   eta)
      last_log_time, last_log_step = now, step
    if save_now:
      ckpt.save(step, state, meta_for(step, position))
    if step % t.eval_every == 0 and step != steps:
      run_eval(step)
  if steps > start_step:
    metrics = run_eval(steps)
  else:  # Already trained: report, save nothing.
    metrics = evaluate.evaluate(inference_variables(state), model, audio, dev,
                                max_tracks=album_tracks(config))
  ckpt.close()
  best.close()
  writer.flush()
  metrics = dict(metrics, steps=steps, resumed_from=start_step,
                 best_dev_recall_at_10=best_recall, history=history,
                 params_sha256=params_fingerprint(state.params))
  return state, metrics


def params_fingerprint(params) -> str:
  """sha256 of every parameter's bytes, in tree order: equal iff identical."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(params)):
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def _flatten(d: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v if isinstance(v, (int, float, str, bool)) else (
          str(v))
  return out


def load_genres(data_dir: str, manifest: dict[str, Any]) -> np.ndarray:
  """(num_albums,) root genre of each album, from albums.jsonl."""
  genres = np.full(manifest['counts']['albums'], '', object)
  for index, album in preprocess.read_albums(data_dir, manifest).items():
    genres[index] = album.get('genre') or ''
  return genres


def require_checkpoints(workdir: str, directory: str = CHECKPOINT_DIR
                        ) -> str:
  """workdir/directory, or a UserError when it holds no checkpoint."""
  ckpt_dir = os.path.join(workdir, directory)
  if not os.path.isdir(ckpt_dir) or not os.listdir(ckpt_dir):
    raise UserError(f'No checkpoint in {ckpt_dir!r}: train first '
                    '(--mode=train).')
  return ckpt_dir


def inference_source(workdir: str) -> str:
  """The checkpoint directory serving uses: the best-by-recall one when a
  run kept it, else the rolling checkpoints."""
  return BEST_DIR if os.path.isdir(os.path.join(workdir, BEST_DIR)) else (
      CHECKPOINT_DIR)


def restore_trained(config: ml_collections.ConfigDict, workdir: str,
                    data_dir: str, model: two_branch.TwoBranch,
                    manifest: dict[str, Any],
                    audio: input_pipeline.AudioTable,
                    reviews: dict[str, np.ndarray],
                    directory: str = CHECKPOINT_DIR) -> tuple[int, Any]:
  """(step, state) of the newest readable checkpoint in workdir/directory.

  `reviews` (any split, `input_pipeline.load_reviews`) only shapes the
  restore target. Refuses checkpoints of other data.
  """
  ckpt_dir = require_checkpoints(workdir, directory)
  check_text_features(config, manifest)
  sample = {k: reviews[k][:2] for k in ('tokens', 'lengths', 'text_features')
            if k in reviews}
  sample['audio'] = audio.descriptors[:2]
  if album_tracks(config):
    sample['audio'], sample['num_tracks'] = audio.sequences(
        np.flatnonzero(audio.counts)[:2], album_tracks(config))
  abstract = jax.eval_shape(lambda: train_step.create_state(
      model, config, jax.random.PRNGKey(0), sample))
  ckpt = Checkpoints(ckpt_dir, config.train.keep_checkpoints, async_save=False)
  data_hash = preprocess.manifest_hash(data_dir)
  try:
    restored = ckpt.restore_latest(
        abstract, check_meta=lambda m: _check_same_data(m, data_hash, workdir))
  finally:
    ckpt.close()
  if restored is None:
    raise UserError(f'No readable checkpoint in {ckpt_dir!r}.')
  step, state, _ = restored
  return step, state


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        data_dir: str) -> dict[str, Any]:
  """Full evaluation of the newest readable checkpoint of `workdir`.

  Split `config.eval.split`: both directions, bootstrap CIs, per-genre
  recall (`evaluate.evaluate(full=True)`); the numbers also go to
  TensorBoard under `workdir/eval`.
  """
  split = config.eval.split
  if split not in ('dev', 'test'):
    raise UserError(f"config.eval.split={split!r}: choose 'dev' or 'test'.")
  manifest = preprocess.load_manifest(data_dir)
  require_checkpoints(workdir)  # Before minutes of loading.
  model = two_branch.build(config.model, manifest['vocab']['size'])
  audio = input_pipeline.load_audio_table(data_dir, manifest)
  reviews = input_pipeline.load_reviews(data_dir, manifest, split,
                                        config.data.max_len)
  if not len(reviews['album']):
    raise UserError(f'The {split!r} split holds no held-out reviews '
                    f'(manifest counts: {manifest["counts"]["reviews"]}); '
                    'choose another config.eval.split or preprocess with a '
                    'larger config.data.dev_fraction / test_album_fraction.')
  step, state = restore_trained(config, workdir, data_dir, model, manifest,
                                audio, reviews)
  start = time.time()
  result = evaluate.evaluate(
      inference_variables(state), model, audio, reviews,
      max_tracks=album_tracks(config), full=True,
      genres=load_genres(data_dir, manifest),
      bootstrap=config.eval.bootstrap, seed=config.seed)
  result = dict(result, step=step, split=split,
                eval_seconds=round(time.time() - start, 2))
  if jax.process_index() == 0:
    writer = metric_writers.create_default_writer(
        os.path.join(workdir, 'eval'))
    writer.write_scalars(step, {f'{split}/{k}': v for k, v in result.items()
                                if isinstance(v, (int, float))})
    writer.flush()
  return result
