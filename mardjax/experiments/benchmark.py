"""`launch.py --mode=benchmark`: the benchmark kinds (`KINDS`, chosen by
`config.benchmark.kind`), each printing JSON lines (never timed tests).

The registry reaches every kind; the kinds in modules of their own
(`serve_benchmark`, `train_loop`) share what they measure with this one
through `measuring`, and never import this module back.

`kind=data` runs each stage in a fresh child process and samples the
resident memory of the child and all its workers together
(`measuring.measure`), so the figures are what a user's machine sees:

  * `synth`: generating the corpus of `config.data.synth_preset` (target
    for `full`: under 10 minutes);
  * `preprocess`: raw corpus -> TFRecords (target for `full`: under 10
    minutes and 4 GB peak resident memory on a laptop-class machine of two
    cores).

Each stage prints one JSON line to stdout as it finishes; the mode's result
(the last line) holds them all. Every kind of `KINDS` appends its lines to
`<benchmark.results_dir>/<kind>.jsonl` when that is set (`results.record`).
"""

import functools
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import psutil

from mardjax import stages
from mardjax.data import manifest as manifest_lib
from mardjax.errors import UserError
from mardjax.errors import need
from mardjax.experiments import measuring
from mardjax.experiments import results


def names(text: str) -> list[str]:
  """The names of a comma-separated config field."""
  return [x.strip() for x in text.split(',') if x.strip()]


# A train step's memory, bounded from above (`step_bytes`): a fixed cost
# (runtime, compiled programs, batch) plus the word table and its gradient
# and Adam moments, plus, per text position the step keeps for the backward
# pass, SAFETY x the floats named in `step_bytes`. SAFETY is calibrated on
# the peak resident memory of steps at small batch sizes: per position, the
# LSTM's measured cost is under twice its named floats, the mean encoder's
# under once; SAFETY leaves room above both.
FIXED_BYTES = 512 * 2**20
SAFETY = 3.0


def review_lengths(batch_size: int, max_len: int):
  """(batch_size,) review lengths of the benchmark's batch, drawn as
  `step_batch` (and the PyTorch peer) draw them."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  return np.clip(rng.lognormal(4.5, 0.7, batch_size), 1, max_len).astype(
      np.int64)


def text_positions(config, encoder: str, batch_size: int,
                   layout: str = '') -> int:
  """Text positions a step at `batch_size` computes: the real tokens
  (mean encoder; LSTM `layout='packed'`), mardjax's packed LSTM rows
  (`train.lstm_pack_rows`, rounded up; 0: padded to `max_len`), or the
  batch padded to its longest review (`layout='padded'`)."""
  length = config.data.max_len
  lengths = review_lengths(batch_size, length)
  tokens = int(lengths.sum())
  if encoder != 'lstm' or layout == 'packed':
    return tokens
  if layout == 'padded':
    return batch_size * int(lengths.max())
  rows = config.train.lstm_pack_rows
  if not rows:
    return batch_size * length
  return -(-tokens // (rows * length)) * rows * length


def step_bytes(config, encoder: str, batch_size: int, layout: str = ''
               ) -> int:
  """A rough upper bound of the memory a train step at `batch_size` needs.

  Per text position (`text_positions`), the LSTM keeps each direction's
  input, gates before and after their nonlinearities and its cell and
  hidden states; the mean encoder keeps the word's embedding and its
  gradient. `layout`: as `text_positions` takes it ('' mardjax's own).
  """
  m = config.model
  table = (config.data.vocab_size + 2) * m.word_dim * 4
  if encoder == 'lstm':
    per_position = 2 * (m.word_dim + 10 * m.lstm_dim) * 4
  else:
    per_position = 2 * m.word_dim * 4
  host = 4 * batch_size * config.data.max_len * 4  # Padded batch arrays.
  return int(FIXED_BYTES + 4 * table + host + SAFETY * per_position *
             text_positions(config, encoder, batch_size, layout))


def available_bytes() -> int:
  """Memory a step may still take: the accelerator's, else the host's."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != 'cpu':
    stats = jax.devices()[0].memory_stats() or {}
    if 'bytes_limit' in stats:
      return int(stats['bytes_limit'] - stats.get('bytes_in_use', 0))
  return int(psutil.virtual_memory().available)


def memory_skip(what: str, needed: int, available: int) -> dict | None:
  """None when `needed` bytes fit in `available`; else the skip line, also
  printed to stdout."""
  if needed <= available:
    return None
  line = {'skipped': what, 'why': (
      f'needs about {needed / 2**30:.1f} GiB (a rough upper bound), '
      f'{available / 2**30:.1f} GiB available'),
          'need_gib': round(needed / 2**30, 1),
          'available_gib': round(available / 2**30, 1)}
  print(json.dumps(line, sort_keys=True), flush=True)
  return line


# The PyTorch peer's variants per encoder: (name, command-line switches).
PEER_VARIANTS = {'mean': (('dense', ()), ('sparse', ('--sparse',))),
                 'lstm': (('packed', ()), ('padded', ('--padded',)))}
PEER_PROBE_STEPS = 2  # The first run's timed steps (after its warm-up).
PEER_PROBE_TIMEOUT_S = 3600


def _peer_run(config, encoder: str, batch_size: int, switches: tuple,
              steps: int, timeout: float) -> dict[str, Any]:
  """The peer script's JSON line for one run; raises when it fails."""
  import jax  # pylint: disable=g-import-not-at-top
  device = 'cuda' if jax.default_backend() == 'gpu' else 'cpu'
  proc = subprocess.run(
      [sys.executable, config.benchmark.peer, encoder, '--steps', str(steps),
       '--batch', str(batch_size), '--max_len', str(config.data.max_len),
       '--vocab', str(config.data.vocab_size), '--device', device,
       *switches], capture_output=True, text=True, timeout=timeout,
      check=False)
  out = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode or not out:
    tail = proc.stderr.strip().splitlines() or ['no output']
    raise RuntimeError(f'exit code {proc.returncode}: {tail[-1]}')
  return json.loads(out[-1])


def peer_step(config, encoder: str, batch_size: int, variant: str,
              switches: tuple) -> dict[str, Any]:
  """One variant of the peer's train step, timed for at least
  `benchmark.min_seconds`: a run of `PEER_PROBE_STEPS` steps and, when
  those took less, a second run of enough steps. A failure (exit code,
  timeout, no JSON line) is the line's `error`, never an exception."""
  min_seconds = config.benchmark.min_seconds
  line = {'benchmark': f'peer_train_step_{encoder}', 'peer': True,
          'encoder': encoder, 'batch_size': batch_size,
          'variant': f'{encoder} {variant}'}
  try:
    steps = PEER_PROBE_STEPS
    out = _peer_run(config, encoder, batch_size, switches, steps,
                    PEER_PROBE_TIMEOUT_S)
    if steps * out['step_s'] < min_seconds:
      steps = math.ceil(1.05 * min_seconds / max(out['step_s'], 1e-6))
      # Its warm-up and steps at the probe's pace, three times over.
      timeout = 300 + 3 * (steps + 3) * out['step_s']
      out = _peer_run(config, encoder, batch_size, switches, steps, timeout)
  except (OSError, subprocess.SubprocessError, RuntimeError, ValueError,
          KeyError) as e:
    return dict(line, error=f'{type(e).__name__}: {e}')
  return dict(line, examples_per_s=out['examples_per_s'],
              step_s=out['step_s'], steps=steps,
              seconds=round(steps * out['step_s'], 2),
              peer_name=out.get('peer'), torch=out.get('torch'),
              threads=out.get('threads'), device=out.get('device'),
              tokens_per_batch=out.get('tokens_per_batch'))


def peer_lines(config, encoder: str, batch_size: int) -> list[dict]:
  """The peer's variants (`PEER_VARIANTS`) at one encoder and batch size,
  each in a subprocess; `strongest` marks the fastest. On CPUs a variant
  whose step would not fit in memory is skipped with a line saying why
  (an accelerator's memory is the peer's to report: a failure line)."""
  import jax  # pylint: disable=g-import-not-at-top
  lines = []
  for variant, switches in PEER_VARIANTS.get(encoder, ()):
    what = f'peer_train_step_{encoder} {variant} at batch {batch_size}'
    skip = jax.default_backend() == 'cpu' and memory_skip(
        what, step_bytes(config, encoder, batch_size, variant),
        available_bytes())
    lines.append(dict(skip, peer=True, encoder=encoder,
                      batch_size=batch_size, variant=f'{encoder} {variant}')
                 if skip else
                 peer_step(config, encoder, batch_size, variant, switches))
  best = results.strongest_peer(lines, encoder, batch_size)
  for line in lines:
    if 'examples_per_s' in line:
      line['strongest'] = line is best
    if 'skipped' not in line:  # Skips were printed when decided.
      print(json.dumps(line, sort_keys=True), flush=True)
  return lines


def _our_steps(config, encoder: str, batch_size: int,
               peer: dict | None) -> list[dict]:
  """Our lines at one encoder and batch size: one per embedding update
  and, for the LSTM, loop; `config_default` marks the config's own, and
  `speedup_vs_best_peer` compares with `peer` (the strongest variant's
  line) when the peer ran."""
  b = config.benchmark
  steps = b.train_steps if encoder != 'lstm' else max(2, b.train_steps // 10)
  updates = names(b.embedding_updates)
  loops = names(b.lstm_loops) if encoder == 'lstm' else []
  lines = []
  for update, loop in itertools.product(
      updates or [config.train.embedding_update],
      loops or [config.model.lstm_loop]):
    one = config.copy_and_resolve_references()
    one.train.batch_size, one.train.embedding_update = batch_size, update
    one.model.lstm_loop = loop
    line = measuring.train_step_throughput(one, encoder, steps,
                                 config.data.vocab_size + 2,
                                 min_seconds=b.min_seconds)
    line['config_default'] = not updates and not loops
    if peer:
      line['speedup_vs_best_peer'] = results.speedup(
          line['examples_per_s'], peer['examples_per_s'])
    print(json.dumps(line, sort_keys=True), flush=True)
    lines.append(line)
  return lines


def run_train(config, workdir: str) -> dict[str, Any]:
  """Train-step throughput: one line per text encoder
  (`benchmark.encoders`), batch size (`benchmark.batch_sizes`), embedding
  update (`benchmark.embedding_updates`; empty: the config's) and, for the
  LSTM, loop (`benchmark.lstm_loops`; empty: the config's
  `model.lstm_loop`), each timed for at least `benchmark.min_seconds`
  after `benchmark.train_steps` steps (the LSTM a tenth, at least 2).

  An encoder and batch size whose step would not fit in memory
  (`step_bytes` against `available_bytes`) is skipped with one line that
  says why. With `benchmark.peer` set, the PyTorch peer's variants at the
  same sizes run first (`peer_lines`), and our lines carry
  `speedup_vs_best_peer`.
  """
  del workdir
  b = config.benchmark
  if b.peer and not os.path.isfile(b.peer):
    raise UserError(f'config.benchmark.peer={b.peer!r}: no such file.')
  lines = []
  for encoder in names(b.encoders):
    for batch_size in (int(x) for x in names(b.batch_sizes)):
      skip = memory_skip(f'train_step_{encoder} at batch {batch_size}',
                         step_bytes(config, encoder, batch_size),
                         available_bytes())
      if skip:
        lines.append(dict(skip, encoder=encoder, batch_size=batch_size))
        continue
      peers = peer_lines(config, encoder, batch_size) if b.peer else []
      best = results.strongest_peer(peers, encoder, batch_size)
      lines += peers + _our_steps(config, encoder, batch_size, best)
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
  from mardjax.models import layouts  # pylint: disable=g-import-not-at-top
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
      reviews_per_album=t.reviews_per_album, fill=t.fill_groups)
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
      layouts.flat_review(np.minimum(batch['lengths'],
                                        batch['tokens'].shape[-1]),
                             plan.token_bucket)
  rate = n * t.batch_size / (time.time() - start)
  step = measuring.train_step_throughput(config, config.model.text_encoder,
                               config.benchmark.train_steps,
                               config.data.vocab_size + 2,
                               min_seconds=config.benchmark.min_seconds)
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


def run_program(config, workdir: str) -> dict[str, Any]:
  """What the compiled step is made of (`program`)."""
  from mardjax.experiments import program  # pylint: disable=g-import-not-at-top
  return program.run_program(config, workdir)


def run_scaling(config, workdir: str) -> dict[str, Any]:
  """Per-device state, collectives and host work by device count
  (`scaling`)."""
  from mardjax.experiments import scaling  # pylint: disable=g-import-not-at-top
  return scaling.run_scaling(config, workdir)


def run_train_loop(config, workdir: str) -> dict[str, Any]:
  """The training loop end to end without TensorFlow (`train_loop`)."""
  from mardjax.experiments import train_loop  # pylint: disable=g-import-not-at-top
  return train_loop.benchmark_train_loop(config, workdir)


# config.benchmark.kind -> fn(config, workdir) -> {'benchmarks': [lines]}
# (or one line), the measurement alone.
RUNNERS = {'data': run_data, 'train': run_train, 'pipeline': run_pipeline,
           'eval': run_eval, 'index': run_index, 'serve': run_serve,
           'train_loop': run_train_loop, 'program': run_program,
           'scaling': run_scaling}


def run_recorded(kind: str, config, workdir: str) -> dict[str, Any]:
  """Runs a benchmark kind and appends its lines to
  `<benchmark.results_dir>/<kind>.jsonl` when that is set."""
  started = results.utc_now()
  result = RUNNERS[kind](config, workdir)
  path = results.record(config, kind, result, started)
  if path:
    print(f'benchmark records appended to {path}', file=sys.stderr)
  return result


def run_kind(config, workdir: str) -> dict[str, Any]:
  """`--mode=benchmark`: the kind `config.benchmark.kind` names, recorded."""
  return run_recorded(config.benchmark.kind, config, workdir)


# The same kinds, each recording its run (what `--mode=benchmark` calls).
KINDS = {kind: functools.partial(run_recorded, kind) for kind in RUNNERS}


def check_config(benchmark_config) -> None:
  """The benchmark fields that choose: `kind` (a key of `KINDS`) and the
  names in `embedding_updates` and `lstm_loops`.

  Raises:
    UserError: one line naming the field.
  """
  from mardjax import plan as plan_lib  # pylint: disable=g-import-not-at-top
  b = benchmark_config
  need(b.kind in KINDS, 'benchmark.kind', b.kind,
       f'choose from {tuple(KINDS)}')
  for field, choices in (('embedding_updates', plan_lib.EMBEDDING_UPDATES),
                         ('lstm_loops', plan_lib.LSTM_LOOPS)):
    for name in names(b[field]):
      need(name in choices, f'benchmark.{field}', b[field],
           f'{name!r} is none of {choices}')
