"""The package's shape: layers that import one way, no import cycle, a
light serving import, short functions, and evaluation programs compiled
once.

The layer rule, lowest floor first (`LAYERS`); a module may import its own
floor and the floors below it, lazy imports inside functions included:

  common        errors, progress, xla_env, plan, the package's __init__
  data, models, train, evaluation, serve
                the library; evaluation and serve reach training only
                through `train/checkpoints.py` (`TRAIN_GATEWAY`)
  config_check  the config validator: above every layer whose registries
                it asks (through their public `check_config`), below all
                that validate a config before work
  stages        `mardjax/stages.py`: the stages the modes and the
                experiments compose (corpus, preprocessing, training with
                its evaluator, a run's settings)
  experiments   ablation and the benchmarks; they use the stages, never
                the mode registry
  modes         `mardjax/modes.py`, the mode registry: the top of the
                package, imported by nothing in it
  launch        `launch.py`, which imports only `LAUNCH_IMPORTS`

`configs/` is apart from the package: a config imports only other configs,
and nothing in `mardjax/` imports `configs/`. Within a floor (the
experiments among themselves, say) any import is allowed that closes no
cycle: the import graph of `mardjax/`, `launch.py` and `configs/` has none.
"""

import ast
import os
import subprocess
import sys

import jax
import numpy as np

from tests.conftest import ROOT

PACKAGE = os.path.join(ROOT, 'mardjax')
CONFIGS = os.path.join(ROOT, 'configs')
# Lowest first. A module may import its own layer and the layers below it.
LAYERS = ('common', 'data', 'models', 'train', 'evaluation', 'serve',
          'config_check', 'stages', 'experiments', 'modes', 'launch')
# Modules of the package's root, by layer (sub-packages are their own).
ROOT_MODULES = {'compile_cache': 'common', 'errors': 'common',
                'progress': 'common', 'xla_env': 'common',
                'plan': 'common', 'config_check': 'config_check',
                'stages': 'stages', 'modes': 'modes'}
# From the training layer, these layers import only `TRAIN_GATEWAY`.
GATEWAY_LAYERS = ('evaluation', 'serve')
TRAIN_GATEWAY = 'mardjax.train.checkpoints'
LAUNCH_IMPORTS = ('mardjax.modes', 'mardjax.xla_env', 'mardjax.errors',
                  'mardjax.compile_cache')
LONG_FUNCTION_LINES = 80


def _layer(module: str) -> str | None:
  """The layer of a dotted module name (`configs` for configs/), or None for
  a module the rule does not place."""
  parts = module.split('.')
  if parts[0] == 'configs':
    return 'configs'
  if module == 'launch':
    return 'launch'
  if module == 'mardjax':  # The package's own __init__.
    return 'common'
  if len(parts) > 1 and parts[1] in LAYERS and parts[1] not in (
      'common', 'launch'):
    return parts[1]
  return ROOT_MODULES.get(parts[1]) if len(parts) > 1 else None


def _sources():
  """(path, dotted module, source) of every module the rule covers:
  mardjax/, configs/ and launch.py."""
  for top in (PACKAGE, CONFIGS):
    for folder, _, files in os.walk(top):
      for name in sorted(files):
        if name.endswith('.py'):
          path = os.path.join(folder, name)
          rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
          with open(path) as f:
            yield path, rel.removesuffix('.__init__'), f.read()
  path = os.path.join(ROOT, 'launch.py')
  with open(path) as f:
    yield path, 'launch', f.read()


def _imports(source: str, known: set[str]):
  """(line, imported module) of every import of mardjax or configs in a
  source, lazy ones inside functions included. `from a import b` imports
  the module `a.b` when that is one of `known`, else `a`."""
  mine = ('mardjax', 'configs')
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split('.')[0] in mine:
          yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom) and (
        node.module or '').split('.')[0] in mine:
      for alias in node.names:
        full = f'{node.module}.{alias.name}'
        yield node.lineno, full if full in known else node.module


def _graph(extra=()):
  """[(path, module, [(line, imported module)])] of every covered module,
  and of `extra` (path, module, source) ones (probes, never written to
  disk)."""
  sources = list(_sources()) + list(extra)
  known = {module for _, module, _ in sources}
  return [(path, module, list(_imports(source, known)))
          for path, module, source in sources]


def _violation(here: str, target: str) -> str | None:
  """Why a module of layer `here` must not import `target`; None: it may."""
  there = _layer(target)
  if here == 'configs' or there == 'configs':
    if here != there:
      return 'configs/ and mardjax/ import nothing from each other'
    return None
  if there is None:
    return f'{target} is in no layer: place it in LAYERS or ROOT_MODULES'
  if here == 'launch' and target not in LAUNCH_IMPORTS:
    return f'launch.py imports only {LAUNCH_IMPORTS}'
  if LAYERS.index(there) > LAYERS.index(here):
    return f'layer {here} must not import layer {there}'
  if (there == 'train' and here in GATEWAY_LAYERS and
      target != TRAIN_GATEWAY):
    return f'layer {here} reaches training only through {TRAIN_GATEWAY}'
  return None


def layer_violations(extra=()):
  """'file:line imports module (why)' for every import against the rule,
  and every module the rule does not place; `extra`: (path, module,
  source) of modules to check as if they were there."""
  out = []
  for path, module, imports in _graph(extra):
    here = _layer(module)
    where = os.path.relpath(path, ROOT)
    if here is None:
      out.append(f'{where} is in no layer: place it in LAYERS or '
                 'ROOT_MODULES')
      continue
    for line, target in imports:
      why = _violation(here, target)
      if why:
        out.append(f'{where}:{line} imports {target} ({why})')
  return out


def import_cycles(extra=()):
  """Every cycle of the import graph (module-level and lazy imports alike),
  each as 'a -> b -> a', one per strongly connected set of modules."""
  graph = {module: {t for _, t in imports} for _, module, imports in
           _graph(extra)}
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def visit(node):  # Tarjan's strongly connected components.
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for nxt in sorted(graph.get(node, ())):
      if nxt not in index:
        visit(nxt)
        low[node] = min(low[node], low[nxt])
      elif nxt in on_stack:
        low[node] = min(low[node], index[nxt])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1 or node in graph.get(node, ()):
        cycles.append(_cycle_through(sorted(component), graph))
  for node in sorted(graph):
    if node not in index:
      visit(node)
  return cycles


def _cycle_through(component: list[str], graph) -> str:
  """One cycle inside a strongly connected set, as 'a -> b -> a'."""
  members, path = set(component), [component[0]]
  while True:
    nxt = sorted(graph[path[-1]] & members)
    step = next((n for n in nxt if n not in path), None) or next(
        n for n in nxt if n in path)
    if step in path:
      return ' -> '.join(path[path.index(step):] + [step])
    path.append(step)


def test_imports_follow_the_layers():
  assert layer_violations() == []


def test_the_import_graph_has_no_cycle():
  assert import_cycles() == []


def _probe(folder: str, name: str, source: str):
  """A module to check as if it were `folder/name.py` (never written)."""
  path = os.path.join(ROOT, *folder.split('/'), f'{name}.py')
  module = '.'.join(folder.split('/') + [name])
  return path, module, source


def test_the_rule_catches_a_bad_import():
  # The checker itself: an import against the rule is named with its file.
  probe = _probe('mardjax/data', '_layers_probe',
                 'from mardjax.serve import export\n'
                 'from mardjax.train import trainer\n')
  found = layer_violations([probe])
  assert any('mardjax/data/_layers_probe.py:1 imports mardjax.serve.export'
             in v and 'layer data must not import layer serve' in v
             for v in found), found
  assert any('_layers_probe.py:2 imports mardjax.train.trainer' in v
             for v in found), found


def test_the_rule_covers_the_top_floor():
  probes = [
      _probe('mardjax/experiments', '_probe', 'def f():\n'
             '  from mardjax import modes\n'),
      _probe('mardjax', '_probe', 'import os\n'),
      _probe('configs', '_probe', 'from mardjax import stages\n'),
      _probe('mardjax/data', '_probe', 'from configs import default\n'),
      _probe('mardjax/serve', '_probe', 'from mardjax import stages\n'),
  ]
  found = '\n'.join(layer_violations(probes))
  assert ('mardjax/experiments/_probe.py:2 imports mardjax.modes (layer '
          'experiments must not import layer modes)') in found, found
  assert 'mardjax/_probe.py is in no layer' in found, found
  assert 'configs/_probe.py:1 imports mardjax.stages (configs/' in found
  assert 'mardjax/data/_probe.py:1 imports configs.default (configs/' in (
      found)
  assert ('mardjax/serve/_probe.py:1 imports mardjax.stages (layer serve '
          'must not import layer stages)') in found, found


def test_a_cycle_is_found_lazy_imports_included():
  probes = [
      _probe('mardjax/experiments', '_probe_a',
             'from mardjax.experiments import _probe_b\n'),
      _probe('mardjax/experiments', '_probe_b', 'def f():\n'
             '  from mardjax.experiments import _probe_c\n'),
      _probe('mardjax/experiments', '_probe_c',
             'import mardjax.experiments._probe_a\n'),
  ]
  assert import_cycles(probes) == [
      'mardjax.experiments._probe_a -> mardjax.experiments._probe_b -> '
      'mardjax.experiments._probe_c -> mardjax.experiments._probe_a']
  # Imports that are allowed one by one can still close a cycle.
  assert not [v for v in layer_violations(probes) if '_probe' in v]


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
  for path, module, source in _sources():
    if _layer(module) == 'configs':  # A config is one long function.
      continue
    for node in ast.walk(ast.parse(source)):
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
