"""`benchmark.kind=scaling`: what one step costs each device and the host
as the device count grows, read from the compiled program.

For each count N of `benchmark.scaling_devices` and each parallel form of
`benchmark.scaling_forms` ('pmap': the state replicated; 'shard_map': the
optimizer state sharded where the plan shards it) a child process is
started with N devices (on a CPU, N forced host devices:
`--xla_force_host_platform_device_count`), which builds training's own
step for the plan N devices of `benchmark.program_backend` get, at the
config's global batch, compiles it (one step, the batch assembled on the
devices), and prints one line:

  * `state_bytes_per_device`: the parameters and optimizer state one
    device holds;
  * `collective_bytes_per_step`: the bytes the step's collectives
    (all-reduce, all-gather, reduce-scatter, all-to-all,
    collective-permute) produce on one device, from the compiled program,
    and `collectives`, how many there are;
  * `host_ms_per_step` and `bytes_per_dispatch`: the host's planning per
    step and what a dispatch sends (`train_loop.host_planning`, on tables
    of `benchmark.loop_*` size);
  * `optimizer_bytes_per_device`: of them, the optimizer state's (Adam's
    moments and count, the lazy update's included);
  * `state_share_of_one_device` and `optimizer_share_of_one_device`:
    those bytes over the one-device figures of the same run (replicated
    state: 1.0; the optimizer state sharded over N devices: towards 1/N,
    the small leaves it keeps whole aside).
"""

import json
import os
import re
import subprocess
import sys
from typing import Any

import numpy as np

from mardjax.errors import UserError

COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
               'collective-permute')
_BYTES = {'f64': 8, 's64': 8, 'u64': 8, 'f32': 4, 's32': 4, 'u32': 4,
          'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 's8': 1, 'u8': 1,
          'pred': 1}


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape's text: 'f32[4,8]{1,0}' or a tuple of them."""
  total = 0
  for dtype, dims in re.findall(r'\b([a-z]+\d*)\[([\d,]*)\]', shape):
    if dtype in _BYTES:
      total += _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(',')
                                            if d] or [1]))
  return total


def collective_bytes(hlo: str) -> tuple[int, int]:
  """(bytes the collectives of an HLO module's text produce, how many)
  (the `-start` halves of asynchronous ones counted, their `-done`
  halves not)."""
  from mardjax.experiments import program  # pylint: disable=g-import-not-at-top
  total = count = 0
  for parsed in map(program.instruction, hlo.splitlines()):
    if parsed is None:
      continue
    shape, op = parsed
    if op.removesuffix('-start') in COLLECTIVES:
      count += 1
      total += shape_bytes(shape)
  return total, count


def _bytes_per_device(tree) -> int:
  """Bytes of `tree` on one device: a placed array's first shard, a host
  array whole (pmap copies it to every device)."""
  import jax  # pylint: disable=g-import-not-at-top
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    shards = getattr(x, 'addressable_shards', None)
    total += int(shards[0].data.nbytes if shards else np.asarray(x).nbytes)
  return total


def child(config, devices: int) -> dict[str, Any]:
  """The line for `devices` devices and the config's parallelism, in a
  process that has them."""
  import jax  # pylint: disable=g-import-not-at-top
  from mardjax.experiments import program  # pylint: disable=g-import-not-at-top
  from mardjax.experiments import train_loop  # pylint: disable=g-import-not-at-top
  from mardjax.train import step_builder  # pylint: disable=g-import-not-at-top
  if jax.local_device_count() != devices:
    raise RuntimeError(f'{jax.local_device_count()} devices, not {devices}')
  b = config.benchmark
  fn, args, plan = program.our_step(
      config, config.train.batch_size, config.data.vocab_size + 2,
      b.program_backend, devices)
  state = args[0]
  optimizer_bytes = _bytes_per_device((state.opt_state, state.embed_opt))
  state_bytes = _bytes_per_device(state.params) + optimizer_bytes
  compiled = fn.lower(*args).compile()
  hlo = compiled.as_text()
  moved, count = collective_bytes(hlo)
  data, _ = train_loop.synthetic_data(config)
  widths = step_builder.positive_widths(config, plan, data.reviews,
                                        data.audio)
  host = train_loop.host_planning(config, plan, data, widths)
  return dict(
      {'benchmark': 'scaling', 'devices': devices,
       'device': jax.devices()[0].platform, 'plan_backend': plan.backend,
       'parallelism': plan.parallelism,
       'optimizer_sharding': plan.optimizer_sharding,
       'batch_size': config.train.batch_size,
       'embedding_update': plan.embedding_update,
       'state_bytes_per_device': state_bytes,
       'optimizer_bytes_per_device': optimizer_bytes,
       'collective_bytes_per_step': moved, 'collectives': count,
       'ops': program.hlo_counts(hlo)['ops']}, **host)


def run_scaling(config, workdir: str) -> dict[str, Any]:
  """One line per device count of `benchmark.scaling_devices` and form of
  `benchmark.scaling_forms`, each from a child process with that many
  devices (one device: one line, the single-device step)."""
  del workdir
  b = config.benchmark
  counts = [int(x) for x in b.scaling_devices.split(',') if x.strip()]
  if not counts or min(counts) < 1:
    raise UserError('config.benchmark.scaling_devices: device counts of 1 '
                    f'or more, comma-separated (got '
                    f'{b.scaling_devices!r}).')
  forms = [x.strip() for x in b.scaling_forms.split(',') if x.strip()]
  if not forms or set(forms) - {'pmap', 'shard_map'}:
    raise UserError("config.benchmark.scaling_forms: 'pmap' and/or "
                    f"'shard_map', comma-separated (got {b.scaling_forms!r}).")
  lines = []
  root = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  for n, form in [(n, f) for n in counts for f in (forms[:1] if n == 1
                                                    else forms)]:
    env = dict(os.environ)
    flags = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                     if 'force_host_platform_device_count' not in f)
    env['XLA_FLAGS'] = (
        f'{flags} --xla_force_host_platform_device_count={n}').strip()
    code = ('import json, sys, ml_collections\n'
            'from mardjax.experiments import scaling\n'
            'config = ml_collections.ConfigDict(json.loads(sys.stdin.read()))\n'
            f'print(json.dumps(scaling.child(config, {n})))\n')
    form_config = config.copy_and_resolve_references()
    form_config.train.parallelism = form
    proc = subprocess.run([sys.executable, '-c', code], cwd=root, env=env,
                          input=form_config.to_json(), capture_output=True,
                          text=True, timeout=1800)
    out = [l for l in proc.stdout.splitlines() if l.startswith('{')]
    if proc.returncode or not out:
      tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
      line = {'benchmark': 'scaling', 'devices': n, 'parallelism': form,
              'error': f'exit code {proc.returncode}: {tail}'}
    else:
      line = json.loads(out[-1])
    lines.append(line)
  one = next((l for l in lines if l.get('devices') == 1
              and 'state_bytes_per_device' in l), None)
  for line in lines:
    if one and 'state_bytes_per_device' in line:
      for k in ('state', 'optimizer'):
        line[f'{k}_share_of_one_device'] = round(
            line[f'{k}_bytes_per_device'] / one[f'{k}_bytes_per_device'], 3)
    print(json.dumps(line, sort_keys=True), flush=True)
  return {'benchmarks': lines}
