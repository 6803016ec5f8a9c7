"""The benchmark mode prints well-formed JSON lines (figures not asserted)."""

import json

import numpy as np
import pytest

from configs import test as test_config
from mardjax import modes
from mardjax.experiments import benchmark
from mardjax.experiments import measuring
from tests.conftest import ROOT


@pytest.mark.slow
def test_data_benchmark_measures_both_stages(tmp_path, capsys):
  config = test_config.get_config()
  result = benchmark.run_data(config, str(tmp_path))
  names = [line['benchmark'] for line in result['benchmarks']]
  assert names == ['synth', 'preprocess']
  for line in result['benchmarks']:
    assert line['ok'] and line['wall_s'] > 0 and line['peak_rss_mb'] > 0
    assert isinstance(line['meets_targets'], bool)
  assert result['benchmarks'][1]['result']['tracks'] == 180
  assert capsys.readouterr().out.count('"benchmark"') == 2


@pytest.mark.slow
@pytest.mark.parametrize('assembly', ['host', 'device'])
def test_train_step_benchmark_line(assembly):
  config = test_config.get_config()
  config.train.batch_assembly = assembly
  line = measuring.train_step_throughput(config, 'mean', steps=2,
                                         vocab_size=100)
  assert line['benchmark'] == 'train_step_mean'
  assert (line['embedding_update'], line['batch_assembly']) == (
      'lazy', assembly)
  assert line['examples_per_s'] > 0 and line['target_examples_per_s'] == 3000


@pytest.mark.slow
def test_train_benchmark_lines_per_encoder_batch_and_update(tmp_path,
                                                           capsys):
  config = test_config.get_config()
  config.benchmark.update(kind='train', encoders='mean,lstm',
                          batch_sizes='8,16', embedding_updates='lazy,dense',
                          train_steps=2, min_seconds=0.0)
  result = modes.run_mode('benchmark', config, str(tmp_path))
  got = [(l['benchmark'], l['batch_size'], l['embedding_update'],
          l['batch_assembly']) for l in result['benchmarks']]
  # Assembled where training would: 'auto' keeps lazy on this CPU's host.
  assert got == [(f'train_step_{e}', b, u, a) for e in ('mean', 'lstm')
                 for b in (8, 16)
                 for u, a in (('lazy', 'host'), ('dense', 'device'))]
  assert capsys.readouterr().out.count('"benchmark"') == 8


@pytest.mark.slow
def test_train_benchmark_lines_per_lstm_loop(tmp_path):
  config = test_config.get_config()
  config.benchmark.update(kind='train', encoders='mean,lstm', batch_sizes='8',
                          lstm_loops='per_direction,bidirectional',
                          train_steps=2, min_seconds=0.0)
  result = modes.run_mode('benchmark', config, str(tmp_path))
  # The loops are the LSTM's: the mean encoder's line is one, unmarked.
  assert [(l['benchmark'], l.get('lstm_loop')) for l in result['benchmarks']
          ] == [('train_step_mean', None),
                ('train_step_lstm', 'per_direction'),
                ('train_step_lstm', 'bidirectional')]


def test_step_timing_runs_until_its_minimum_time(monkeypatch):
  """`measuring._timed`: the asked-for dispatches, then a round sized by
  the rate so far until the minimum time has passed (on a fake clock:
  each dispatch takes 10 ms of it)."""
  clock, calls = [0.0], []
  monkeypatch.setattr(measuring.time, 'time', lambda: clock[0])

  def step(state):
    calls.append(state)
    clock[0] += 0.01
    return state + 1, np.zeros(())
  assert measuring._timed(step, 0, 3, 0.0) == (3, pytest.approx(0.03))
  calls.clear()
  # 3 take 0.03 s; the remaining 0.07 s, 5% over, are 8 more.
  assert measuring._timed(step, 0, 3, 0.1) == (11, pytest.approx(0.11))
  assert calls == list(range(11))  # Each dispatch takes the last state.
  # A minimum of 5 s is reached in one more round, 5% over at most (not
  # by doubling, up to twice over).
  done, wall = measuring._timed(step, 0, 30, 5.0)
  assert 5.0 <= wall <= 5.0 + 0.05 * 4.7 + 0.01 and done == round(wall / 0.01)


def test_the_memory_bound_reads_the_benchmarks_own_batch():
  config = test_config.get_config()
  for b in (8, 100):
    config.train.batch_size = b
    _, reviews, _ = measuring.step_batch(config, 100)
    np.testing.assert_array_equal(
        benchmark.review_lengths(b, config.data.max_len), reviews.lengths)


FAKE_PEER = """
import json, sys
args = sys.argv[1:]
if '--padded' in args:
  sys.exit('out of memory')
steps = int(args[args.index('--steps') + 1])
batch = int(args[args.index('--batch') + 1])
step_s = 0.004 if '--sparse' in args else 0.01
print('warming up')
print(json.dumps({'peer': 'fake', 'encoder': args[0], 'batch': batch,
                  'step_s': step_s, 'examples_per_s': batch / step_s,
                  'steps_asked': steps, 'torch': '0.0-fake'}))
"""


def test_the_peer_runs_in_the_same_run_and_failures_are_lines(tmp_path,
                                                              capsys):
  """`benchmark.peer`: each variant in a subprocess, long enough for
  `min_seconds` (a 2-step probe, then enough steps), the fastest marked,
  a failing variant an error line, our lines compared with the fastest;
  and the run's records carry the peer's torch version."""
  peer = tmp_path / 'peer.py'
  peer.write_text(FAKE_PEER)
  config = test_config.get_config()
  config.benchmark.update(kind='train', encoders='mean,lstm',
                          batch_sizes='8', train_steps=2, min_seconds=0.05,
                          peer=str(peer), results_dir=str(tmp_path / 'r'))
  out = modes.run_mode('benchmark', config, str(tmp_path))
  lines = {(l.get('variant') or l['benchmark']): l
           for l in out['benchmarks']}
  dense, sparse = lines['mean dense'], lines['mean sparse']
  assert (dense['strongest'], sparse['strongest']) == (False, True)
  # 2 probe steps of 10 ms are short of 50 ms: 1.05 * 0.05 / 0.01 -> 6.
  assert (dense['steps'], sparse['steps']) == (6, 14)
  assert lines['lstm padded']['error'].startswith('RuntimeError: exit code')
  assert lines['lstm packed']['strongest']
  ours = lines['train_step_mean']
  assert ours['speedup_vs_best_peer'] == pytest.approx(
      ours['examples_per_s'] / 2000.0, abs=0.01)
  printed = capsys.readouterr().out
  assert printed.count('"peer": true') == 4
  from mardjax.experiments import results  # pylint: disable=g-import-not-at-top
  records = results.load(str(tmp_path / 'r'))['train']
  assert len(records) == 6
  assert records[0]['run']['versions']['torch'] == '0.0-fake'


def test_a_missing_peer_is_one_clear_error(tmp_path):
  from mardjax.errors import UserError  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.benchmark.update(kind='train', peer=str(tmp_path / 'none.py'))
  with pytest.raises(UserError, match='no such file'):
    benchmark.run_train(config, '')


@pytest.mark.slow
def test_pipeline_benchmark_compares_with_the_step(tmp_path):
  config = test_config.get_config()
  config.benchmark.update(pipeline_batches=3, train_steps=2,
                          min_seconds=0.0)
  result = benchmark.run_pipeline(config, str(tmp_path))
  step, line = result['benchmarks']
  assert line['benchmark'] == 'input_pipeline' and line['batches'] == 3
  assert line['examples_per_s'] > 0
  assert line['ratio'] == pytest.approx(
      line['examples_per_s'] / step['examples_per_s'], rel=0.01)


@pytest.mark.slow
def test_train_loop_benchmark_runs_the_real_loop_without_tensorflow(tmp_path):
  code = (
      'import sys, json\n'
      'sys.modules["tensorflow"] = None  # As on GPU machines without it.\n'
      'from configs import test as test_config\n'
      'from mardjax import modes\n'
      'config = test_config.get_config()\n'
      'config.benchmark.update(kind="train_loop", loop_albums=40,\n'
      '    loop_tracks=90, loop_reviews=300, loop_dev_reviews=30,\n'
      '    train_loop_steps=6, train_steps=2, loop_step_seconds=0.05)\n'
      'config.train.update(eval_every=3, checkpoint_every=3)\n'
      f'out = modes.run_mode("benchmark", config, {str(tmp_path)!r},\n'
      '                      show_progress=False)\n'
      'print(json.dumps(out["benchmarks"][0]))\n'
      'print(any(m.startswith("tensorflow") and sys.modules[m] is not None\n'
      '          for m in sys.modules))\n')
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout.splitlines()
  line, tensorflow_loaded = json.loads(out[-2]), out[-1]
  assert tensorflow_loaded == 'False'
  assert line['benchmark'] == 'train_loop' and line['steps'] == 6
  assert line['evaluations'] == 3  # Steps 0, 3 and 6.
  # The test config's lazy update on a CPU: 'auto' assembles on the host.
  assert (line['batch_assembly'], line['steps_per_dispatch']) == ('host', 1)
  assert line['end_to_end_examples_per_s'] > 0
  assert line['step_examples_per_s'] == pytest.approx(
      sum(line['step_examples_per_s_before_after']) / 2, abs=0.1)
  assert min(line['step_examples_per_s_before_after']) > 0
  assert 0 < line['eval_share'] < 1 and 0 < line['checkpoint_share'] < 1
  # The step compiles in the loop; the projection counts that once.
  assert line['compiles'] >= 1 and 0 < line['compile_share'] < 1
  compile_s = line['compile_share'] * line['loop_s']
  rest = line['steps'] * line['batch_size'] / (line['loop_s'] - compile_s)
  assert line['share_of_step_excluding_compile'] == pytest.approx(
      rest / line['step_examples_per_s'], rel=0.01, abs=1e-3)  # 3 decimals.
  assert line['projected_200_epochs_s'] == pytest.approx(
      compile_s + 200 * 300 / rest, rel=0.01)



def test_host_planning_sends_indices_only():
  """The train-loop benchmark's host planning, for a plan that assembles
  the batch on the device (an accelerator's): what a dispatch sends is
  the batch's review and track rows and nothing else (the positive lists
  are made in the step), and the host's time per step is measured."""
  from mardjax import plan as plan_lib  # pylint: disable=g-import-not-at-top
  from mardjax.experiments import train_loop  # pylint: disable=g-import-not-at-top
  from mardjax.train import step_builder  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.benchmark.update(loop_albums=40, loop_tracks=90, loop_reviews=300,
                          loop_dev_reviews=30)
  config.train.update(batch_size=32, embedding_update='dense',
                      batch_assembly='device', steps_per_dispatch=4)
  plan = plan_lib.resolve(config, backend='gpu', devices=1, processes=1)
  assert plan.positives and plan.batch_assembly == 'device'
  data, _ = train_loop.synthetic_data(config)
  widths = step_builder.positive_widths(config, plan, data.reviews,
                                        data.audio)
  line = train_loop.host_planning(config, plan, data, widths)
  assert line['bytes_per_dispatch'] == 4 * 2 * 32 * 4  # int32 rows, tracks.
  assert line['host_ms_per_step'] == pytest.approx(
      line['host_plan_ms_per_step'] + line['host_dispatch_ms_per_step'],
      abs=2e-3)
  assert line['host_plan_ms_per_step'] > 0
  # Each step's share of its epoch's order is counted: at large batches an
  # epoch has few steps.
  from mardjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  assert line['steps_per_epoch'] == len(input_pipeline.epoch_order(
      data.reviews, data.audio, batch_size=32, seed=config.seed, epoch=0,
      neighbourhood=config.train.neighbourhood_sampling,
      reviews_per_album=config.train.reviews_per_album))
  assert line['epoch_order_ms'] > 0
  assert line['host_plan_ms_per_step'] >= (
      line['epoch_order_ms'] / line['steps_per_epoch'] - 1e-3)
  config.train.update(batch_assembly='host', steps_per_dispatch=1)
  host_plan = plan_lib.resolve(config, backend='cpu', devices=1, processes=1)
  assert train_loop.host_planning(config, host_plan, data, widths) == {}


_HLO = """HloModule jit_step, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%fused_computation (param_0: f32[4]) -> f32[4] {
  %param_0 = f32[4]{0} parameter(0)
  ROOT %add.1 = f32[4]{0} add(f32[4]{0} %param_0, f32[4]{0} %param_0)
}

%round (p: (u32[2], s32[])) -> (u32[2], s32[]) {
  %p = (u32[2]{0}, s32[]) parameter(0)
  %x = u32[2]{0} get-tuple-element((u32[2]{0}, s32[]) %p), index=0
  %l = u32[2]{0} shift-left(u32[2]{0} %x, u32[2]{0} %x)
  %r = u32[2]{0} xor(u32[2]{0} %l, u32[2]{0} %x)
  %i = s32[] get-tuple-element((u32[2]{0}, s32[]) %p), index=1
  ROOT %t = (u32[2]{0}, s32[]) tuple(u32[2]{0} %r, s32[] %i)
}

%search (p: (s32[8], s32[])) -> (s32[8], s32[]) {
  %p = (s32[8]{0}, s32[]) parameter(0)
  %x = s32[8]{0} get-tuple-element((s32[8]{0}, s32[]) %p), index=0
  %g = s32[8]{0} gather(s32[8]{0} %x, s32[8]{0} %x), offset_dims={}
  %i = s32[] get-tuple-element((s32[8]{0}, s32[]) %p), index=1
  ROOT %t = (s32[8]{0}, s32[]) tuple(s32[8]{0} %g, s32[] %i)
}

%cond (p: (u32[2], s32[])) -> pred[] {
  %p = (u32[2]{0}, s32[]) parameter(0)
  ROOT %c = pred[] constant(false)
}

ENTRY %main.9 (Arg_0.1: f32[4], Arg_1.2: (u32[2], s32[])) -> f32[4] {
  %Arg_0.1 = f32[4]{0} parameter(0)
  %Arg_1.2 = (u32[2]{0}, s32[]) parameter(1)
  %Arg_2.3 = (s32[8]{0}, s32[]) parameter(2)
  %c = f32[] constant(1)
  %w1 = (u32[2]{0}, s32[]) while((u32[2]{0}, s32[]) %Arg_1.2), condition=%cond, body=%round
  %w2 = (s32[8]{0}, s32[]) while((s32[8]{0}, s32[]) %Arg_2.3), condition=%cond, body=%search
  %s = (f32[4]{0}, s32[4]{0}) sort(f32[4]{0} %Arg_0.1, s32[4]{0} %Arg_0.1), dimensions={0}
  %f = f32[4]{0} fusion(f32[4]{0} %Arg_0.1), kind=kLoop, calls=%fused_computation
  ROOT %m = f32[4]{0} multiply(f32[4]{0} %f, f32[4]{0} %f)
}
"""


def test_program_counts_read_from_hand_written_hlo():
  """Entry operations (parameters, constants and tuples aside), fusions,
  loops (the generator's told from others by their body) and sorts."""
  from mardjax.experiments import program  # pylint: disable=g-import-not-at-top
  assert program.hlo_counts(_HLO) == {
      'ops': 5, 'fusions': 1, 'while_loops': 2, 'sorts': 1,
      'rng_while_loops': 1}


@pytest.mark.slow
def test_program_benchmark_compares_the_step_with_the_plain_probe(tmp_path):
  """The step an accelerator's plan runs, compiled here: no loop but the
  generator's, one sort (the album blocks'), lines for both programs; a
  step with a binary search in it would count its loop."""
  from mardjax.experiments import program  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.benchmark.update(kind='program', batch_sizes='16,64')
  result = modes.run_mode('benchmark', config, str(tmp_path))
  lines = result['benchmarks']
  assert [(l['benchmark'], l['batch_size']) for l in lines] == [
      ('program_plain_probe', 16), ('program_train_step', 16),
      ('program_plain_probe', 64), ('program_train_step', 64)]
  ours = lines[-1]
  assert (ours['plan_backend'], ours['embedding_update']) == ('gpu', 'dense')
  assert ours['while_loops'] == ours['rng_while_loops']
  assert ours['sorts'] == 1 and ours['ops'] > 0 and ours['flops'] > 0
  assert ours['plain_ops'] == lines[-2]['ops']
  assert isinstance(ours['meets_targets'], bool)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  searched = jax.jit(lambda a, v: jnp.searchsorted(a, v)).lower(
      jnp.arange(64), jnp.arange(8)).compile().as_text()
  counts = program.hlo_counts(searched)
  assert counts['while_loops'] == 1 and counts['rng_while_loops'] == 0


def test_collective_bytes_read_from_hand_written_hlo():
  """Shapes' bytes (tuples, scalars, bfloat16) and each collective counted
  once: the -start half of an asynchronous one, not its -done half."""
  from mardjax.experiments import scaling  # pylint: disable=g-import-not-at-top
  assert scaling.shape_bytes('f32[4,8]{1,0}') == 128
  assert scaling.shape_bytes('(bf16[3]{0}, s32[]) ') == 10
  hlo = '\n'.join([
      '  %a = f32[10,2]{1,0} all-reduce(f32[10,2]{1,0} %x), to_apply=%sum',
      '  %s = (f32[6]{0}, u32[]) all-gather-start(f32[3]{0} %y)',
      '  %d = f32[6]{0} all-gather-done((f32[6]{0}, u32[]) %s)',
      '  %r = f32[2]{0} reduce-scatter(f32[4]{0} %z), dimensions={0}',
      '  %m = f32[10,2]{1,0} multiply(f32[10,2]{1,0} %a, f32[10,2]{1,0} %a)'])
  assert scaling.collective_bytes(hlo) == (80 + 28 + 8, 3)


@pytest.mark.slow
def test_scaling_benchmark_reads_each_device_counts_program(tmp_path):
  """A child process per device count and parallel form: one device moves
  nothing between devices; two average at least every parameter's
  gradient each step; the state per device is compared with one device's,
  and under shard_map the large leaves' Adam moments are split in two."""
  config = test_config.get_config()
  config.benchmark.update(kind='scaling', scaling_devices='1,2',
                          loop_albums=40, loop_tracks=90, loop_reviews=300,
                          loop_dev_reviews=30)
  config.train.batch_size = 16
  config.train.optimizer_shard_min_size = 1024
  lines = modes.run_mode('benchmark', config, str(tmp_path))['benchmarks']
  one, two, split = lines
  assert (one['devices'], two['devices'], split['devices']) == (1, 2, 2)
  assert (two['parallelism'], two['optimizer_sharding']) == (
      'pmap', 'replicated')
  assert (split['parallelism'], split['optimizer_sharding']) == (
      'shard_map', 'sharded')
  assert one['collective_bytes_per_step'] == 0 and one['collectives'] == 0
  assert one['state_share_of_one_device'] == 1.0
  # Adam's state is two moments of every parameter beside it (and a count).
  params = (one['state_bytes_per_device'] - 8) / 3
  for line in (two, split):
    assert line['collective_bytes_per_step'] >= params
    assert line['state_share_of_one_device'] == pytest.approx(
        line['state_bytes_per_device'] / one['state_bytes_per_device'],
        abs=1e-3)
    assert line['bytes_per_dispatch'] > 0 and line['host_ms_per_step'] > 0
  assert two['state_share_of_one_device'] == 1.0
  assert two['optimizer_share_of_one_device'] == 1.0
  # Adam's moments are twice the parameters, and its counts are scalars.
  assert one['optimizer_bytes_per_device'] == pytest.approx(
      2 * params + 8, abs=8)
  # Most parameters are in leaves of 1,024 elements or more (the word
  # table, the heads' first layers): their moments are halved.
  assert 0.5 < split['state_share_of_one_device'] < 0.75
  assert 0.5 <= split['optimizer_share_of_one_device'] < 0.6
  assert split['optimizer_share_of_one_device'] == pytest.approx(
      split['optimizer_bytes_per_device'] / one['optimizer_bytes_per_device'],
      abs=1e-3)
