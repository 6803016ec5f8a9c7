"""`launch.py --mode=benchmark`: the benchmark kinds (`KINDS`, chosen by
`config.benchmark.kind`), each printing JSON lines (never timed tests).

The registry reaches every kind; the kinds in modules of their own
(`serve_benchmark`, `train_loop`) share what they measure with this one
through `measuring`, and never import this module back.

`kind=data` runs each stage in a fresh child process and samples the
resident memory of the child and all its workers together
(`measuring.measure`), so the figures are what a user's machine sees:

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
import os
import shutil
import sys
import time
from typing import Any

from mardjax import stages
from mardjax.data import manifest as manifest_lib
from mardjax.errors import need
from mardjax.experiments import measuring


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
        line = measuring.train_step_throughput(one, encoder, steps,
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
  stages.preprocess(config, workdir, show_progress=False)
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
  from mardjax.train import train_step  # pylint: disable=g-import-not-at-top
  lazy = (train_step.embedding_update(config) == 'lazy'
          and config.model.text_encoder != 'pretrained')
  token_bucket = train_step.mean_token_bucket(config)
  for _, batch in itertools.islice(it, n):
    if lazy:
      sparse_embedding.compact_batch(batch, manifest.vocab.size,
                                     t.vocab_bucket,
                                     split_bag=train_step.split_bag(config))
    if token_bucket:
      two_branch.flat_review(np.minimum(batch['lengths'],
                                     batch['tokens'].shape[-1]), token_bucket)
  rate = n * t.batch_size / (time.time() - start)
  step = measuring.train_step_throughput(config, config.model.text_encoder,
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
  stage_fns = {'synth': stages.synthesize,
               'preprocess': functools.partial(stages.preprocess, force=True)}
  for name, fn in stage_fns.items():
    fn = functools.partial(fn, show_progress=False)
    line = measuring.measure(name, fn, (config, root))
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
  return serve_benchmark.benchmark_room(
      config, workdir, manifest_lib.data_dir_of(config, workdir),
      stages.mard_dir(config, workdir))


def run_train_loop(config, workdir: str) -> dict[str, Any]:
  """The training loop end to end without TensorFlow (`train_loop`)."""
  from mardjax.experiments import train_loop  # pylint: disable=g-import-not-at-top
  return train_loop.benchmark_train_loop(config, workdir)


# config.benchmark.kind -> fn(config, workdir) -> {'benchmarks': [lines]}. A
# new kind is a function here, or one here that imports its own module
# (imported when it runs, so that checking the kind loads no trainer).
KINDS = {'data': run_data, 'train': run_train, 'pipeline': run_pipeline,
         'eval': run_eval, 'index': run_index, 'serve': run_serve,
         'train_loop': run_train_loop}


def check_config(benchmark_config) -> None:
  """The benchmark fields that choose: `kind` (a key of `KINDS`) and the
  names in `embedding_updates` and `lstm_loops`.

  Raises:
    UserError: one line naming the field.
  """
  from mardjax import config_check  # pylint: disable=g-import-not-at-top
  from mardjax.models import two_branch  # pylint: disable=g-import-not-at-top
  b = benchmark_config
  need(b.kind in KINDS, 'benchmark.kind', b.kind,
       f'choose from {tuple(KINDS)}')
  for field, choices in (('embedding_updates', config_check.EMBEDDING_UPDATES),
                         ('lstm_loops', two_branch.LSTM_LOOPS)):
    for name in names(b[field]):
      need(name in choices, f'benchmark.{field}', b[field],
           f'{name!r} is none of {choices}')
