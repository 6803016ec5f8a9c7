"""How the benchmarks measure: a stage in a fresh process (its wall time
and the peak resident memory of its process tree), and the train step
alone (`train_step_throughput`).

A leaf of the experiments: `benchmark`, `serve_benchmark` and `train_loop`
import it, and it imports only the layers below, so no benchmark module
imports another that imports it back.
"""

import multiprocessing
import time
from typing import Any, Callable

import psutil

# What the benchmarks aim for (docs/performance.md): the `full` preset for the
# data stages, paper sizes for the train step (examples/s, higher is better).
TARGETS = {'synth': {'wall_s': 600},
           'preprocess': {'wall_s': 600, 'peak_rss_mb': 4096}}
TRAIN_TARGETS = {'mean': 3000.0, 'lstm': 200.0}


def _stage_main(fn: Callable[..., dict[str, Any]], args: tuple, queue) -> None:
  try:
    queue.put(('ok', fn(*args)))
  except BaseException as e:  # pylint: disable=broad-except
    queue.put(('error', f'{type(e).__name__}: {e}'))


def tree_rss(proc: psutil.Process) -> int:
  """Resident bytes of a process and all its children."""
  total = 0
  for p in [proc] + proc.children(recursive=True):
    try:
      total += p.memory_info().rss
    except psutil.Error:  # Gone between listing and reading.
      pass
  return total


def measure(name: str, fn: Callable[..., dict[str, Any]], args: tuple,
            interval_s: float = 0.2) -> dict[str, Any]:
  """Runs fn(*args) in a spawned child; wall time and peak tree RSS."""
  ctx = multiprocessing.get_context('spawn')
  queue = ctx.Queue()
  proc = ctx.Process(target=_stage_main, args=(fn, args, queue))
  start = time.time()
  proc.start()
  peak = 0
  watched = psutil.Process(proc.pid)
  result = None
  while result is None:
    try:
      peak = max(peak, tree_rss(watched))
    except psutil.Error:
      pass
    try:
      result = queue.get(timeout=interval_s)
    except Exception:  # pylint: disable=broad-except  # queue.Empty
      if not proc.is_alive() and queue.empty():
        result = ('error', f'{name} died with exit code {proc.exitcode}')
  proc.join()
  wall = time.time() - start
  status, payload = result
  line = {'benchmark': name, 'wall_s': round(wall, 1),
          'peak_rss_mb': round(peak / 2**20, 1), 'ok': status == 'ok'}
  if status == 'ok':
    line['result'] = {k: payload[k] for k in (
        'albums', 'reviews', 'tracks', 'skipped', 'reconcile') if k in payload}
  else:
    line['error'] = payload
  targets = TARGETS.get(name, {})
  if targets:
    line['targets'] = targets
    line['meets_targets'] = status == 'ok' and all(
        line[k] <= v for k, v in targets.items())
  return line


def _step_batch(config, vocab_size: int):
  """The train benchmark's batch (`train_step_throughput`), as a host
  batch and as the tables a device-assembled step reads:
  (batch, reviews, audio)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mardjax.data import descriptors  # pylint: disable=g-import-not-at-top
  from mardjax.data import tables  # pylint: disable=g-import-not-at-top
  b, length = config.train.batch_size, config.data.max_len
  dim = descriptors.dim(descriptors.parse_descriptor_list(
      config.data.descriptors))
  rng = np.random.default_rng(0)
  lengths = np.clip(rng.lognormal(4.5, 0.7, b), 1, length).astype(np.int32)
  zipf = 1.0 / np.arange(1, vocab_size - 1)
  tokens = (rng.choice(vocab_size - 2, (b, length), p=zipf / zipf.sum())
            + 2).astype(np.int32)
  valid = np.arange(length)[None, :] < lengths[:, None]
  tokens[~valid] = 0
  batch = {'audio': rng.normal(size=(b, dim)).astype(np.float32),
           'tokens': tokens, 'lengths': lengths,
           'album': np.repeat(np.arange(b // 2), 2)[:b].astype(np.int32)}
  reviews = tables.ReviewTable(
      tokens=tokens[valid], offsets=np.cumsum(lengths) - lengths,
      lengths=lengths, album=batch['album'])
  audio = tables.AudioTable(descriptors=batch['audio'], offsets=np.arange(b),
                            counts=np.ones(b, np.int64))
  return batch, reviews, audio


def _device_step(config, state, data, key, widths=None):
  """(state, step(state) -> (state, metrics), steps per dispatch): training's
  own device-assembled step and planner (`trainer.index_step_fn`) on the
  benchmark's one batch, `train.steps_per_dispatch` steps per dispatch as
  training runs them (several on accelerators)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mardjax.train import train_step  # pylint: disable=g-import-not-at-top
  from mardjax.train import trainer  # pylint: disable=g-import-not-at-top
  b = config.train.batch_size
  planner = trainer.make_planner(config, state, data, widths=widths)
  state, device_fn = trainer.index_step_fn(config, state, False, data,
                                           planner)
  (_, item), = planner.with_plans(iter([((0, 0), {
      'rows': np.arange(b)[None], 'tracks': np.arange(b)[None]})]))
  keys = train_step.StepKeys(key)
  per_dispatch = trainer.steps_per_dispatch(config, 'device')

  def step(state):
    return device_fn(state, [item] * per_dispatch, 0, keys)
  return state, step, per_dispatch


def _timed(step, state, dispatches: int, min_seconds: float
           ) -> tuple[int, float]:
  """(dispatches run, wall seconds): `dispatches` of `step`, then more in
  doubling rounds until at least `min_seconds` have passed (a rate taken
  over a fraction of a second swings with a shared machine's load)."""
  import jax  # pylint: disable=g-import-not-at-top
  done, wall, n = 0, 0.0, dispatches
  while True:
    start = time.time()
    for _ in range(n):
      state, metrics = step(state)
    jax.block_until_ready(metrics)
    done, wall = done + n, wall + time.time() - start
    if wall >= min_seconds:
      return done, wall
    n = done


def train_step_throughput(config, encoder: str, steps: int,
                          vocab_size: int, min_seconds: float = 0.0,
                          widths=None) -> dict[str, Any]:
  """Examples/s of the jitted train step at the config's sizes, one device.

  Random batches with review lengths drawn like MARD's (log-normal, median
  ~90 words, truncated to max_len), words drawn by Zipf's law over the
  vocabulary (frequency ~ 1 / rank: about 5,500 distinct words per batch of
  128 at 60k words, as many as natural text of that length has or more) and
  two rows per album.

  The batch is assembled where training would (`trainer.batch_assembly`):
  on the host, prepared every step and copied over; or on the device from
  indices into tables put there once, each step paying the dispatch's host
  work (`trainer.index_step_fn`; the prefetch thread's plans are made
  once), as the PyTorch peer's batch is on its device when timed; as in
  training, `train.steps_per_dispatch` steps run in each dispatch there
  (several on accelerators, so `steps` rounds up to a multiple); more
  steps while fewer than `min_seconds` have passed. `widths`: a run's
  positive-list widths (`trainer.positive_widths`), so that the step timed
  is the program that run's loop runs; None: the batch's own.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mardjax.models import two_branch  # pylint: disable=g-import-not-at-top
  from mardjax.train import train_step  # pylint: disable=g-import-not-at-top
  from mardjax.train import trainer  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.model.text_encoder = encoder
  b, length = config.train.batch_size, config.data.max_len
  batch, reviews, audio = _step_batch(config, vocab_size)
  model = two_branch.build(config.model, vocab_size,
                           dtype=train_step.compute_dtype(config))
  state = train_step.create_state(model, config, jax.random.PRNGKey(0), batch)
  key = jax.random.PRNGKey(1)
  data = trainer.TrainingData(None, audio, reviews)
  assembly = trainer.batch_assembly(config, False, data)
  if assembly == 'device':
    state, step, per_dispatch = _device_step(config, state, data, key,
                                             widths)
  else:
    per_dispatch = 1
    host_step = train_step.single_device_step(config.loss)

    def step(state):
      # Host-side preparation is part of each step's cost.
      one = train_step.prepare_batch(
          state, {k: v[None] for k, v in batch.items()},
          config.train.vocab_bucket,
          positives=train_step.positive_options(config, False),
          widths=widths, **train_step.batch_options(config))
      return host_step(state, {k: v[0] for k, v in one.items()}, key)
  start = time.time()
  state, metrics = step(state)
  jax.block_until_ready(metrics)
  compile_s = time.time() - start
  dispatches, wall = _timed(step, state, -(-steps // per_dispatch),
                           min_seconds)
  steps = dispatches * per_dispatch
  rate = steps * b / wall
  return {'benchmark': f'train_step_{encoder}', 'examples_per_s': round(rate, 1),
          'steps_per_s': round(steps / wall, 2), 'compile_s': round(compile_s, 1),
          'steps': steps, 'steps_per_dispatch': per_dispatch,
          'batch_size': b, 'max_len': length, 'vocab_size': vocab_size,
          'embedding_update': train_step.embedding_update(config),
          'batch_assembly': assembly,
          **({'lstm_loop': two_branch.lstm_loop(config.model)}
             if encoder == 'lstm' else {}),
          # The mean encoder's layout: real tokens only, or padded.
          'text_layout': ('flat' if train_step.mean_token_bucket(config)
                          else 'packed' if train_step.lstm_pack_rows(config)
                          else 'split bag' if train_step.split_bag(config)
                          else 'padded'),
          'distinct_words_per_batch': int(np.unique(reviews.tokens).size),
          'device': str(jax.devices()[0].platform),
          'target_examples_per_s': TRAIN_TARGETS.get(encoder),
          'meets_target': rate >= TRAIN_TARGETS.get(encoder, 0.0)}
