"""How the benchmarks measure: a stage in a fresh process (its wall time
and the peak resident memory of its process tree), and the train step
alone (`train_step_throughput`).

A leaf of the experiments: `benchmark`, `serve_benchmark` and `train_loop`
import it, and it imports only the layers below, so no benchmark module
imports another that imports it back.
"""

import math
import multiprocessing
import time
from typing import Any, Callable

import psutil

# What the benchmarks aim for (docs/performance.md): the `full` preset for the
# data stages on a laptop-class machine of two cores, paper sizes for the
# train step (examples/s, higher is better).
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


def step_batch(config, vocab_size: int):
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


def _built_step(config, plan, state, reviews, audio, batch, key,
                widths=None):
  """(state, step(state) -> (state, metrics), steps per dispatch): training's
  own step for `plan` (`step_builder.build_step`) on the benchmark's one
  batch, as many steps per dispatch as training runs. Device assembly
  makes its host plans for the batch once (the prefetch thread's work) and
  pays each dispatch's; host assembly prepares and copies the batch every
  step, as training does."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mardjax.train import step_builder  # pylint: disable=g-import-not-at-top
  b = config.train.batch_size
  built = step_builder.build_step(plan, config, state, reviews, audio, key,
                                  widths)
  if built.planner is None:
    item, per_dispatch = {k: v[None] for k, v in batch.items()}, 1
  else:
    (_, item), = built.planner.with_plans(iter([((0, 0), {
        'rows': np.arange(b)[None], 'tracks': np.arange(b)[None]})]))
    per_dispatch = plan.steps_per_dispatch

  def step(state):
    return built.run(state, [item] * per_dispatch, 0)
  return built.state, step, per_dispatch


def _timed(step, state, dispatches: int, min_seconds: float
           ) -> tuple[int, float]:
  """(dispatches run, wall seconds): `dispatches` of `step`, then rounds
  sized by the rate so far until at least `min_seconds` have passed (a rate
  taken over a fraction of a second swings with a shared machine's load).
  The first dispatch of `step` is expected to have been run (compiled)."""
  import jax  # pylint: disable=g-import-not-at-top
  done, wall, n = 0, 0.0, max(1, dispatches)
  while True:
    start = time.time()
    for _ in range(n):
      state, metrics = step(state)
    jax.block_until_ready(metrics)
    done, wall = done + n, wall + time.time() - start
    if wall >= min_seconds:
      return done, wall
    # The remaining time at the rate so far, 5% over: one round, rarely two.
    n = (math.ceil(1.05 * (min_seconds - wall) * done / wall) if wall > 0
         else done)


def train_step_throughput(config, encoder: str, steps: int,
                          vocab_size: int, min_seconds: float = 0.0,
                          widths=None) -> dict[str, Any]:
  """Examples/s of the jitted train step at the config's sizes, one device.

  Random batches with review lengths drawn like MARD's (log-normal, median
  ~90 words, truncated to max_len), words drawn by Zipf's law over the
  vocabulary (frequency ~ 1 / rank: about 5,500 distinct words per batch of
  128 at 60k words, as many as natural text of that length has or more) and
  two rows per album.

  The step is training's own for the config's plan on one device
  (`mardjax.plan.resolve`, `step_builder.build_step`): the batch assembled
  on the host, prepared every step and copied over; or on the device from
  indices into tables put there once, each step paying the dispatch's host
  work (the prefetch thread's plans are made once), as the PyTorch peer's
  batch is on its device when timed; as in training, the plan's
  `steps_per_dispatch` steps run in each dispatch (several on
  accelerators, so `steps` rounds up to a multiple); more steps while
  fewer than `min_seconds` have passed. `widths`: a run's positive-list
  widths (`step_builder.positive_widths`), so that the step timed is the
  program that run's loop runs; None: the batch's own.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mardjax import plan as plan_lib  # pylint: disable=g-import-not-at-top
  from mardjax.models import two_branch  # pylint: disable=g-import-not-at-top
  from mardjax.train import train_step  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.model.text_encoder = encoder
  b, length = config.train.batch_size, config.data.max_len
  batch, reviews, audio = step_batch(config, vocab_size)
  plan = plan_lib.resolve(config, devices=1, processes=1)
  model = two_branch.build(config.model, vocab_size,
                           dtype=train_step.compute_dtype(plan),
                           lstm_loop=plan.lstm_loop)
  state = train_step.create_state(model, config, plan, jax.random.PRNGKey(0),
                                  batch)
  state, step, per_dispatch = _built_step(
      config, plan, state, reviews, audio, batch, jax.random.PRNGKey(1),
      widths)
  start = time.time()
  state, metrics = step(state)
  jax.block_until_ready(metrics)
  compile_s = time.time() - start
  dispatches, wall = _timed(step, state, -(-steps // per_dispatch),
                           min_seconds)
  steps = dispatches * per_dispatch
  rate = steps * b / wall
  return {'benchmark': f'train_step_{encoder}', 'encoder': encoder,
          'examples_per_s': round(rate, 1), 'steps_per_s': round(
              steps / wall, 2), 'compile_s': round(compile_s, 1),
          'steps': steps, 'seconds': round(wall, 2),
          'steps_per_dispatch': per_dispatch,
          'batch_size': b, 'max_len': length, 'vocab_size': vocab_size,
          'embedding_update': plan.embedding_update,
          'batch_assembly': plan.batch_assembly,
          **({'lstm_loop': plan.lstm_loop} if encoder == 'lstm' else {}),
          'text_layout': plan.text_layout,
          'distinct_words_per_batch': int(np.unique(reviews.tokens).size),
          'device': str(jax.devices()[0].platform),
          'target_examples_per_s': TRAIN_TARGETS.get(encoder),
          'meets_target': rate >= TRAIN_TARGETS.get(encoder, 0.0)}
