"""What each `launch.py --mode` does: one registry of functions that return
JSON-able dicts.

Kept apart from `launch.py` so tests call the same code the command runs.
This is the top of the package: it wires the layers together (the training
loop gets its dev evaluator here) and imports each mode's module only when
that mode runs, so `--mode=serve` never loads TensorFlow or the optimizer.
"""

import dataclasses
import os
from typing import Any, Callable

from absl import logging
import ml_collections

from mardjax import config_check
from mardjax.data import manifest as manifest_lib
from mardjax.errors import UserError

SYNTH_SUBDIR = 'synthetic_mard'


@dataclasses.dataclass(frozen=True)
class Options:
  """The command line's options beside the config (launch.py's flags)."""
  force: bool = False
  show_progress: bool = True
  host: str = '127.0.0.1'
  port: int = 8000
  input_dir: str | None = None
  output_dir: str | None = None
  # Dotted config fields set on the command line (`data.mard_dir`, ...).
  overridden: frozenset[str] = frozenset()


def mard_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The raw data: config.data.mard_dir, else the workdir's synthetic corpus."""
  return config.data.mard_dir or os.path.join(workdir, SYNTH_SUBDIR)



def run_synth(config, workdir: str, opts: Options = Options()
              ) -> dict[str, Any]:
  """Writes (or reuses) the synthetic corpus into `mard_dir(config, workdir)`."""
  from mardjax.data import mard_io  # pylint: disable=g-import-not-at-top
  from mardjax.data import synth  # pylint: disable=g-import-not-at-top
  try:
    sizes = synth.sizes_from_config(config.data)
  except ValueError as e:
    raise UserError(f'config.data.synth_*: {e}') from None
  out = mard_dir(config, workdir)
  real = os.path.join(out, mard_io.METADATA_FILE)
  marker = os.path.join(out, synth.DONE_MARKER)
  if os.path.exists(real) and not os.path.exists(marker):
    # Never overwrite a directory that holds data we did not generate.
    raise UserError(f'{out!r} holds a MARD corpus that mardjax did not '
                    'generate; refusing to overwrite it with synthetic data.')
  os.makedirs(out, exist_ok=True)
  return synth.generate(out, sizes, seed=config.data.synth_seed,
                        num_workers=config.data.num_workers,
                        show_progress=opts.show_progress)


def run_preprocess(config, workdir: str, opts: Options = Options()
                   ) -> dict[str, Any]:
  """Raw MARD -> TFRecords; generates the synthetic corpus when none is given."""
  from mardjax.data import preprocess  # pylint: disable=g-import-not-at-top
  config_check.validate_data(config.data)  # Before minutes of synth.
  result = {}
  if not config.data.mard_dir:
    result['synth'] = run_synth(config, workdir, opts)
  report = preprocess.run(config, mard_dir(config, workdir),
                          manifest_lib.data_dir_of(config, workdir),
                          force=opts.force,
                          show_progress=opts.show_progress)
  result.update(report)
  return result


def train_and_evaluate(config, workdir: str, records_dir: str
                       ) -> tuple[Any, dict[str, Any]]:
  """The training loop with the dev evaluator (`trainer.train_and_evaluate`),
  after the config check."""
  import jax  # pylint: disable=g-import-not-at-top
  from mardjax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  from mardjax.train import trainer  # pylint: disable=g-import-not-at-top
  config_check.validate(config, jax.local_device_count(), jax.process_count())
  return trainer.train_and_evaluate(config, workdir, records_dir,
                                    evaluate.dev_evaluator)


def run_train(config, workdir: str, opts: Options = Options()
              ) -> dict[str, Any]:
  """Preprocesses (or reuses the records), trains, evaluates on dev."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  config_check.validate(config, jax.local_device_count(), jax.process_count())
  if jax.process_index() == 0:  # One process writes the data; all read it.
    run_preprocess(config, workdir, opts)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('mardjax: data ready')
  records = manifest_lib.data_dir_of(config, workdir)
  counts = manifest_lib.load(records).counts
  _, metrics = train_and_evaluate(config, workdir, records)
  return dict(metrics, data={'tfrecord_dir': records,
                             'albums': counts.albums,
                             'reviews': counts.reviews,
                             'tracks': counts.tracks})


# Sections a trained run fixes: the data it read and the model it built.
RUN_SECTIONS = ('data', 'model')


def adopt_run_config(config, workdir: str, overridden: frozenset[str] = (
    frozenset())):
  """`config` with the data and model fields of the run in `workdir` (from
  its checkpoint), except those set on the command line: evaluating or
  serving a run needs no flag it was trained with.

  Returns:
    (config, {field: value taken from the run}).
  """
  from mardjax.train import checkpoints  # pylint: disable=g-import-not-at-top
  stored = checkpoints.run_config(workdir)
  if stored is None:
    return config, {}
  config = config.copy_and_resolve_references()
  taken = {}
  for section in RUN_SECTIONS:
    for name, value in stored.get(section, {}).items():
      field = f'{section}.{name}'
      if field in overridden or name not in config[section]:
        continue
      current = config[section][name]
      if isinstance(current, tuple):
        value = tuple(value)
      if value != current:
        with config[section].ignore_type():
          config[section][name] = value
        taken[field] = value
  if taken:
    logging.info('From the run in %s: %s', workdir, ', '.join(
        f'{k}={v!r}' for k, v in sorted(taken.items())))
  return config, taken


def run_eval(config, workdir: str, opts: Options = Options()
             ) -> dict[str, Any]:
  """Evaluates the workdir's newest checkpoint (split: config.eval.split)."""
  from mardjax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  config, _ = adopt_run_config(config, workdir, opts.overridden)
  return evaluate.evaluate_checkpoint(config, workdir)


def run_baselines(config, workdir: str, opts: Options = Options()
                  ) -> dict[str, Any]:
  """CCA, WSABIE and random on config.eval.split (preprocessing reused)."""
  from mardjax.evaluation import baselines  # pylint: disable=g-import-not-at-top
  run_preprocess(config, workdir, dataclasses.replace(opts, force=False))
  return baselines.run(config, manifest_lib.data_dir_of(config, workdir))


def run_ablate(config, workdir: str, opts: Options = Options()
               ) -> dict[str, Any]:
  """The paper's Table 1 (`experiments.ablation`)."""
  from mardjax.experiments import ablation  # pylint: disable=g-import-not-at-top
  return ablation.run(config, workdir, opts.show_progress)


def run_export(config, workdir: str, opts: Options = Options()
               ) -> dict[str, Any]:
  """The trained space as plain files (`serve.export`)."""
  from mardjax.serve import export  # pylint: disable=g-import-not-at-top
  config, _ = adopt_run_config(config, workdir, opts.overridden)
  return export.run(config, workdir, manifest_lib.data_dir_of(config, workdir),
                    mard_dir(config, workdir))


def run_serve(config, workdir: str, opts: Options = Options()
              ) -> dict[str, Any]:
  """The listening room (`serve.web`), until interrupted."""
  from mardjax.serve import web  # pylint: disable=g-import-not-at-top
  config, _ = adopt_run_config(config, workdir, opts.overridden)
  return web.run(config, workdir, manifest_lib.data_dir_of(config, workdir),
                 mard_dir(config, workdir), opts.host, opts.port)


def run_embed(config, workdir: str, opts: Options = Options()
              ) -> dict[str, Any]:
  """A folder of recordings into the export's format (`serve.batch_embed`)."""
  from mardjax.serve import batch_embed  # pylint: disable=g-import-not-at-top
  config, _ = adopt_run_config(config, workdir, opts.overridden)
  return batch_embed.run(config, workdir, manifest_lib.data_dir_of(config, workdir),
                         opts.input_dir, opts.output_dir, opts.show_progress)


def run_benchmark(config, workdir: str, opts: Options = Options()
                  ) -> dict[str, Any]:
  """`config.benchmark.kind` from `experiments.benchmark.KINDS`."""
  del opts
  from mardjax.experiments import benchmark  # pylint: disable=g-import-not-at-top
  return benchmark.KINDS[config.benchmark.kind](config, workdir)


# --mode name -> function(config, workdir, Options) -> JSON-able dict.
MODES: dict[str, Callable[..., dict[str, Any]]] = {
    'train': run_train, 'eval': run_eval, 'baselines': run_baselines,
    'ablate': run_ablate, 'export': run_export, 'serve': run_serve,
    'embed': run_embed, 'synth': run_synth, 'preprocess': run_preprocess,
    'benchmark': run_benchmark,
}


def init_distributed(coordinator_address: str | None, num_processes: int,
                     process_id: int) -> None:
  """Joins a multi-process JAX run (several hosts, or processes on one).

  On CPUs the cross-process collectives go through gloo.
  """
  if not coordinator_address:
    raise UserError('--num_processes > 1 needs --coordinator_address.')
  if not 0 <= process_id < num_processes:
    raise UserError(f'--process_id={process_id} is not in '
                    f'[0, {num_processes}).')
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def _dirs_written(mode: str, config, workdir: str) -> list[str]:
  """The directories `mode` writes into (or creates)."""
  from mardjax.train import checkpoints  # pylint: disable=g-import-not-at-top
  dirs = [workdir]
  if mode in ('train', 'preprocess', 'baselines', 'ablate', 'synth'):
    dirs.append(manifest_lib.data_dir_of(config, workdir))
    if not config.data.mard_dir:
      dirs.append(mard_dir(config, workdir))
  if mode == 'train':
    dirs += [os.path.join(workdir, checkpoints.CHECKPOINT_DIR),
             os.path.join(workdir, checkpoints.BEST_DIR)]
  if mode == 'eval':
    dirs.append(os.path.join(workdir, 'eval'))
  if mode in ('export', 'serve'):
    dirs.append(os.path.join(workdir, 'export'))
  return dirs


def check_writable_dirs(paths: list[str]) -> None:
  """Fails with one line naming the path when one of `paths` is a file, or
  cannot be created or written: before any work, not at the first save."""
  for path in paths:
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
      raise UserError(f'{path} is a file, and a directory is needed there: '
                      'move it away or choose another --workdir.')
    existing = path
    while not os.path.exists(existing):
      existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
      raise UserError(f'{existing} is a file, so {path} cannot be created.')
    try:  # A real write: permissions, read-only disks, even as root.
      probe = os.path.join(existing, f'.mardjax-write-probe-{os.getpid()}')
      with open(probe, 'w'):
        pass
      os.remove(probe)
    except OSError as e:
      raise UserError(f'{existing} is not writable ({e.strerror}): '
                      f'{path} is needed for this run.') from None


def run_mode(mode: str, config, workdir: str, **options) -> dict[str, Any]:
  """Runs one mode; returns its result (the JSON line launch.py prints).

  Args:
    mode: a key of `MODES`.
    config: the full config; checked first (`config_check.validate_common`).
    workdir: the run directory.
    **options: fields of `Options` (force, show_progress, host, ...).
  """
  if mode not in MODES:
    raise UserError(f'Unknown mode {mode!r}; choose from {tuple(MODES)}.')
  config_check.validate_common(config)
  check_writable_dirs(_dirs_written(mode, config, workdir))
  os.makedirs(workdir, exist_ok=True)
  return MODES[mode](config, workdir, Options(**options))
