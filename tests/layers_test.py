"""The package's shape: layers that import one way, a light serving import,
short functions, and evaluation programs compiled once."""

import ast
import os
import subprocess
import sys

import jax
import numpy as np

from tests.conftest import ROOT

PACKAGE = os.path.join(ROOT, 'mardjax')
# Lowest first. A module may import its own layer and the layers below it.
LAYERS = ('common', 'data', 'models', 'train', 'evaluation', 'serve', 'top')
# From the training layer, the layers above it import only this module.
TRAIN_GATEWAY = 'mardjax.train.checkpoints'
LONG_FUNCTION_LINES = 80


def _layer(module: str) -> str:
  """The layer of a dotted module name under mardjax."""
  parts = module.split('.')
  if len(parts) == 1:  # The package's own __init__.
    return 'common'
  if parts[1] in LAYERS:
    return parts[1]
  # Shared helpers sit under every layer; the experiments (ablation,
  # benchmarks), the mode registry and the config check compose them all.
  return 'common' if parts[1] in ('errors', 'progress', 'xla_env') else 'top'


def _modules():
  for folder, _, files in os.walk(PACKAGE):
    for name in sorted(files):
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
        yield path, rel.removesuffix('.__init__')


def _imports(path: str):
  """(line, imported mardjax module) of every import in a file, lazy ones
  inside functions included."""
  tree = ast.parse(open(path).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith('mardjax'):
          yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith(
        'mardjax'):
      for alias in node.names:
        full = f'{node.module}.{alias.name}'
        # `from mardjax.x import y`: y is a module when it is a file.
        is_module = os.path.exists(os.path.join(
            ROOT, *full.split('.')) + '.py') or os.path.isdir(
                os.path.join(ROOT, *full.split('.')))
        yield node.lineno, full if is_module else node.module


def layer_violations():
  """'file:line imports module (layer a -> layer b)' for every import
  against the rule."""
  out = []
  for path, module in _modules():
    here = _layer(module)
    for line, target in _imports(path):
      there = _layer(target)
      where = f'{os.path.relpath(path, ROOT)}:{line} imports {target}'
      if LAYERS.index(there) > LAYERS.index(here):
        out.append(f'{where} (layer {here} must not import layer {there})')
      elif (there == 'train' and LAYERS.index(here) > LAYERS.index('train')
            and here != 'top' and target != TRAIN_GATEWAY):
        out.append(f'{where} (layer {here} reaches training only through '
                   f'{TRAIN_GATEWAY})')
  return out


def test_imports_follow_the_layers():
  assert layer_violations() == []


def test_the_rule_catches_a_bad_import():
  # The checker itself: an import against the rule is named with its file.
  bad = os.path.join(PACKAGE, 'data', '_layers_probe.py')
  with open(bad, 'w') as f:
    f.write('from mardjax.serve import export\n'
            'from mardjax.train import trainer\n')
  try:
    found = layer_violations()
  finally:
    os.remove(bad)
  assert any('mardjax/data/_layers_probe.py:1 imports mardjax.serve.export'
             in v and 'layer data must not import layer serve' in v
             for v in found), found
  assert any('_layers_probe.py:2 imports mardjax.train.trainer' in v
             for v in found), found


def test_serving_imports_no_training_optimizer_or_tensorflow():
  code = ('import sys\n'
          'import mardjax.serve.web, mardjax.serve.embedder, '
          'mardjax.serve.export, mardjax.serve.batch_embed\n'
          'bad = sorted(m for m in sys.modules if m.split(".")[0] in '
          '("tensorflow", "optax") or m in ("mardjax.train.trainer", '
          '"mardjax.train.train_step", "mardjax.train.losses", '
          '"mardjax.data.input_pipeline", "mardjax.data.records"))\n'
          'print(bad)\n')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  assert out.strip().splitlines()[-1] == '[]'


def _long_functions():
  out = []
  for path, _ in _modules():
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        doc = ast.get_docstring(node) or ''
        if lines > LONG_FUNCTION_LINES and 'lines because' not in doc:
          out.append(f'{os.path.relpath(path, ROOT)}:{node.lineno} '
                     f'{node.name} ({lines} lines)')
  return out


def test_functions_are_short_or_say_why():
  assert _long_functions() == []


def test_evaluation_compiles_once_across_evaluations(tiny_records):
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  from mardjax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  from mardjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from mardjax.models import embed  # pylint: disable=g-import-not-at-top
  from mardjax.models import two_branch  # pylint: disable=g-import-not-at-top
  _, manifest = tiny_records
  config = test_config.get_config()
  model = two_branch.from_manifest(config, manifest)
  audio = input_pipeline.load_audio_table(manifest)
  check = evaluate.dev_evaluator(config, model, manifest, audio)
  sizes = []
  for seed in range(3):  # Three different parameter sets, as in training.
    variables = model.init(jax.random.PRNGKey(seed),
                           **two_branch.dummy_inputs(config, manifest))
    result = check(variables)
    assert 0 <= result['recall@10'] <= 1
    # The tracks are embedded inside _album_directions' one program.
    sizes.append((embed.text._cache_size() + embed.text_layout._cache_size(),
                  embed._album_directions._cache_size()))
  assert sizes[0] == sizes[1] == sizes[2], sizes
  assert np.all(np.asarray(sizes[0]) >= 1)
