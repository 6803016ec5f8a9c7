"""mardjax entry point: `python launch.py --config configs/default.py --workdir DIR`.

Modes (`--mode`): train (default), eval, baselines, ablate, suite, suite_table1,
export, serve, embed, synth, preprocess, benchmark. Every
mode prints one JSON object as the last line of stdout and writes the same
object to DIR/<mode>.json. Config fields are overridden with
`--config.data.vocab_size=30000` and the like; unknown fields are an error.
"""

import json
import logging as pylogging
import os
import re
import sys

from mardjax import xla_env

xla_env.apply_defaults()  # Before anything imports jax.

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mardjax import compile_cache
from mardjax import modes
from mardjax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/default.py.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for data, checkpoints, results.')
flags.DEFINE_enum('mode', 'train', list(modes.MODES), 'What to run.')
flags.DEFINE_bool('force', False, 'Redo work even when outputs are up to date.')
flags.DEFINE_bool('progress', True, 'Show progress bars on stderr.')
flags.DEFINE_string('coordinator_address', None,
                    'Multi-host: host:port of process 0, e.g. 10.0.0.1:1234.')
flags.DEFINE_integer('num_processes', 1, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', 0, 'Multi-host: this process (0-based).')
flags.DEFINE_string('host', '127.0.0.1', '--mode=serve: address to listen on.')
flags.DEFINE_integer('port', 8000, '--mode=serve: port to listen on.')
flags.DEFINE_string('input_dir', None, '--mode=embed: folder of recordings '
                    '(wav, mp3, flac, ogg) and AcousticBrainz .json files.')
flags.DEFINE_string('output_dir', None,
                    '--mode=embed: where to write (default DIR/embedded).')
flags.DEFINE_string('text', None, '--mode=query: a typed description.')
flags.DEFINE_string('file', None, '--mode=query: a recording (wav, mp3, '
                    'flac, ogg) or an AcousticBrainz .json document.')
flags.DEFINE_integer('k', 10, '--mode=query: answers of each kind (1 to '
                     '100).')
flags.DEFINE_string(
    'compile_cache', compile_cache.flag_default(),
    "jax's persistent compilation cache: a directory (compiled programs "
    "kept for the next run), or 'off'.")
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv):
  """absl's flag parsing, with one clear line for a mistyped config field."""
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError) as e:
    # ml_collections raises these for overrides of fields the config lacks;
    # its message already suggests the closest field name.
    message = str(e.args[0] if e.args else e)
    field = re.search(r'[A-Za-z_]\w*', message)
    hint = re.search(r'Did you mean "([^"]+)"', message)
    print(f'error: the config has no field '
          f'{field.group(0) if field else message!r} in a --config override'
          + (f' (did you mean {hint.group(1)!r}?)' if hint else ''),
          file=sys.stderr)
  except flags.Error as e:
    print(f'error: {e}\nPass --helpfull to see all flags.', file=sys.stderr)
  sys.exit(2)


class _QuietLibraries(pylogging.Filter):
  """Drops INFO chatter of orbax (a dozen lines per checkpoint)."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or 'orbax' not in (
        record.pathname)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  workdir = os.path.abspath(FLAGS.workdir)
  compile_cache.enable(FLAGS.compile_cache)
  try:
    if FLAGS.num_processes > 1:
      modes.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                             FLAGS.process_id)
    overridden = frozenset(
        a[len('--config.'):].split('=')[0] for a in sys.argv[1:]
        if a.startswith('--config.'))
    result = modes.run_mode(FLAGS.mode, FLAGS.config, workdir,
                            force=FLAGS.force, show_progress=FLAGS.progress,
                            host=FLAGS.host, port=FLAGS.port,
                            input_dir=FLAGS.input_dir,
                            output_dir=FLAGS.output_dir,
                            text=FLAGS.text, file=FLAGS.file, k=FLAGS.k,
                            overridden=overridden)
  except UserError as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  result = dict(mode=FLAGS.mode, **result)  # The workdir exists by now.
  line = json.dumps(result, sort_keys=True)
  if FLAGS.process_id == 0:  # One writer per workdir.
    with open(os.path.join(workdir, f'{FLAGS.mode}.json'), 'w') as f:
      f.write(line + '\n')
  print(line, flush=True)
  if result.get('exit_status'):  # Output written, but not as promised.
    sys.exit(result['exit_status'])


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
