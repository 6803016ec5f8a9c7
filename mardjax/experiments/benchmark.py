"""Benchmarks that print JSON lines (never timed tests).

`launch.py --mode=benchmark` runs each stage in a fresh child process and
samples the resident memory of the child and all its workers together, so
the figures are what a user's machine sees:

  * `synth`: generating the corpus of `config.data.synth_preset` (the issue's
    target for `full`: under 10 minutes);
  * `preprocess`: raw corpus -> TFRecords (target for `full`: under 10
    minutes and 4 GB peak resident memory on a 2-core machine).

Each stage prints one JSON line to stdout as it finishes; the mode's result
(the last line) holds them all.
"""

import functools
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import time
from typing import Any, Callable

import psutil

from mardjax import modes
from mardjax.data import manifest as manifest_lib

# Targets from the issues, on a 2-core machine: the `full` preset for the data
# stages, paper sizes for the train step (examples/s, higher is better).
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
  batch, reviews, audio = _step_batch(config, vocab_size)
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
  return {'benchmark': f'train_step_{encoder}', 'examples_per_s': round(rate, 1),
          'steps_per_s': round(steps / wall, 2), 'compile_s': round(compile_s, 1),
          'steps': steps, 'steps_per_dispatch': per_dispatch,
          'batch_size': b, 'max_len': length, 'vocab_size': vocab_size,
          'embedding_update': plan.embedding_update,
          'batch_assembly': plan.batch_assembly,
          **({'lstm_loop': plan.lstm_loop} if encoder == 'lstm' else {}),
          'text_layout': plan.text_layout,
          'distinct_words_per_batch': int(np.unique(reviews.tokens).size),
          'device': str(jax.devices()[0].platform),
          'target_examples_per_s': TRAIN_TARGETS.get(encoder),
          'meets_target': rate >= TRAIN_TARGETS.get(encoder, 0.0)}


def names(text: str) -> list[str]:
  """The names of a comma-separated config field."""
  return [x.strip() for x in text.split(',') if x.strip()]


def run_train(config, workdir: str) -> dict[str, Any]:
  """Train-step throughput: one line per text encoder
  (`benchmark.encoders`), batch size (`benchmark.batch_sizes`), embedding
  update (`benchmark.embedding_updates`; empty: the config's) and, for the
  LSTM, loop (`benchmark.lstm_loops`; empty: the config's
  `model.lstm_loop`). The LSTM runs a tenth of `benchmark.train_steps`
  (at least 2)."""
  del workdir
  b = config.benchmark
  lines = []
  for encoder in names(b.encoders):
    steps = b.train_steps if encoder != 'lstm' else max(2, b.train_steps // 10)
    loops = ((names(b.lstm_loops) if encoder == 'lstm' else []) or
             [config.model.lstm_loop])
    for batch_size in (int(x) for x in names(b.batch_sizes)):
      for update, loop in itertools.product(
          names(b.embedding_updates) or [config.train.embedding_update],
          loops):
        one = config.copy_and_resolve_references()
        one.train.batch_size, one.train.embedding_update = batch_size, update
        one.model.lstm_loop = loop
        line = train_step_throughput(one, encoder, steps,
                                     config.data.vocab_size + 2)
        print(json.dumps(line, sort_keys=True), flush=True)
        lines.append(line)
  return {'benchmarks': lines}


def run_eval(config, workdir: str) -> dict[str, Any]:
  """Evaluation time after embedding, at full MARD scale by default.

  Random unit embeddings for `benchmark.eval_albums` candidate albums and
  `benchmark.eval_reviews` held-out reviews (MARD: 65,566 and ~26,400 test
  reviews), each review's album one of `benchmark.eval_query_albums`;
  times both directions of `evaluate`'s metrics with bootstrap CIs.
  Target: under 10 s.
  """
  del workdir
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mardjax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  b = config.benchmark
  dim = config.model.embed_dim
  rng = np.random.default_rng(0)

  def unit(n):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)

  albums, album_emb = np.arange(b.eval_albums), unit(b.eval_albums)
  # The test split holds out whole albums: its reviews belong to a tenth of
  # them (MARD: ~6,560).
  held_out = rng.choice(b.eval_albums, b.eval_query_albums, replace=False)
  review_albums = held_out[rng.integers(0, len(held_out), b.eval_reviews)]
  review_emb = unit(b.eval_reviews)
  # Compile outside the timed region (the evaluator compiles once per run).
  metrics.review_to_album_counts(review_emb[:8], review_albums[:8], albums,
                                 album_emb)
  start = time.time()
  counts = metrics.review_to_album_counts(review_emb, review_albums, albums,
                                          album_emb)
  forward = time.time() - start
  out = metrics.summarize(*counts, len(albums),
                          bootstrap=config.eval.bootstrap)
  query_albums = np.unique(review_albums)
  back = metrics.album_to_review_counts(album_emb[query_albums], query_albums,
                                        review_emb, review_albums)
  out.update(metrics.summarize(*back, len(review_emb), prefix='back/',
                               bootstrap=config.eval.bootstrap))
  wall = time.time() - start
  line = {'benchmark': 'evaluation', 'wall_s': round(wall, 2),
          'review_to_album_s': round(forward, 2),
          'reviews': b.eval_reviews, 'albums': b.eval_albums,
          'album_queries': int(len(query_albums)), 'embed_dim': dim,
          'bootstrap': config.eval.bootstrap,
          'device': str(jax.devices()[0].platform),
          'target_s': 10.0, 'meets_target': wall < 10.0,
          'recall@10': round(out['recall@10'], 5)}
  print(json.dumps(line, sort_keys=True), flush=True)
  return {'benchmarks': [line]}


def run_pipeline(config, workdir: str) -> dict[str, Any]:
  """Input-pipeline examples/s against what the train step consumes.

  Preprocesses the configured data (or reuses it), then times
  `config.benchmark.pipeline_batches` training batches, with the host-side
  batch preparation the train loop adds (`train_step.prepare_batch`), and,
  in the same run, the train step of the configured model at the same
  sizes. Reading the records into memory, once per run, is timed apart
  (`load_reviews_s`). Target: the pipeline delivers at least 10x what the
  step consumes.
  """
  import itertools  # pylint: disable=g-import-not-at-top
  from mardjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mardjax.models import two_branch  # pylint: disable=g-import-not-at-top
  from mardjax.train import sparse_embedding  # pylint: disable=g-import-not-at-top
  modes.run_mode('preprocess', config, workdir, show_progress=False)
  manifest = manifest_lib.load(manifest_lib.data_dir_of(config, workdir))
  audio = input_pipeline.load_audio_table(manifest)
  t = config.train
  start = time.time()
  reviews = input_pipeline.load_review_table(manifest, config.data.max_len)
  load_s = time.time() - start
  it = input_pipeline.train_batches(
      reviews, audio, batch_size=t.batch_size, num_devices=1,
      max_len=config.data.max_len, seed=config.seed,
      neighbourhood=t.neighbourhood_sampling,
      reviews_per_album=t.reviews_per_album)
  next(it)
  n = config.benchmark.pipeline_batches
  start = time.time()
  from mardjax import plan as plan_lib  # pylint: disable=g-import-not-at-top
  plan = plan_lib.resolve(config, devices=1, processes=1)
  lazy = (plan.embedding_update == 'lazy'
          and config.model.text_encoder != 'pretrained')
  for _, batch in itertools.islice(it, n):
    if lazy:
      sparse_embedding.compact_batch(batch, manifest.vocab.size,
                                     t.vocab_bucket, split_bag=plan.split_bag)
    if plan.token_bucket:
      two_branch.flat_review(np.minimum(batch['lengths'],
                                        batch['tokens'].shape[-1]),
                             plan.token_bucket)
  rate = n * t.batch_size / (time.time() - start)
  step = train_step_throughput(config, config.model.text_encoder,
                               config.benchmark.train_steps,
                               config.data.vocab_size + 2)
  print(json.dumps(step, sort_keys=True), flush=True)
  line = {'benchmark': 'input_pipeline', 'examples_per_s': round(rate, 1),
          'batches': n, 'batch_size': t.batch_size,
          'load_reviews_s': round(load_s, 2), 'reviews': len(reviews),
          'neighbourhood_sampling': t.neighbourhood_sampling,
          'train_step_examples_per_s': step['examples_per_s'],
          'ratio': round(rate / step['examples_per_s'], 2),
          'target_ratio': 10.0,
          'meets_target': rate >= 10 * step['examples_per_s']}
  print(json.dumps(line, sort_keys=True), flush=True)
  return {'benchmarks': [step, line]}


def run_data(config, workdir: str, keep: bool = False) -> dict[str, Any]:
  """Benchmarks synth then preprocess into `workdir/benchmark`.

  Args:
    config: the full config; `data.synth_preset` picks the size.
    workdir: where to write (about 17 GB for `full`).
    keep: keep the generated corpus and records afterwards.
  """
  root = os.path.join(workdir, 'benchmark')
  if os.path.exists(root):
    shutil.rmtree(root)
  os.makedirs(root)
  config = config.copy_and_resolve_references()
  config.data.mard_dir = os.path.join(root, 'mard')
  config.data.tfrecord_dir = os.path.join(root, 'records')
  os.makedirs(config.data.mard_dir)
  lines = []
  for name in ('synth', 'preprocess'):
    fn = functools.partial(modes.run_mode, name, force=True,
                           show_progress=False)
    line = measure(name, fn, (config, root))
    line.update(preset=config.data.synth_preset, cpus=os.cpu_count(),
                num_workers=config.data.num_workers)
    print(json.dumps(line, sort_keys=True), flush=True)
    lines.append(line)
    if not line['ok']:
      break
  if not keep:
    shutil.rmtree(root, ignore_errors=True)
  print(f'benchmark done: {len(lines)} stages', file=sys.stderr)
  return {'benchmarks': lines}


def run_index(config, workdir: str) -> dict[str, Any]:
  """Exact against HNSW top-10 search on a catalogue of
  `benchmark.index_vectors` unit vectors of `model.embed_dim` floats
  (`workdir` unused).

  The vectors are drawn around 1,000 centres, as trained embeddings cluster
  by genre and artist; queries are drawn the same way. Reports build time,
  per-query latency (one query at a time, as the server asks) and HNSW's
  recall@10 against the exact answer, at the config's HNSW settings.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mardjax.serve import search_index  # pylint: disable=g-import-not-at-top
  b, e = config.benchmark, config.export
  rng = np.random.default_rng(0)
  dim = config.model.embed_dim

  def draw(n, centres):
    x = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.normal(
        size=(n, dim)).astype(np.float32) / np.sqrt(dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)

  centres = rng.normal(size=(1000, dim)).astype(np.float32)
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  bank = np.concatenate([draw(100_000, centres) for _ in range(
      -(-b.index_vectors // 100_000))])[:b.index_vectors]
  queries = draw(b.index_queries, centres)
  exact = search_index.ExactIndex(bank)
  start = time.time()
  approx = search_index.HnswIndex.build(bank, e.hnsw_m,
                                        e.hnsw_ef_construction,
                                        e.hnsw_ef_search)
  build_s = time.time() - start

  def per_query(index):
    answers, times = [], []
    for q in queries:
      t0 = time.perf_counter()
      answers.append(index.search(q[None], 10)[0][0])
      times.append(time.perf_counter() - t0)
    return answers, 1000 * np.median(times)

  truth, exact_ms = per_query(exact)
  found, approx_ms = per_query(approx)
  recall = np.mean([len(set(a) & set(t)) / 10 for a, t in zip(found, truth)])
  line = {'benchmark': 'search_index', 'vectors': b.index_vectors,
          'embed_dim': dim, 'queries': b.index_queries,
          'exact_p50_ms': round(float(exact_ms), 2),
          'hnsw_p50_ms': round(float(approx_ms), 3),
          'speedup': round(float(exact_ms / approx_ms), 1),
          'hnsw_recall@10': round(float(recall), 4),
          'hnsw_build_s': round(build_s, 1), 'hnsw_m': e.hnsw_m,
          'hnsw_ef_construction': e.hnsw_ef_construction,
          'hnsw_ef_search': e.hnsw_ef_search}
  print(json.dumps(line, sort_keys=True), flush=True)
  return {'benchmarks': [line]}


def run_serve(config, workdir: str) -> dict[str, Any]:
  """The listening room over HTTP (`serve_benchmark`)."""
  from mardjax.experiments import serve_benchmark  # pylint: disable=g-import-not-at-top
  return serve_benchmark.run(config, workdir,
                             manifest_lib.data_dir_of(config, workdir),
                             modes.mard_dir(config, workdir))


def run_train_loop(config, workdir: str) -> dict[str, Any]:
  """The training loop end to end without TensorFlow (`train_loop`)."""
  from mardjax.experiments import train_loop  # pylint: disable=g-import-not-at-top
  return train_loop.run(config, workdir)


# config.benchmark.kind -> fn(config, workdir) -> {'benchmarks': [lines]}.
KINDS = {'data': run_data, 'train': run_train, 'pipeline': run_pipeline,
         'eval': run_eval, 'index': run_index, 'serve': run_serve,
         'train_loop': run_train_loop}
