"""Mutation testing of the modules where a silent bug costs most.

  python -m tests.mutation.run                # every target, then the report
  python -m tests.mutation.run splits metrics # some targets
  python -m tests.mutation.run --report       # only rewrite the report

Each target is one module and the tests that guard it (`TARGETS`). Cosmic
Ray (requirements-dev.txt) writes each mutant into the module in turn and
runs those tests: a mutant the tests fail on is killed, one they pass is a
survivor. A survivor is either a test still to write or an equivalent mutant
(the program behaves the same, e.g. `x * 1` -> `x / 1`), listed with its
reason in `equivalent.toml` (by operator and the original line of code). A
mutant that only a slower test outside the target's reaches (several
processes) is listed there too, with `killed_by` naming that test, run on it
by hand: the report counts it killed and names the test.
Progress is kept under `.mutation/` (not committed), so a run that stops
resumes where it was. A target whose module changed since it began starts
again; one whose tests changed runs again its survivors not listed as
equivalent (tests are added or made stronger, so a mutant once killed stays
killed). Each target keeps a
persistent JAX compilation cache there too: a mutant recompiles only the
programs it changed.

The report, docs/mutation.md, gives each target's score (killed over the
mutants that are not equivalent) and every survivor with its diff.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
SESSIONS = os.path.join(ROOT, '.mutation')
REPORT = os.path.join(ROOT, 'docs', 'mutation.md')
EQUIVALENT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          'equivalent.toml')
# Operators whose mutants are not bugs anyone writes (`a + b` -> `a << b`)
# and that multiply the count without finding weak tests: the arithmetic
# swaps kept are + -, * /, and every comparison, constant, boolean, unary
# sign, exception and decorator mutation.
EXCLUDED_OPERATORS = (
    r'core/ReplaceBinaryOperator_\w+_(BitAnd|BitOr|BitXor|LShift|RShift|'
    r'Pow|Mod|FloorDiv)$',
    r'core/ReplaceBinaryOperator_(BitAnd|BitOr|BitXor|LShift|RShift|Pow|'
    r'Mod|FloorDiv)_\w+$',
    r'core/ReplaceBinaryOperator_(Add_Mul|Add_Div|Sub_Mul|Sub_Div|Mul_Add|'
    r'Mul_Sub|Div_Add|Div_Sub)$',
    r'core/ReplaceComparisonOperator_\w+_(Is|IsNot)$',
    r'core/ReplaceUnaryOperator_\w+_(Invert|Not)$',
)


@dataclasses.dataclass(frozen=True)
class Target:
  """A module under mutation and the tests that must catch its mutants."""
  name: str
  module: str
  tests: tuple[str, ...]
  timeout_s: float = 300.0
  # A pytest -k expression: the tests of those files that reach the module
  # (the others only cost time per mutant).
  select: str = ''


TARGETS = (
    Target('splits', 'mardjax/data/splits.py', ('tests/splits_test.py',)),
    Target('metrics', 'mardjax/evaluation/metrics.py',
           ('tests/metrics_test.py',)),
    Target('descriptors', 'mardjax/data/descriptors.py',
           ('tests/descriptors_test.py',)),
    Target('losses', 'mardjax/train/losses.py', ('tests/losses_test.py',),
           timeout_s=600.0),
    Target('ingest', 'mardjax/data/ingest.py', ('tests/preprocess_test.py',),
           timeout_s=600.0),
    Target('checkpoints', 'mardjax/train/checkpoints.py',
           ('tests/checkpoints_test.py', 'tests/checkpoint_integrity_test.py'),
           timeout_s=600.0),
    Target('batches', 'mardjax/train/index_batches.py',
           ('tests/index_batches_test.py', 'tests/train_step_test.py'),
           timeout_s=600.0,
           select=('index_batches_test or index_step or positive_list_width '
                   'or flat_layout')),
)


def _tests_label(target: Target) -> str:
  label = ', '.join(target.tests)
  return f'{label} -k "{target.select}"' if target.select else label


def _fingerprint(paths) -> str:
  h = hashlib.sha256()
  for path in paths:
    with open(os.path.join(ROOT, path), 'rb') as f:
      h.update(f.read())
  return h.hexdigest()[:16]


def _config(target: Target) -> str:
  tests = ' '.join(target.tests)
  # One process, stop at the first failure: a killed mutant costs one
  # failing test, and nothing else runs beside the mutated module.
  command = (f'{sys.executable} -m pytest -x -q -n 0 -p no:cacheprovider '
             f'-p no:randomly {tests}')
  if target.select:
    command += f' -k {shlex.quote(target.select)}'
  excluded = ', '.join(json.dumps(e) for e in EXCLUDED_OPERATORS)
  return (f'[cosmic-ray]\nmodule-path = "{target.module}"\n'
          f'timeout = {target.timeout_s}\nexcluded-modules = []\n'
          f'test-command = {json.dumps(command)}\n\n'
          '[cosmic-ray.distributor]\nname = "local"\n\n'
          '[cosmic-ray.filters.operators-filter]\n'
          f'exclude-operators = [{excluded}]\n')


def _cosmic(*args: str, env=None) -> None:
  subprocess.run([os.path.join(os.path.dirname(sys.executable), args[0]),
                  *args[1:]], cwd=ROOT, check=True, env=env)


def _retest_survivors(target: Target, db: str) -> int:
  """Forgets the results of the survivors not listed as equivalent (no
  test can kill those), so that the next exec runs them again."""
  equivalent = _equivalent().get(target.name, [])
  con = sqlite3.connect(db)
  with con:
    rows = con.execute(
        "SELECT s.job_id, s.operator_name, r.diff FROM mutation_specs s "
        "JOIN work_results r ON s.job_id = r.job_id "
        "WHERE r.test_outcome = 'SURVIVED'").fetchall()
    again = [(job,) for job, operator, diff in rows
             if _listed(equivalent, operator, diff) is None]
    con.executemany('DELETE FROM work_results WHERE job_id = ?', again)
  con.close()
  return len(again)


def _stamp(target: Target) -> tuple[str, str]:
  """(module, tests) fingerprints as a target's progress records them."""
  return (_fingerprint((target.module,)),
          hashlib.sha256((_fingerprint(target.tests) + target.select)
                         .encode()).hexdigest()[:16])


def _progress_is_current(target: Target) -> bool:
  """Whether the target's progress under SESSIONS was measured on the
  module and tests as they are (its stamp): progress of other code says
  nothing of this code."""
  stamp = os.path.join(SESSIONS, f'{target.name}.fingerprint')
  if not (os.path.exists(stamp) and os.path.exists(
      os.path.join(SESSIONS, f'{target.name}.sqlite'))):
    return False
  with open(stamp) as f:
    return f.read().split() == list(_stamp(target))


def unchanged_since_commit(module: str, root: str = ROOT) -> bool:
  """Whether `module` is as the checkout's last commit has it (a run
  stopped midway leaves its last mutant written into the module)."""
  return subprocess.run(['git', 'diff', '--quiet', 'HEAD', '--', module],
                        cwd=root).returncode == 0


def run_target(target: Target) -> None:
  """Runs (or resumes) the target's mutants.

  Raises:
    SystemExit: the module differs from the last commit: resuming would
      take a mutant left in it for the code (and set every result aside).
  """
  if not unchanged_since_commit(target.module):
    raise SystemExit(
        f'[mutation] {target.module} differs from the last commit: a run '
        f'stopped midway leaves a mutant in it. Restore it (git checkout -- '
        f'{target.module}) or commit the change, then run again.')
  os.makedirs(SESSIONS, exist_ok=True)
  config = os.path.join(SESSIONS, f'{target.name}.toml')
  db = os.path.join(SESSIONS, f'{target.name}.sqlite')
  stamp = os.path.join(SESSIONS, f'{target.name}.fingerprint')
  module, tests = _stamp(target)
  old = open(stamp).read().split() if os.path.exists(stamp) else []
  if len(old) != 2 or old[0] != module or not os.path.exists(db):
    # The old results are set aside, never deleted: they belong to other
    # code, but hours of them may still say where the tests are weak.
    if os.path.exists(db):
      os.replace(db, f'{db}.{old[0] if old else "unknown"}')
    with open(config, 'w') as f:
      f.write(_config(target))
    _cosmic('cosmic-ray', 'init', config, db)
    _cosmic('cr-filter-operators', db, config)
    _cosmic('cr-filter-pragma', db)
  elif old[1] != tests:
    with open(config, 'w') as f:
      f.write(_config(target))
    print(f'[mutation] {target.name}: tests changed, '
          f'{_retest_survivors(target, db)} survivors run again', flush=True)
  with open(stamp, 'w') as f:
    f.write(f'{module} {tests}')
  print(f'[mutation] {target.name}: {target.module} against '
        f'{_tests_label(target)}', flush=True)
  env = dict(os.environ,
             JAX_COMPILATION_CACHE_DIR=os.path.join(
                 SESSIONS, f'{target.name}.jax-cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  _cosmic('cosmic-ray', 'exec', config, db, env=env)


def _equivalent() -> dict[str, list[dict[str, str]]]:
  """target -> its entries of equivalent.toml: operator, the original line
  (code), optionally the mutated line (mutant: where only some mutants of
  that code are equivalent), and why. Keyed by the code, not its line
  number, so entries survive edits elsewhere in the module."""
  if not os.path.exists(EQUIVALENT):
    return {}
  with open(EQUIVALENT, 'rb') as f:
    return tomllib.load(f)


def _changed_lines(diff: str, sign: str) -> list[str]:
  return [d[1:].strip() for d in diff.splitlines()
          if re.match(rf'\{sign}[^{sign}]', d)]


def _original_line(diff: str) -> str:
  removed = _changed_lines(diff, '-')
  return removed[0] if removed else ''


def _listed(entries: list[dict[str, str]], operator: str,
            diff: str) -> dict[str, str] | None:
  """The entry of equivalent.toml for a surviving mutant, or None."""
  code, mutant = _original_line(diff), ' '.join(_changed_lines(diff, '+'))
  for e in entries:
    if (e['operator'] == operator and e['code'].strip() == code and
        e.get('mutant', mutant).strip() == mutant):
      return e
  return None


def _why_equivalent(entries: list[dict[str, str]], operator: str,
                    diff: str) -> str | None:
  """Why a surviving mutant is equivalent, or None when it is not listed
  as equivalent (not listed, or killed by a test outside the target's)."""
  e = _listed(entries, operator, diff)
  return e['why'] if e and 'killed_by' not in e else None


def _killed_by(entries: list[dict[str, str]], operator: str,
               diff: str) -> str | None:
  """The test outside the target's that kills a surviving mutant, with
  why only it reaches it; None when not listed so."""
  e = _listed(entries, operator, diff)
  return f'{e["killed_by"]}: {e["why"]}' if e and 'killed_by' in e else None


def _outcomes(db: str) -> list[dict]:
  """Every mutant in a progress database: operator, line, occurrence, outcome, diff."""
  con = sqlite3.connect(db)
  rows = con.execute(
      'SELECT s.operator_name, s.start_pos_row, s.occurrence, '
      'r.test_outcome, r.diff, r.worker_outcome FROM mutation_specs s '
      'LEFT JOIN work_results r ON s.job_id = r.job_id').fetchall()
  con.close()
  return [dict(operator=o, line=line, occurrence=occ, outcome=out,
               diff=diff or '', worker=worker)
          for o, line, occ, out, diff, worker in rows]


def _target_fingerprint(target: Target) -> str:
  """The module's and the tests' fingerprints, as the report records them:
  the results a report carries belong to exactly this code."""
  tests = hashlib.sha256((_fingerprint(target.tests) + target.select)
                         .encode()).hexdigest()[:8]
  return f'{_fingerprint((target.module,))[:8]}/{tests}'


def _previous(target: Target) -> tuple[str, list[str]] | None:
  """The target's table row and sections in the report as it stands, when
  they were measured on the same code (`_target_fingerprint`): a checkout
  without that target's progress keeps its results."""
  if not os.path.exists(REPORT):
    return None
  with open(REPORT) as f:
    text = f.read()
  row = next((line for line in text.splitlines()
              if line.startswith(f'| `{target.module}` |')), None)
  if row is None or not row.rstrip(' |').endswith(
      f'`{_target_fingerprint(target)}`'):
    return None
  sections = [f'## {part}'.rstrip('\n') for part in text.split('\n## ')[1:]
              if part.startswith(f'{target.name}: ')]
  return row, sections


def write_report() -> str:
  """docs/mutation.md from every target's progress measured on the code as
  it is (or, for a target without such progress here, its results already
  in the report, if measured on the same code); returns its text."""
  equivalent = _equivalent()
  lines = ['# Mutation testing', '',
           'Generated by `python -m tests.mutation.run` (see '
           '[tests.md](tests.md#mutation-testing)); do not edit. '
           '`code`: the fingerprints of the module and of its tests that the '
           'figures belong to.', '',
           '| module | tests | mutants | killed | equivalent | survived | '
           'not run | score | code |',
           '|---|---|---:|---:|---:|---:|---:|---:|---|']
  details = []
  for target in TARGETS:
    db = os.path.join(SESSIONS, f'{target.name}.sqlite')
    code = f'`{_target_fingerprint(target)}`'
    if not _progress_is_current(target):
      previous = _previous(target)
      if previous:
        lines.append(previous[0])
        details += [''] + '\n\n'.join(previous[1]).split('\n')
      else:
        lines.append(f'| `{target.module}` | {_tests_label(target)} | '
                     f'- | - | - | - | not run yet | - | {code} |')
      continue
    eq = equivalent.get(target.name, [])
    rows = [r for r in _outcomes(db) if r['worker'] != 'SKIPPED']
    done = [r for r in rows if r['outcome'] is not None]
    # An incompetent mutant (one that cannot even import) is caught too.
    outside = [r for r in done if r['outcome'] == 'SURVIVED' and
               _killed_by(eq, r['operator'], r['diff']) is not None]
    killed = [r for r in done
              if r['outcome'] in ('KILLED', 'INCOMPETENT')] + outside
    same = [r for r in done if r['outcome'] == 'SURVIVED' and
            _why_equivalent(eq, r['operator'], r['diff']) is not None]
    survived = [r for r in done if r['outcome'] == 'SURVIVED' and r not in
                same and r not in outside]
    scored = len(done) - len(same)
    score = f'{100 * len(killed) / scored:.1f}%' if scored else '-'
    lines.append(f'| `{target.module}` | {_tests_label(target)} | '
                 f'{len(rows)} | {len(killed)} | {len(same)} | '
                 f'{len(survived)} | {len(rows) - len(done)} | {score} | '
                 f'{code} |')
    for title, group in (('survived', survived), ('equivalent', same),
                         ('killed by other tests', outside)):
      if not group:
        continue
      details += ['', f'## {target.name}: {title}', '']
      for r in sorted(group, key=lambda r: (r['line'], r['operator'])):
        why = (_why_equivalent(eq, r['operator'], r['diff']) or
               _killed_by(eq, r['operator'], r['diff']))
        why = f' — {why}' if why else ''
        details.append(f'* line {r["line"]}, `{r["operator"]}` '
                       f'(occurrence {r["occurrence"]}){why}')
        diff = [d for d in r['diff'].splitlines()
                if re.match(r'[-+][^-+]', d)]
        if diff:
          details += ['  ```diff'] + [f'  {d}' for d in diff] + ['  ```']
  text = '\n'.join(lines + details) + '\n'
  with open(REPORT, 'w') as f:
    f.write(text)
  return text


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('targets', nargs='*',
                      help=f'of {[t.name for t in TARGETS]} (default: all)')
  parser.add_argument('--report', action='store_true',
                      help='only rewrite docs/mutation.md')
  args = parser.parse_args(argv)
  names = {t.name: t for t in TARGETS}
  unknown = sorted(set(args.targets) - set(names))
  if unknown:
    parser.error(f'unknown targets {unknown}; choose from {sorted(names)}')
  if not args.report:
    for name in args.targets or names:
      run_target(names[name])
  print(write_report().split('\n\n## ')[0])


if __name__ == '__main__':
  main()
