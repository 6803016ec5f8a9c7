"""Benchmark records, and the tables rendered from them.

Every `--mode=benchmark` run with `config.benchmark.results_dir` set appends
its measurements to `<results_dir>/<kind>.jsonl`, one JSON line each, every
line carrying the same `run` object: an id, the UTC date, the commit, the
machine (backend, CPU model or accelerator name, device count, host cores),
the versions of the libraries measured and the config fields that shape the
measurement. The records are the history; nothing overwrites them.

    python -m mardjax.experiments.results render [--results_dir docs/results]
        [--out docs/performance.md] [--readme README.md]

renders `docs/performance.md` from the records (for each benchmark kind and
machine, each measurement's figure from the newest run that took it, the
PyTorch peer's strongest figure of the same run beside ours) and replaces
the README's block between `BEGIN` and `END` with a headline table.
Rendering is a pure function of the records: running it again changes
nothing.
"""

import argparse
import datetime
import glob
import json
import os
import platform
import secrets
import subprocess
import sys
import textwrap
from typing import Any, Iterable

BEGIN = '<!-- results:begin -->'
END = '<!-- results:end -->'
PERFORMANCE_PAGE = 'docs/performance.md'

# Config fields that shape a measurement, recorded with every run.
RECORDED_FIELDS = (
    'benchmark.kind', 'benchmark.encoders', 'benchmark.batch_sizes',
    'benchmark.embedding_updates', 'benchmark.lstm_loops',
    'benchmark.min_seconds', 'benchmark.train_steps',
    'benchmark.train_loop_steps', 'benchmark.pipeline_batches',
    'benchmark.eval_albums', 'benchmark.eval_reviews',
    'benchmark.index_vectors', 'data.synth_preset', 'data.max_len',
    'data.vocab_size', 'model.text_encoder', 'model.word_dim',
    'model.lstm_dim', 'model.lstm_loop', 'train.batch_size',
    'train.embedding_update', 'train.batch_assembly',
    'train.compute_dtype', 'train.steps_per_dispatch',
    'train.prefetch_batches', 'train.parallelism')
LIBRARIES = ('jax', 'jaxlib', 'flax', 'optax', 'numpy')


# --- What a record says about its run -------------------------------------


def cpu_model() -> str:
  """The CPU's model name (`/proc/cpuinfo`, else the platform's word)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or 'unknown'


def machine() -> dict[str, Any]:
  """The machine a run measures: backend, CPU, accelerator, counts."""
  import jax  # pylint: disable=g-import-not-at-top
  import psutil  # pylint: disable=g-import-not-at-top
  backend = jax.default_backend()
  out = {'backend': backend, 'cpu': cpu_model(),
         'device_count': jax.device_count(), 'host_cores': os.cpu_count(),
         'memory_gib': round(psutil.virtual_memory().total / 2**30, 1)}
  if backend != 'cpu':
    out['device_kind'] = jax.devices()[0].device_kind
  return out


def versions(torch: str | None = None) -> dict[str, str]:
  """Python's and the measured libraries' versions (torch: the peer's)."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  out = {'python': platform.python_version()}
  for name in LIBRARIES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = 'not installed'
  if torch:
    out['torch'] = torch
  return out


def _git(root: str, *args: str) -> str:
  return subprocess.run(['git', '-C', root, *args], capture_output=True,
                        text=True, check=True, timeout=30).stdout.strip()


def commit(root: str | None = None) -> str:
  """`git rev-parse --short HEAD` of the checkout holding the package,
  '-dirty' when tracked files changed; 'unknown' outside a checkout."""
  root = root or os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  try:
    head = _git(root, 'rev-parse', '--short', 'HEAD')
    dirty = _git(root, 'status', '--porcelain', '--untracked-files=no')
  except (OSError, subprocess.SubprocessError):
    return 'unknown'
  return head + ('-dirty' if dirty else '') if head else 'unknown'


def utc_now() -> str:
  """The UTC date and time, ISO 8601 to the second ('...Z')."""
  return datetime.datetime.now(datetime.timezone.utc).strftime(
      '%Y-%m-%dT%H:%M:%SZ')


def config_fields(config) -> dict[str, Any]:
  """The `RECORDED_FIELDS` a config has, by dotted name."""
  out = {}
  for name in RECORDED_FIELDS:
    node = config
    for part in name.split('.'):
      node = node.get(part) if hasattr(node, 'get') else None
    if node is not None:
      out[name] = list(node) if isinstance(node, tuple) else node
  return out


def new_run(config, kind: str, date: str | None = None,
            torch: str | None = None) -> dict[str, Any]:
  """The `run` object every line of one run carries.

  Args:
    config: the run's config.
    kind: `benchmark.kind`.
    date: when the run started (UTC ISO); None: now.
    torch: the peer's torch version, when the peer ran.
  """
  date = date or utc_now()
  head = commit()
  return {'id': f'{date}-{head}-{secrets.token_hex(3)}', 'kind': kind,
          'date': date, 'commit': head, 'machine': machine(),
          'versions': versions(torch), 'config': config_fields(config)}


def append(results_dir: str, kind: str, lines: Iterable[dict[str, Any]],
           run: dict[str, Any]) -> str:
  """Appends `lines`, each with `run`, to `<results_dir>/<kind>.jsonl`.

  Returns:
    The file's path.
  """
  os.makedirs(results_dir, exist_ok=True)
  path = os.path.join(results_dir, f'{kind}.jsonl')
  with open(path, 'a') as f:
    for line in lines:
      f.write(json.dumps(dict(line, run=run), sort_keys=True) + '\n')
  return path


def lines_of(result: dict[str, Any]) -> list[dict[str, Any]]:
  """A benchmark kind's measurements: its `benchmarks` list, else the
  result itself as one line."""
  if isinstance(result.get('benchmarks'), list):
    return [l for l in result['benchmarks'] if isinstance(l, dict)]
  return [result]


def record(config, kind: str, result: dict[str, Any],
           date: str | None = None) -> str | None:
  """Appends a run's measurements where `benchmark.results_dir` says.

  Args:
    config: the run's config; `benchmark.results_dir` '' records nothing.
    kind: `benchmark.kind`.
    result: what the kind returned (`{'benchmarks': [lines]}` or one line).
    date: when the run started (UTC ISO).

  Returns:
    The records file, or None when nothing was recorded (no results_dir,
    or not the first process of a multi-process run).
  """
  results_dir = config.benchmark.get('results_dir', '')
  if not results_dir:
    return None
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return None
  lines = lines_of(result)
  torch = next((l['torch'] for l in lines if l.get('peer') and
                l.get('torch')), None)
  return append(results_dir, kind, lines, new_run(config, kind, date, torch))


# --- Reading records ------------------------------------------------------


def load(results_dir: str) -> dict[str, list[dict[str, Any]]]:
  """Every record under `results_dir`, by kind (the file's name)."""
  out = {}
  for path in sorted(glob.glob(os.path.join(results_dir, '*.jsonl'))):
    kind = os.path.basename(path)[:-len('.jsonl')]
    with open(path) as f:
      out[kind] = [json.loads(l) for l in f if l.strip()]
  return out


def machine_label(m: dict[str, Any]) -> str:
  """One machine's name in tables: accelerator or CPU model, with counts."""
  if m.get('device_kind'):
    return f"{m['device_count']} x {m['device_kind']} ({m.get('cpu', '?')})"
  return f"{m.get('cpu', 'unknown CPU')}, {m.get('host_cores', '?')} cores"


# A newer run's line replaces an older run's line (same machine) that has
# the same values of these keys: the same measurement, taken again.
ROW_IDENTITY = ('benchmark', 'encoder', 'text_encoder', 'batch_size',
                'embedding_update', 'lstm_loop', 'preset', 'vectors',
                'reviews', 'albums', 'devices', 'parallelism',
                'optimizer_sharding')

Run = tuple[dict[str, Any], list[dict[str, Any]]]  # (run, its lines)


def machines(lines: list[dict[str, Any]]) -> dict[str, list[Run]]:
  """Each machine's runs (by `machine_label`), newest first: the latest
  start date, then the larger id."""
  runs, by_run = {}, {}
  for line in lines:
    runs[line['run']['id']] = line['run']
    by_run.setdefault(line['run']['id'], []).append(line)
  out = {}
  for run in sorted(runs.values(), key=lambda r: (r['date'], r['id']),
                    reverse=True):
    out.setdefault(machine_label(run['machine']), []).append(
        (run, by_run[run['id']]))
  return out


def newest_rows(runs: list[Run]) -> list[tuple[dict[str, Any], dict[str, Any],
                                               list[dict[str, Any]]]]:
  """(run, line, the run's lines): each measurement's figure from the
  newest of `runs` (newest first) that took it (`ROW_IDENTITY`)."""
  seen, out = set(), []
  for run, lines in runs:
    for line in filter(is_measurement, lines):
      identity = tuple(json.dumps(line.get(k), sort_keys=True)
                       for k in ROW_IDENTITY)
      if identity not in seen:
        seen.add(identity)
        out.append((run, line, lines))
  return out


def _encoder(line: dict[str, Any]) -> str:
  return line.get('encoder') or line.get('benchmark', '').rsplit('_', 1)[-1]


def is_measurement(line: dict[str, Any]) -> bool:
  """Ours, and a figure (not a peer's, a skip or a failure)."""
  return not (line.get('peer') or 'skipped' in line or 'error' in line)


def strongest_peer(lines: list[dict[str, Any]], encoder: str,
                   batch_size: int) -> dict[str, Any] | None:
  """The fastest peer variant of a run at one encoder and batch size."""
  peers = [l for l in lines if l.get('peer') and 'error' not in l and
           'skipped' not in l and l.get('examples_per_s') and
           _encoder(l) == encoder and l.get('batch_size') == batch_size]
  return max(peers, key=lambda l: (l['examples_per_s'], l.get('variant', '')),
             default=None)


def speedup(ours: float | None, peer: float | None) -> float | None:
  """ours / peer, to 2 decimals; None without both."""
  if not ours or not peer:
    return None
  return round(ours / peer, 2)


# --- Rendering ------------------------------------------------------------

# kind -> (what it measures, its table's columns as (header, dotted key)).
KIND_TABLES: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    'train': (
        'The jitted train step alone on one device, timed for at least '
        '`benchmark.min_seconds` after compiling; with '
        '`benchmark.peer` set, the PyTorch peer\'s variants at the same '
        'encoder and batch size in the same run.',
        (('Encoder', 'encoder'), ('Batch', 'batch_size'),
         ('Embedding update', 'embedding_update'),
         ('Assembly', 'batch_assembly'), ('LSTM loop', 'lstm_loop'),
         ('Steps', 'steps'), ('Seconds', 'seconds'),
         ('Examples/s', 'examples_per_s'))),
    'train_loop': (
        'The training loop end to end (batching, step, logging, periodic '
        'evaluation, checkpoints) on tables of MARD\'s shape, against the '
        'same step alone in the same run.',
        (('Encoder', 'text_encoder'), ('Batch', 'batch_size'),
         ('Embedding update', 'embedding_update'), ('Steps', 'steps'),
         ('Loop examples/s', 'end_to_end_examples_per_s'),
         ('Step alone examples/s', 'step_examples_per_s'),
         ('Loop / step', 'end_to_end_share_of_step'),
         ('Loop / step, compile excluded',
          'share_of_step_excluding_compile'),
         ('Epoch s', 'epoch_s'))),
    'program': (
        'What the compiled train step is made of, for the plan an '
        'accelerator gets, compiled on the machine named (a property of '
        'the program, not a speed): top-level operations, fusions, '
        '`while` loops (those of the random-number generator\'s hash '
        'apart), sorts and XLA\'s estimates, beside a plain probe of the '
        'same model and loss.',
        (('Program', 'benchmark'), ('Batch', 'batch_size'), ('Ops', 'ops'),
         ('Fusions', 'fusions'), ('While loops', 'while_loops'),
         ('Of them the generator\'s', 'rng_while_loops'), ('Sorts', 'sorts'),
         ('GFLOP', 'gflop'), ('GB accessed', 'gb_accessed'),
         ('Ops / probe\'s', 'ops_vs_plain'))),
    'scaling': (
        'Per device count (forced host devices on a CPU), the state one '
        'device holds (parameters and optimizer state, and the optimizer '
        'state alone), the bytes of one step\'s collectives read from the '
        'compiled program, and the host\'s planning per step.',
        (('Devices', 'devices'), ('Parallelism', 'parallelism'),
         ('Optimizer state', 'optimizer_sharding'), ('Batch', 'batch_size'),
         ('State bytes / device', 'state_bytes_per_device'),
         ('State / one device\'s', 'state_share_of_one_device'),
         ('Optimizer bytes / device', 'optimizer_bytes_per_device'),
         ('Optimizer / one device\'s', 'optimizer_share_of_one_device'),
         ('Collective bytes / step', 'collective_bytes_per_step'),
         ('Collectives', 'collectives'), ('Host ms / step', 'host_ms_per_step'),
         ('Bytes / dispatch', 'bytes_per_dispatch'))),
    'pipeline': (
        'The input pipeline\'s examples/s against the train step\'s.',
        (('Benchmark', 'benchmark'), ('Batch', 'batch_size'),
         ('Examples/s', 'examples_per_s'), ('Ratio to the step', 'ratio'))),
    'eval': (
        'Recall metrics with bootstrap intervals, both directions, after '
        'embedding, at MARD\'s test scale.',
        (('Reviews', 'reviews'), ('Albums', 'albums'),
         ('Bootstrap', 'bootstrap'), ('Review to album s',
                                      'review_to_album_s'),
         ('Total s', 'wall_s'))),
    'index': (
        'Exact against HNSW top-10 search, one query at a time.',
        (('Vectors', 'vectors'), ('Exact p50 ms', 'exact_p50_ms'),
         ('HNSW p50 ms', 'hnsw_p50_ms'), ('HNSW recall@10',
                                          'hnsw_recall@10'),
         ('HNSW build s', 'hnsw_build_s'))),
    'serve': (
        'The listening room over HTTP on a trained model.',
        (('Text query p50 ms', 'text_query.p50_ms'),
         ('Upload wav p50 ms', 'upload_wav.p50_ms'),
         ('Upload mp3 p50 ms', 'upload_mp3.p50_ms'),
         ('Text queries/s', 'load.requests_per_s'),
         ('Clients', 'load.clients'), ('Startup s', 'server_startup_s'))),
    'data': (
        'Generating the synthetic corpus and preprocessing it, in a child '
        'process whose resident memory (with its workers\') is sampled.',
        (('Stage', 'benchmark'), ('Preset', 'preset'), ('Wall s', 'wall_s'),
         ('Peak RSS MB', 'peak_rss_mb'), ('Workers', 'num_workers'),
         ('Done', 'ok'))),
}
PEER_HEADERS = ('Peer (strongest)', 'Peer examples/s', 'Speedup')
HEADLINES = (('mean', 'Train step, mean encoder'),
             ('lstm', 'Train step, LSTM encoder'))


def _at(line: dict[str, Any], key: str) -> Any:
  node = line
  for part in key.split('.'):
    node = node.get(part) if isinstance(node, dict) else None
  return node


def times(ratio: float | None) -> str | None:
  """A speedup's cell: '2.50x'."""
  return None if ratio is None else f'{ratio:.2f}x'


def fmt(value: Any) -> str:
  """A table cell: numbers grouped and rounded, '-' for none."""
  if value is None or value == '':
    return '-'
  if isinstance(value, bool):
    return 'yes' if value else 'no'
  if isinstance(value, int):
    return f'{value:,}'
  if isinstance(value, float):
    if abs(value) >= 100:
      return f'{value:,.0f}'
    return f'{value:.1f}' if abs(value) >= 10 else f'{value:.3g}'
  return str(value).replace('|', '\\|').replace('\n', ' ')


def table(headers: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
  """A Markdown table."""
  headers = list(headers)
  out = ['| ' + ' | '.join(headers) + ' |',
         '|' + '---|' * len(headers)]
  out += ['| ' + ' | '.join(fmt(c) for c in row) + ' |' for row in rows]
  return '\n'.join(out)


def _columns(kind: str, lines: list[dict[str, Any]]
             ) -> tuple[tuple[str, str], ...]:
  """A kind's columns; unknown kinds: the benchmark and its numbers."""
  if kind in KIND_TABLES:
    return KIND_TABLES[kind][1]
  keys = sorted({k for l in lines for k, v in l.items() if k != 'run' and
                 isinstance(v, (int, float)) and not isinstance(v, bool)})
  return (('Benchmark', 'benchmark'),) + tuple((k, k) for k in keys)


def _row_key(line: dict[str, Any]) -> tuple:
  return tuple(json.dumps(line.get(k), sort_keys=True) for k in (
      'benchmark', 'encoder', 'text_encoder', 'batch_size',
      'embedding_update', 'lstm_loop', 'batch_assembly')) + (
          json.dumps(line, sort_keys=True),)


def rows_table(kind: str, rows: list[tuple[dict[str, Any], dict[str, Any],
                                           list[dict[str, Any]]]],
               numbers: dict[str, int] | None) -> str:
  """A machine's table: each of `rows` (`newest_rows`), the strongest peer
  variant of the same run beside it when a shown run timed the peer, and
  the run's number (`numbers`: run id -> number; None: one run)."""
  rows = sorted(rows, key=lambda r: _row_key(r[1]))
  columns = _columns(kind, [line for _, line, _ in rows])
  with_peer = any(l.get('peer') for _, _, lines in rows for l in lines)
  cells = []
  for run, line, lines in rows:
    row = [numbers[run['id']]] if numbers else []
    row += [_at(line, key) for _, key in columns]
    if with_peer:
      peer = strongest_peer(lines, _encoder(line), line.get('batch_size'))
      figure = peer and peer['examples_per_s']
      row += [peer and peer.get('variant'), figure, times(
          speedup(line.get('examples_per_s'), figure))]
    cells.append(row)
  headers = (['Run'] if numbers else []) + [h for h, _ in columns] + (
      list(PEER_HEADERS) if with_peer else [])
  return table(headers, cells)


def _note(line: dict[str, Any]) -> str:
  """A skipped or failed measurement, in one line."""
  if 'skipped' in line:
    return f"- skipped: {line['skipped']}: {line.get('why', '')}"
  what = ' '.join(str(x) for x in (
      line.get('benchmark'), line.get('variant'),
      line.get('batch_size') and f"at batch {line['batch_size']}") if x)
  why = str(line.get('error') or '').strip()
  return f"- failed: {what}: {why.splitlines()[-1][:300] if why else ''}"


def run_header(run: dict[str, Any]) -> str:
  """The run's id, date, commit and versions, in one paragraph."""
  m, v = run['machine'], run['versions']
  libs = ', '.join(f'{k} {v[k]}' for k in ('python',) + LIBRARIES + (
      'torch',) if k in v)
  return (f"Run `{run['id']}`, started {run['date']} at commit "
          f"`{run['commit']}`: {m.get('backend', '?')} backend, "
          f"{m.get('device_count', '?')} device(s), "
          f"{m.get('host_cores', '?')} host cores, "
          f"{m.get('memory_gib', '?')} GiB; {libs}.")


def machine_section(kind: str, label: str, runs: list[Run]) -> str:
  """One machine's part of a kind's section: the runs its figures come
  from (and its newest run, whatever it measured), then the table, then
  what those runs skipped or failed."""
  rows = newest_rows(runs)
  used = {run['id'] for run, _, _ in rows} | {runs[0][0]['id']}
  shown = [(run, lines) for run, lines in runs if run['id'] in used]
  numbers = ({run['id']: i + 1 for i, (run, _) in enumerate(shown)}
             if len(shown) > 1 else None)
  parts, notes = [f'### {label}'], []
  for run, lines in shown:
    tag = f"{numbers[run['id']]}. " if numbers else ''
    parts.append(tag + run_header(run))
    notes += [f"{_note(l)}{f' (run {tag[:-2]})' if tag else ''}"
              for l in lines if 'skipped' in l or 'error' in l]
  if rows:
    parts.append(rows_table(kind, rows, numbers))
  if notes:
    parts.append('\n'.join(sorted(notes)))
  return '\n\n'.join(parts)


def kind_section(kind: str, lines: list[dict[str, Any]]) -> str:
  """A kind's section: per machine, each measurement's newest figure."""
  about = KIND_TABLES.get(kind, ('', ()))[0]
  parts = [f'## `kind={kind}`', textwrap.fill(about, 76)]
  parts += [machine_section(kind, label, runs)
            for label, runs in sorted(machines(lines).items())]
  return '\n\n'.join(p for p in parts if p)


INTRO = """\
# Performance

Generated by `python -m mardjax.experiments.results render` from the
benchmark records in `{results_dir}/*.jsonl`; do not edit it by hand. For
each benchmark kind and machine it shows the newest run; the records keep
every run, so the history is there for anyone who wants it.

To add a record, run a benchmark with `--config.benchmark.results_dir`, then
render again:

    python launch.py --config configs/default.py --workdir /tmp/bench \\
      --mode=benchmark --config.benchmark.kind=train \\
      --config.benchmark.results_dir={results_dir} \\
      --config.benchmark.peer=PATH/TO/torch_twobranch.py
    python -m mardjax.experiments.results render

`--config.benchmark.peer` (kind=train) times the PyTorch peer's variants in
the same run; Speedup is our examples/s over its strongest variant's at the
same encoder and batch size.
"""


def render_performance(records: dict[str, list[dict[str, Any]]],
                       results_dir: str = 'docs/results') -> str:
  """docs/performance.md's text."""
  intro = INTRO.format(results_dir=results_dir)
  if not any(records.values()):
    return intro + '\nNo benchmark records yet.\n'
  order = [k for k in KIND_TABLES if records.get(k)] + sorted(
      k for k in records if k not in KIND_TABLES and records[k])
  return intro + '\n' + '\n\n'.join(
      kind_section(k, records[k]) for k in order) + '\n'


def _headline_step(lines: list[dict[str, Any]], encoder: str,
                   batch_size: int) -> dict[str, Any] | None:
  """Our fastest line at one encoder and batch size, among the config's
  own variants (`config_default`) when the run marked any."""
  ours = [l for l in lines if is_measurement(l) and _encoder(l) == encoder
          and l.get('batch_size') == batch_size and l.get('examples_per_s')]
  own = [l for l in ours if l.get('config_default')] or ours
  return max(own, key=lambda l: (l['examples_per_s'], _row_key(l)),
             default=None)


def headline_rows(records: dict[str, list[dict[str, Any]]]
                  ) -> list[list[Any]]:
  """Per machine, the newest figure of each headline benchmark: the train
  step of each encoder at its run's `train.batch_size` beside the peer's,
  and the training loop's examples/s as a fraction of the step alone."""
  rows = []
  for label, runs in machines(records.get('train', [])).items():
    for order, (encoder, name) in enumerate(HEADLINES):
      for run, lines in runs:
        batch = run.get('config', {}).get('train.batch_size')
        ours = _headline_step(lines, encoder, batch)
        if ours:
          peer = strongest_peer(lines, encoder, batch)
          figure = peer and peer['examples_per_s']
          rows.append((order, label, [
              f'{name}, batch {batch:,} (examples/s)',
              ours['examples_per_s'],
              figure and f"{fmt(figure)} ({peer.get('variant')})",
              times(speedup(ours['examples_per_s'], figure)), label,
              run['date'][:10]]))
          break
  for label, runs in machines(records.get('train_loop', [])).items():
    for run, line, _ in newest_rows(runs):
      rows.append((len(HEADLINES), label, [
          f"Training loop / step alone, {line.get('text_encoder')} encoder,"
          f" batch {line.get('batch_size'):,}",
          line.get('end_to_end_share_of_step'), None, None, label,
          run['date'][:10]]))
  return [cells for *_, cells in sorted(rows, key=lambda r: (
      r[0], r[1], json.dumps(r[2])))]


def render_headline(records: dict[str, list[dict[str, Any]]],
                    link: str = PERFORMANCE_PAGE) -> str:
  """The README's results block (between `BEGIN` and `END`)."""
  rows = headline_rows(records)
  more = ('All figures, per machine, with versions and commits: '
          f'[{link}]({link}).')
  if not rows:
    return f'No benchmark records yet; [{link}]({link}) says how to make them.'
  return table(('Benchmark', 'mardjax', 'PyTorch peer (strongest)',
                'Speedup', 'Machine', 'Date'), rows) + '\n\n' + more


def replace_block(text: str, block: str) -> str | None:
  """`text` with the lines between the `BEGIN` and `END` marker lines
  replaced by `block`; None without both markers in that order."""
  lines = text.split('\n')
  try:
    begin = next(i for i, l in enumerate(lines) if l.strip() == BEGIN)
    end = next(i for i, l in enumerate(lines) if l.strip() == END and
               i > begin)
  except StopIteration:
    return None
  return '\n'.join(lines[:begin + 1] + block.split('\n') + lines[end:])


def _write(path: str, text: str) -> None:
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)


def render(results_dir: str, out: str, readme: str | None) -> None:
  """Writes the performance page and the README's block from the records.

  Args:
    results_dir: the records' folder (`<kind>.jsonl` files).
    out: the performance page to write.
    readme: the README whose results block to replace ('' or None: none).
      Without both markers it is left alone, and stderr says so.
  """
  records = load(results_dir)
  _write(out, render_performance(records, results_dir))
  if not readme:
    return
  if not os.path.exists(readme):
    print(f'{readme} not found: no results block written.', file=sys.stderr)
    return
  with open(readme) as f:
    text = f.read()
  link = os.path.relpath(out, os.path.dirname(os.path.abspath(readme)) or '.')
  new = replace_block(text, render_headline(records, link))
  if new is None:
    print(f'{readme} has no {BEGIN} ... {END} lines: left unchanged.',
          file=sys.stderr)
  elif new != text:
    _write(readme, new)


def main(argv: list[str] | None = None) -> int:
  """`python -m mardjax.experiments.results render [...]`."""
  parser = argparse.ArgumentParser(
      prog='python -m mardjax.experiments.results',
      description='Renders docs/performance.md and the README results block '
      'from the benchmark records.')
  sub = parser.add_subparsers(dest='command', required=True)
  cmd = sub.add_parser('render', help='write the tables from the records')
  cmd.add_argument('--results_dir', default='docs/results')
  cmd.add_argument('--out', default=PERFORMANCE_PAGE)
  cmd.add_argument('--readme', default='README.md',
                   help="'' to leave the README alone")
  args = parser.parse_args(argv)
  render(args.results_dir, args.out, args.readme)
  return 0


if __name__ == '__main__':
  sys.exit(main())
