"""`--mode=benchmark --config.benchmark.kind=train_loop`: the real training
loop end to end, at full MARD shape, without TensorFlow.

The tables the loop trains on are generated in this process with MARD's
shape (`benchmark.loop_albums` albums, `loop_tracks` tracks of 369 values,
`loop_reviews` training reviews with MARD-like lengths and Zipf words over
the config's vocabulary, `loop_dev_reviews` held-out ones), in place of the
records tf.data would read, so the benchmark runs where TensorFlow is not
installed (the GPU machines). Everything else is `--mode=train`'s own code:
`trainer.train_and_evaluate` with its batching, step, logging, periodic
dev evaluation (every `train.eval_every` steps) and checkpoints (every
`train.checkpoint_every`, into a temporary directory), for
`benchmark.train_loop_steps` steps. The same step is timed alone, in the
same run, for comparison: before the loop and after it, each time for at
least `benchmark.loop_step_seconds`, and the two rates averaged (a shared
machine's speed drifts over the minutes the loop takes).
"""

import json
import tempfile
import time
from typing import Any

import numpy as np

from mardjax import plan as plan_lib
from mardjax.data import manifest as manifest_lib
from mardjax.data import tables
from mardjax.evaluation import evaluate
from mardjax.experiments import measuring
from mardjax.data import input_pipeline
from mardjax.models import two_branch
from mardjax.train import index_batches
from mardjax.train import step_builder
from mardjax.train import trainer


def _zipf_tokens(rng, count: int, vocab_size: int) -> np.ndarray:
  """(count,) word ids 2.. by Zipf's law (inverse CDF: no per-draw search
  over 60k probabilities)."""
  weights = 1.0 / np.arange(1, vocab_size - 1)
  cdf = np.cumsum(weights / weights.sum())
  return (np.searchsorted(cdf, rng.random(count)) + 2).astype(np.int32)


def _lengths(rng, count: int, max_len: int) -> np.ndarray:
  """MARD-like review lengths: log-normal, median ~90 words."""
  return np.clip(rng.lognormal(4.5, 0.7, count), 1, max_len).astype(np.int32)


def synthetic_data(config, seed: int = 0
                   ) -> tuple[trainer.TrainingData, dict[str, np.ndarray]]:
  """(training data, dev reviews as `input_pipeline.load_reviews` gives
  them) of the benchmark's shape."""
  b = config.benchmark
  rng = np.random.default_rng(seed)
  albums, tracks = b.loop_albums, b.loop_tracks
  dim, max_len = 369, config.data.max_len
  vocab_size = config.data.vocab_size + 2
  counts = np.bincount(rng.integers(0, albums, tracks - albums),
                       minlength=albums) + 1  # Every album has a track.
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
  audio = tables.AudioTable(
      rng.standard_normal((tracks, dim), dtype=np.float32), offsets, counts)
  popularity = rng.lognormal(0, 1.2, albums)  # Heavy-tailed, as MARD's.
  popularity /= popularity.sum()
  album = rng.choice(albums, b.loop_reviews, p=popularity).astype(np.int32)
  lengths = _lengths(rng, b.loop_reviews, max_len)
  reviews = tables.ReviewTable(
      tokens=_zipf_tokens(rng, int(lengths.sum()), vocab_size),
      offsets=np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)[:-1]]),
      lengths=lengths, album=album)
  dev_lengths = _lengths(rng, b.loop_dev_reviews, max_len)
  dev_tokens = _zipf_tokens(rng, b.loop_dev_reviews * max_len,
                            vocab_size).reshape(-1, max_len)
  dev_tokens[np.arange(max_len)[None, :] >= dev_lengths[:, None]] = 0
  dev = {'tokens': dev_tokens, 'lengths': dev_lengths,
         'album': rng.choice(albums, b.loop_dev_reviews,
                             p=popularity).astype(np.int32),
         'review_id': np.asarray([f'dev{i}' for i in
                                  range(b.loop_dev_reviews)], object)}
  manifest = manifest_lib.from_dict({
      'schema_version': manifest_lib.SCHEMA_VERSION,
      'vocab': {'file': '', 'size': vocab_size, 'sha256': '', 'pad_id': 0,
                'unk_id': 1, 'max_len': max_len},
      'descriptors': {'list': [], 'dim': dim, 'transform': 'none',
                      'mean': [0.0] * dim, 'std': [1.0] * dim,
                      'fitted_on_tracks': tracks},
      'counts': {'albums': albums, 'albums_by_split': {'train': albums},
                 'reviews': {'train': b.loop_reviews,
                             'dev': b.loop_dev_reviews, 'test': 0},
                 'tracks': tracks},
      'files': {}, 'albums_file': ''}, data_dir='(in memory)',
      sha256=f'synthetic-train-loop-{seed}')
  return trainer.TrainingData(manifest, audio, reviews), dev


# Steps whose host planning `host_planning` times (whole dispatches).
PLANNED_STEPS = 200
# Draws of an epoch's order `host_planning` times (the median counts).
ORDER_DRAWS = 5


def host_planning(config, plan: plan_lib.Plan, data: trainer.TrainingData,
                  widths) -> dict[str, Any]:
  """What the host does per step for a step that assembles its batch on
  the device, on the loop's own batch order, in ms per step, and the bytes
  of the arrays a dispatch sends to the device. {} when the host assembles
  the batch.

  The prefetch thread's work per step (`host_plan_ms_per_step`) is each
  batch's own (`input_pipeline.train_indices` and `Planner.with_plans`,
  timed over the batches that draw no epoch order) plus the epoch's order
  (`input_pipeline.epoch_order`, `epoch_order_ms`) shared by the epoch's
  `steps_per_epoch` steps: at large batches an epoch has few steps and its
  order is a large part of the host's work. The dispatch's
  (`host_dispatch_ms_per_step`) is `Planner.__call__`'s.
  """
  if plan.batch_assembly != 'device':
    return {}
  vocab = config.data.vocab_size + 2 if plan.embedding_update == 'lazy' else 0
  planner = index_batches.Planner(config, plan, data.reviews, vocab,
                                  widths=widths)
  n = max(1, plan.steps_per_dispatch)
  order = trainer.batch_order(config, plan)
  draws = []
  for epoch in range(ORDER_DRAWS):
    start = time.perf_counter()
    epoch_steps = len(input_pipeline.epoch_order(
        data.reviews, data.audio, batch_size=order['batch_size'],
        seed=order['seed'], epoch=epoch, neighbourhood=order['neighbourhood'],
        reviews_per_album=order['reviews_per_album'], fill=order['fill']))
    draws.append(time.perf_counter() - start)
  draw_s = float(np.median(draws))
  it = planner.with_plans(input_pipeline.train_indices(
      data.reviews, data.audio, **order))
  batch_s, fetch_s, call_s, sent = [], [], 0.0, 0
  dispatches = -(-PLANNED_STEPS // n)
  for _ in range(dispatches):
    items = []
    for _ in range(n):
      start = time.perf_counter()
      (_, batch), idx = next(it)
      # The first batch of an epoch draws the epoch's order as well.
      (fetch_s if batch == 0 else batch_s).append(time.perf_counter() - start)
      items.append(idx)
    start = time.perf_counter()
    idx, _ = planner(items, plan.parallelism == 'pmap')
    call_s += time.perf_counter() - start
    sent = max(sent, sum(np.asarray(x).nbytes for x in idx.values()))
  per_batch = (float(np.mean(batch_s)) if batch_s else
               max(float(np.mean(fetch_s)) - draw_s, 0.0))
  thread_ms = 1e3 * (per_batch + draw_s / max(epoch_steps, 1))
  dispatch_ms = 1e3 * call_s / (dispatches * n)
  return {'host_plan_ms_per_step': round(thread_ms, 3),
          'host_dispatch_ms_per_step': round(dispatch_ms, 3),
          'host_ms_per_step': round(thread_ms + dispatch_ms, 3),
          'epoch_order_ms': round(1e3 * draw_s, 3),
          'steps_per_epoch': epoch_steps,
          'bytes_per_dispatch': int(sent)}


def benchmark_train_loop(config, workdir: str) -> dict[str, Any]:
  """The training loop end to end, then the step alone; one JSON line."""
  import jax  # pylint: disable=g-import-not-at-top
  del workdir  # Checkpoints go to a temporary directory, deleted after.
  b, start = config.benchmark, time.perf_counter()
  config = config.copy_and_resolve_references()
  config.train.num_steps = b.train_loop_steps
  data, dev = synthetic_data(config, config.seed)
  generate_s = time.perf_counter() - start

  def make_evaluator(cfg, model, manifest, audio, reviews):
    del manifest, reviews  # No held-out training reviews: the dev ones.
    return lambda variables: evaluate.evaluate(
        variables, model, audio, dev, max_tracks=two_branch.album_tracks(cfg))

  # The loop's positive-list width (its albums repeat within a batch; the
  # step-alone batch's do not): the same program is timed alone.
  plan = plan_lib.resolve(config)
  widths = step_builder.positive_widths(config, plan, data.reviews,
                                        data.audio)

  def step_alone():
    return measuring.train_step_throughput(
        config, config.model.text_encoder, b.train_steps,
        config.data.vocab_size + 2, min_seconds=b.loop_step_seconds,
        widths=widths)
  before = step_alone()
  with tempfile.TemporaryDirectory(prefix='mardjax-train-loop-') as tmp:
    start = time.perf_counter()
    _, metrics = trainer.train_and_evaluate(config, tmp, data, make_evaluator,
                                            plan)
    total_s = time.perf_counter() - start
  seconds = metrics['seconds']
  examples = b.train_loop_steps * config.train.batch_size
  end_to_end = examples / seconds['loop']
  # Compiling is paid once per program, however long the run: the epoch
  # and the 200-epoch projection count the rest of the loop per example
  # and the compilation once.
  compile_s = seconds['loop_compile']
  recurring = examples / (seconds['loop'] - compile_s)
  step = step_alone()
  rates = [before['examples_per_s'], step['examples_per_s']]
  step['examples_per_s'] = round(sum(rates) / 2, 1)
  epoch_s = len(data.reviews) / recurring
  line = {
      'benchmark': 'train_loop', 'device': str(jax.devices()[0].platform),
      'device_kind': jax.devices()[0].device_kind,
      'text_encoder': config.model.text_encoder,
      'embedding_update': step['embedding_update'],
      'batch_size': config.train.batch_size, 'steps': b.train_loop_steps,
      'batch_assembly': plan.batch_assembly,
      'steps_per_dispatch': plan.steps_per_dispatch, 'plan': plan.asdict(),
      'reviews': len(data.reviews), 'albums': b.loop_albums,
      'tracks': b.loop_tracks,
      'end_to_end_examples_per_s': round(end_to_end, 1),
      'step_examples_per_s': step['examples_per_s'],
      'step_examples_per_s_before_after': rates,
      'end_to_end_share_of_step': round(end_to_end / step['examples_per_s'],
                                        3),
      'share_of_step_excluding_compile': round(
          recurring / step['examples_per_s'], 3),
      # The loop's log windows after the first: no compilation in them.
      'steady_examples_per_s': round(
          metrics['steady_steps_per_s'] * config.train.batch_size, 1)
      if metrics['steady_steps_per_s'] else None,
      'epoch_s': round(epoch_s, 1),
      'projected_200_epochs_s': round(compile_s + 200 * epoch_s, 1),
      'loop_s': seconds['loop'],
      # Within the loop (step 0's evaluation comes before it).
      'eval_share': round(seconds['loop_eval'] / seconds['loop'], 3),
      'checkpoint_share': round(
          seconds['loop_checkpoint'] / seconds['loop'], 3),
      'compile_share': round(compile_s / seconds['loop'], 3),
      'compiles': metrics['compiles'],
      'evaluations': len(metrics['history']),
      'setup_s': round(total_s - seconds['loop'], 1),
      'generate_s': round(generate_s, 1),
      **host_planning(config, plan, data, widths)}
  print(json.dumps(line, sort_keys=True), flush=True)
  return {'benchmarks': [line]}
