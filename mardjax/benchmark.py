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
import json
import multiprocessing
import os
import shutil
import sys
import time
from typing import Any, Callable

import psutil

# Targets from the data issue, for the `full` preset on a 2-core machine.
TARGETS = {'synth': {'wall_s': 600},
           'preprocess': {'wall_s': 600, 'peak_rss_mb': 4096}}


def _stage_main(fn: Callable[..., dict[str, Any]], args: tuple, queue) -> None:
  try:
    queue.put(('ok', fn(*args)))
  except BaseException as e:  # pylint: disable=broad-except
    queue.put(('error', f'{type(e).__name__}: {e}'))


def _tree_rss(proc: psutil.Process) -> int:
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
      peak = max(peak, _tree_rss(watched))
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


def run(config, workdir: str, run_mode: Callable,
        keep: bool = False) -> dict[str, Any]:
  """Benchmarks synth then preprocess into `workdir/benchmark`.

  Args:
    config: the full config; `data.synth_preset` picks the size.
    workdir: where to write (about 17 GB for `full`).
    run_mode: `mardjax.app.run_mode`.
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
    fn = functools.partial(run_mode, name, force=True, show_progress=False)
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
