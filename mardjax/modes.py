"""What each `launch.py --mode` does: one registry of functions that return
JSON-able dicts.

Kept apart from `launch.py` so tests call the same code the command runs.
This is the top of the package: each mode composes the stages
(`mardjax.stages`) or runs an experiment (`mardjax.experiments`), and the
module a mode needs (an experiment, the serving layer) is imported only
when that mode runs, so `--mode=serve` never loads TensorFlow or the
optimizer. Nothing in the package imports this module; `launch.py` does.
"""

import dataclasses
import errno
import os
from typing import Any, Callable

from absl import logging

from mardjax import config_check
from mardjax import stages
from mardjax.data import files
from mardjax.data import manifest as manifest_lib
from mardjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Options:
  """The command line's options beside the config (launch.py's flags)."""
  force: bool = False
  show_progress: bool = True
  host: str = '127.0.0.1'
  port: int = 8000
  input_dir: str | None = None
  output_dir: str | None = None
  # --mode=query: a typed text or a file, and how many answers.
  text: str | None = None
  file: str | None = None
  k: int = 10
  # Dotted config fields set on the command line (`data.mard_dir`, ...).
  overridden: frozenset[str] = frozenset()


def run_synth(config, workdir: str, opts: Options = Options()
              ) -> dict[str, Any]:
  """The synthetic corpus (`stages.synthesize`)."""
  return stages.synthesize(config, workdir, opts.show_progress)


# launch.py's exit status for a run whose output is written but whose input
# and output counts disagree (0 when data.accept_unreconciled is set).
UNRECONCILED_EXIT = 3


def unreconciled(report: dict[str, Any]) -> list[str]:
  """The kinds of record (albums, reviews, ...) whose input count is not
  their output plus their counted skips, in a preprocessing report."""
  return sorted(k for k, ok in report.get('reconcile', {}).items() if not ok)


def _reconciled(config, report: dict[str, Any]) -> dict[str, Any]:
  """`report` with a warning and an exit status when it does not reconcile:
  records lost without a count are a bug to report, not data to train on
  unknowingly."""
  bad = unreconciled(report)
  if not bad:
    return report
  warning = (f'input and output counts do not reconcile for {", ".join(bad)}'
             ': records were lost without being counted as skipped (see '
             '"input", "skipped" and "reconcile" above)')
  accepted = bool(config.data.accept_unreconciled)
  return dict(report, warnings=list(report.get('warnings', ())) + [warning],
              exit_status=0 if accepted else UNRECONCILED_EXIT)


def run_preprocess(config, workdir: str, opts: Options = Options()
                   ) -> dict[str, Any]:
  """Raw MARD -> TFRecords; the synthetic corpus when none is given
  (`stages.preprocess`)."""
  return _reconciled(config, stages.preprocess(config, workdir, opts.force,
                                               opts.show_progress))


def run_train(config, workdir: str, opts: Options = Options()
              ) -> dict[str, Any]:
  """Preprocesses (or reuses the records), trains, evaluates on dev."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from mardjax import plan as plan_lib  # pylint: disable=g-import-not-at-top
  config_check.validate(config, jax.local_device_count(), jax.process_count())
  plan = plan_lib.resolve(config)
  logging.info('Plan: %s', plan.describe())  # The run's first line.
  if jax.process_index() == 0:  # One process writes the data; all read it.
    report = stages.preprocess(config, workdir, opts.force,
                               opts.show_progress)
    if unreconciled(report) and not config.data.accept_unreconciled:
      raise UserError(
          f'the records do not reconcile with their input for '
          f'{", ".join(unreconciled(report))} (--mode=preprocess shows the '
          'counts); set --config.data.accept_unreconciled=True to train '
          'on them anyway')
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('mardjax: data ready')
  records = manifest_lib.data_dir_of(config, workdir)
  counts = manifest_lib.load(records).counts
  _, metrics = stages.train_and_evaluate(config, workdir, records, plan)
  return dict(metrics, data={'tfrecord_dir': records,
                             'albums': counts.albums,
                             'reviews': counts.reviews,
                             'tracks': counts.tracks})


def run_eval(config, workdir: str, opts: Options = Options()
             ) -> dict[str, Any]:
  """Evaluates the workdir's newest checkpoint (split: config.eval.split)."""
  from mardjax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  config, _ = stages.adopt_run_config(config, workdir, opts.overridden)
  return evaluate.evaluate_checkpoint(config, workdir)


def run_baselines(config, workdir: str, opts: Options = Options()
                  ) -> dict[str, Any]:
  """CCA, WSABIE and random on config.eval.split (preprocessing reused)."""
  from mardjax.evaluation import baselines  # pylint: disable=g-import-not-at-top
  stages.preprocess(config, workdir, force=False,
                    show_progress=opts.show_progress)
  return baselines.evaluate_baselines(
      config, manifest_lib.data_dir_of(config, workdir))


def run_ablate(config, workdir: str, opts: Options = Options()
               ) -> dict[str, Any]:
  """The paper's Table 1 (`experiments.ablation`)."""
  from mardjax.experiments import ablation  # pylint: disable=g-import-not-at-top
  return ablation.run_table1(config, workdir, opts.show_progress)


def run_suite(config, workdir: str, opts: Options = Options()
              ) -> dict[str, Any]:
  """The config on every corpus of the suite (`experiments.suite`)."""
  from mardjax.experiments import suite  # pylint: disable=g-import-not-at-top
  return suite.run_suite(config, workdir, opts.show_progress)


def run_suite_table1(config, workdir: str, opts: Options = Options()
                     ) -> dict[str, Any]:
  """Table 1's rows on every corpus of the suite
  (`experiments.suite_table1`)."""
  from mardjax.experiments import suite_table1  # pylint: disable=g-import-not-at-top
  return suite_table1.run_table1_suite(config, workdir, opts.show_progress)


def run_export(config, workdir: str, opts: Options = Options()
               ) -> dict[str, Any]:
  """The trained space as plain files (`serve.export`)."""
  from mardjax.serve import export  # pylint: disable=g-import-not-at-top
  config, _ = stages.adopt_run_config(config, workdir, opts.overridden)
  return export.export_space(config, workdir,
                             manifest_lib.data_dir_of(config, workdir),
                             stages.mard_dir(config, workdir))


def run_serve(config, workdir: str, opts: Options = Options()
              ) -> dict[str, Any]:
  """The listening room (`serve.web`), until interrupted."""
  from mardjax.serve import web  # pylint: disable=g-import-not-at-top
  config, _ = stages.adopt_run_config(config, workdir, opts.overridden)
  return web.serve_room(config, workdir,
                        manifest_lib.data_dir_of(config, workdir),
                        stages.mard_dir(config, workdir), opts.host,
                        opts.port)


def run_embed(config, workdir: str, opts: Options = Options()
              ) -> dict[str, Any]:
  """A folder of recordings into the export's format (`serve.batch_embed`)."""
  from mardjax.serve import batch_embed  # pylint: disable=g-import-not-at-top
  config, _ = stages.adopt_run_config(config, workdir, opts.overridden)
  return batch_embed.embed_folder(
      config, workdir, manifest_lib.data_dir_of(config, workdir),
      opts.input_dir, opts.output_dir, opts.show_progress)


def run_query(config, workdir: str, opts: Options = Options()
              ) -> dict[str, Any]:
  """One explained answer of the listening room, without the server
  (`serve.query`); the answer as text on stderr, JSON as the result."""
  import sys  # pylint: disable=g-import-not-at-top
  from mardjax.serve import query  # pylint: disable=g-import-not-at-top
  config, _ = stages.adopt_run_config(config, workdir, opts.overridden)
  out = query.answer(config, workdir,
                     manifest_lib.data_dir_of(config, workdir),
                     stages.mard_dir(config, workdir), opts.text, opts.file,
                     opts.k)
  if opts.show_progress:
    print(query.describe(out), file=sys.stderr, flush=True)
  return out


def run_benchmark(config, workdir: str, opts: Options = Options()
                  ) -> dict[str, Any]:
  """`config.benchmark.kind` from `experiments.benchmark.KINDS`."""
  del opts
  from mardjax.experiments import benchmark  # pylint: disable=g-import-not-at-top
  return benchmark.KINDS[config.benchmark.kind](config, workdir)


# --mode name -> function(config, workdir, Options) -> JSON-able dict.
MODES: dict[str, Callable[..., dict[str, Any]]] = {
    'train': run_train, 'eval': run_eval, 'baselines': run_baselines,
    'ablate': run_ablate, 'suite': run_suite,
    'suite_table1': run_suite_table1, 'export': run_export,
    'serve': run_serve,
    'embed': run_embed, 'synth': run_synth, 'preprocess': run_preprocess,
    'benchmark': run_benchmark, 'query': run_query,
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
    dirs += stages.data_dirs(config, workdir)
  if mode == 'train':
    dirs += [os.path.join(workdir, checkpoints.CHECKPOINT_DIR),
             os.path.join(workdir, checkpoints.BEST_DIR)]
  if mode == 'eval':
    dirs.append(os.path.join(workdir, 'eval'))
  if mode in ('export', 'serve', 'query'):
    dirs.append(os.path.join(workdir, 'export'))
  return dirs


def run_mode(mode: str, config, workdir: str, **options) -> dict[str, Any]:
  """Runs one mode; returns its result (the JSON line launch.py prints).

  Args:
    mode: a key of `MODES`.
    config: the full config; checked first (`config_check.validate_common`,
      `experiments.benchmark.check_config`).
    workdir: the run directory.
    **options: fields of `Options` (force, show_progress, host, ...).
  """
  if mode not in MODES:
    raise UserError(f'Unknown mode {mode!r}; choose from {tuple(MODES)}.')
  config_check.validate_common(config)
  # The benchmark kinds check their own fields, for every mode as the rest.
  from mardjax.experiments import benchmark  # pylint: disable=g-import-not-at-top
  benchmark.check_config(config.benchmark)
  files.check_writable_dirs(_dirs_written(mode, config, workdir))
  os.makedirs(workdir, exist_ok=True)
  try:
    return MODES[mode](config, workdir, Options(**options))
  except UserError:  # Already one line, naming its own path.
    raise
  except Exception as e:  # pylint: disable=broad-except
    refused = _disk_refusal(e)
    if refused is None:
      raise
    raise UserError(
        f'cannot write {refused.filename or workdir}: {refused.strerror} '
        f'({errno.errorcode.get(refused.errno, refused.errno)}). Outputs are '
        'written whole or not at all and checkpoints are kept; free space '
        '(or choose another --workdir) and run again to go on.') from None


# A disk that cannot take more (permission errors are left out: a read can
# raise them too, and the writers that meet them name them themselves).
_DISK_REFUSALS = frozenset(files.DISK_ERRNOS) - {errno.EACCES, errno.EPERM}


def _disk_refusal(error: BaseException) -> OSError | None:
  """The OSError by which the disk refused a write (full, over quota, read
  only), anywhere in `error`'s chain of causes, else None: libraries that
  write (orbax, TensorFlow) wrap it in errors of their own."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _DISK_REFUSALS:
      return error
    for code in _DISK_REFUSALS:  # TensorFlow's and tensorstore's errors
      if os.strerror(code) in str(error):  # keep only the message.
        return OSError(code, os.strerror(code))
    error = error.__cause__ or (None if error.__suppress_context__ else
                                error.__context__)
  return None
