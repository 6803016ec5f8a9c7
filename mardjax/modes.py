"""What each `launch.py --mode` does, as functions that return JSON-able dicts.

Kept apart from `launch.py` so tests call the same code the command runs.
"""

import os
from typing import Any

import ml_collections

from mardjax.data import mard_io
from mardjax.data import preprocess
from mardjax.data import synth
from mardjax.errors import UserError

MODES = ('train', 'eval', 'baselines', 'ablate', 'export', 'serve', 'embed',
         'synth', 'preprocess', 'benchmark')
SYNTH_SUBDIR = 'synthetic_mard'


def mard_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The raw data: config.data.mard_dir, else the workdir's synthetic corpus."""
  return config.data.mard_dir or os.path.join(workdir, SYNTH_SUBDIR)


def run_synth(config, workdir: str, show_progress: bool = True
              ) -> dict[str, Any]:
  """Writes (or reuses) the synthetic corpus into `mard_dir(config, workdir)`."""
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
                        show_progress=show_progress)


def run_preprocess(config, workdir: str, force: bool = False,
                   show_progress: bool = True) -> dict[str, Any]:
  """Raw MARD -> TFRecords; generates the synthetic corpus when none is given."""
  preprocess.validate_data_config(config.data)  # Before minutes of synth.
  result = {}
  if not config.data.mard_dir:
    result['synth'] = run_synth(config, workdir, show_progress)
  report = preprocess.run(config, mard_dir(config, workdir),
                          preprocess.output_dir(config, workdir), force=force,
                          show_progress=show_progress)
  result.update(report)
  return result


def run_train(config, workdir: str, force: bool = False,
              show_progress: bool = True) -> dict[str, Any]:
  """Preprocesses (or reuses the records), trains, evaluates on dev."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from mardjax.train import trainer  # pylint: disable=g-import-not-at-top
  data_dir = preprocess.output_dir(config, workdir)
  if jax.process_index() == 0:  # One process writes the data; all read it.
    run_preprocess(config, workdir, force, show_progress)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('mardjax: data ready')
  counts = preprocess.load_manifest(data_dir)['counts']
  _, metrics = trainer.train_and_evaluate(config, workdir, data_dir)
  return dict(metrics, data={'tfrecord_dir': data_dir,
                             'albums': counts['albums'],
                             'reviews': counts['reviews'],
                             'tracks': counts['tracks']})


def run_eval(config, workdir: str) -> dict[str, Any]:
  """Evaluates the workdir's newest checkpoint (split: config.eval.split)."""
  from mardjax.train import trainer  # pylint: disable=g-import-not-at-top
  return trainer.evaluate_checkpoint(config, workdir,
                                   preprocess.output_dir(config, workdir))


def run_baselines(config, workdir: str, show_progress: bool = True
                  ) -> dict[str, Any]:
  """CCA, WSABIE and random on config.eval.split (preprocessing reused)."""
  from mardjax.evaluation import baselines  # pylint: disable=g-import-not-at-top
  run_preprocess(config, workdir, False, show_progress)
  return baselines.run(config, preprocess.output_dir(config, workdir))


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


def run_mode(mode: str, config, workdir: str, force: bool = False,
             show_progress: bool = True, host: str = '127.0.0.1',
             port: int = 8000, input_dir: str | None = None,
             output_dir: str | None = None) -> dict[str, Any]:
  """Runs one mode; returns its result (the JSON line launch.py prints)."""
  if mode == 'train':
    return run_train(config, workdir, force, show_progress)
  if mode == 'eval':
    return run_eval(config, workdir)
  if mode == 'baselines':
    return run_baselines(config, workdir, show_progress)
  if mode == 'export':
    from mardjax.serve import export  # pylint: disable=g-import-not-at-top
    return export.run(config, workdir, preprocess.output_dir(config, workdir),
                      mard_dir(config, workdir))
  if mode == 'serve':
    from mardjax.serve import web  # pylint: disable=g-import-not-at-top
    return web.run(config, workdir, preprocess.output_dir(config, workdir),
                     mard_dir(config, workdir), host, port)
  if mode == 'embed':
    from mardjax.serve import batch_embed  # pylint: disable=g-import-not-at-top
    return batch_embed.run(config, workdir,
                           preprocess.output_dir(config, workdir), input_dir,
                           output_dir, show_progress)
  if mode == 'ablate':
    from mardjax.experiments import ablation  # pylint: disable=g-import-not-at-top
    return ablation.run(config, workdir, run_mode, show_progress)
  if mode == 'synth':
    return run_synth(config, workdir, show_progress)
  if mode == 'preprocess':
    return run_preprocess(config, workdir, force, show_progress)
  if mode == 'benchmark':
    from mardjax.experiments import benchmark  # pylint: disable=g-import-not-at-top
    if config.benchmark.kind == 'train':
      return benchmark.run_train(config)
    if config.benchmark.kind == 'pipeline':
      return benchmark.run_pipeline(config, workdir, run_mode)
    if config.benchmark.kind == 'data':
      return benchmark.run(config, workdir, run_mode)
    if config.benchmark.kind == 'eval':
      return benchmark.run_eval(config)
    if config.benchmark.kind == 'index':
      return benchmark.run_index(config)
    if config.benchmark.kind == 'serve':
      from mardjax.experiments import serve_benchmark  # pylint: disable=g-import-not-at-top
      return serve_benchmark.run(config, workdir,
                                 preprocess.output_dir(config, workdir),
                                 mard_dir(config, workdir))
    raise UserError(f'config.benchmark.kind={config.benchmark.kind!r}: '
                    "choose 'data', 'train', 'pipeline', 'eval', 'index' or "
                    "'serve'.")
  raise UserError(f'Unknown mode {mode!r}; choose from {MODES}.')
