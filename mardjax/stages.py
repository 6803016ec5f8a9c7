"""The stages that the modes and the experiments compose: the synthetic
corpus, preprocessing, training with the dev evaluator wired in, and a
trained run's settings.

This floor sits above every layer (data, models, train, evaluation, serve)
and the config check, and below the experiments and the mode registry: it
imports the layers, never `mardjax.modes` or `mardjax.experiments`. The
layers load inside the functions that use them, so importing this module
(as `launch.py --mode=serve` does) loads neither TensorFlow nor the
optimizer.
"""

import os
from typing import Any

from absl import logging
import ml_collections

from mardjax import config_check
from mardjax.data import files
from mardjax.data import manifest as manifest_lib
from mardjax.errors import UserError

SYNTH_SUBDIR = 'synthetic_mard'
# Sections a trained run fixes: the data it read and the model it built.
RUN_SECTIONS = ('data', 'model')


def mard_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The raw data: config.data.mard_dir, else the workdir's synthetic corpus."""
  return config.data.mard_dir or os.path.join(workdir, SYNTH_SUBDIR)


def data_dirs(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """The directories preprocessing writes: the records, and the synthetic
  corpus when no `data.mard_dir` is given."""
  dirs = [manifest_lib.data_dir_of(config, workdir)]
  if not config.data.mard_dir:
    dirs.append(mard_dir(config, workdir))
  return dirs


def synthesize(config: ml_collections.ConfigDict, workdir: str,
               show_progress: bool = True) -> dict[str, Any]:
  """Writes (or reuses) the synthetic corpus into `mard_dir(config, workdir)`.

  Returns:
    `synth.generate`'s report (sizes, whether it was reused).

  Raises:
    UserError: bad `data.synth_*` sizes or style, or a directory that holds a MARD
      corpus mardjax did not generate.
  """
  from mardjax.data import mard_io  # pylint: disable=g-import-not-at-top
  from mardjax.data import synth  # pylint: disable=g-import-not-at-top
  try:
    sizes = synth.sizes_from_config(config.data)
    style = synth.style_from_config(config.data)
  except ValueError as e:
    raise UserError(f'config.data.synth_*: {e}') from None
  out = mard_dir(config, workdir)
  real = os.path.join(out, mard_io.METADATA_FILE)
  ours = [os.path.join(out, m) for m in (synth.DONE_MARKER,
                                         synth.STARTED_MARKER)]
  if os.path.lexists(real) and not any(map(os.path.exists, ours)):
    # Never overwrite a directory that holds data we did not generate.
    raise UserError(f'{out!r} holds a MARD corpus that mardjax did not '
                    'generate; refusing to overwrite it with synthetic data.')
  return synth.generate(out, sizes, seed=config.data.synth_seed,
                        num_workers=config.data.num_workers,
                        show_progress=show_progress, style=style)


def preprocess(config: ml_collections.ConfigDict, workdir: str,
               force: bool = False, show_progress: bool = True
               ) -> dict[str, Any]:
  """Raw MARD -> TFRecords; generates the synthetic corpus when none is
  given. Up-to-date records are reused unless `force`.

  Returns:
    `preprocess.preprocess_corpus`'s report, with `synth` (the corpus'
    report) when the corpus is synthetic.
  """
  from mardjax.data import preprocess as preprocess_lib  # pylint: disable=g-import-not-at-top
  config_check.validate_data(config.data)  # Before minutes of synth.
  files.check_writable_dirs(data_dirs(config, workdir))
  result = {}
  if not config.data.mard_dir:
    result['synth'] = synthesize(config, workdir, show_progress)
  report = preprocess_lib.preprocess_corpus(
      config, mard_dir(config, workdir),
      manifest_lib.data_dir_of(config, workdir), force=force,
      show_progress=show_progress)
  result.update(report)
  return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       records_dir: str, plan=None
                       ) -> tuple[Any, dict[str, Any]]:
  """The training loop with the dev evaluator (`trainer.train_and_evaluate`),
  after the config check; `plan`: the run's execution plan (None: resolved
  and logged by the trainer).

  Returns:
    (the final train state, the run's metrics).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from mardjax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  from mardjax.evaluation import word_evidence  # pylint: disable=g-import-not-at-top
  from mardjax.train import trainer  # pylint: disable=g-import-not-at-top
  config_check.validate(config, jax.local_device_count(), jax.process_count())
  state, metrics = trainer.train_and_evaluate(config, workdir, records_dir,
                                              evaluate.dev_evaluator, plan)
  if word_evidence.parse_ks(config.eval.evidence_ks):
    # The run's query rule, fitted on its model.
    metrics = evaluate.with_query_rule(config, workdir, records_dir, metrics)
  return state, metrics


def adopt_run_config(config: ml_collections.ConfigDict, workdir: str,
                     overridden: frozenset[str] = frozenset()):
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
