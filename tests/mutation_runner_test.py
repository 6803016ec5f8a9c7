"""The mutation runner's guard: it never resumes over a mutant left behind."""

import subprocess

from tests.mutation import run


def test_a_module_left_mutated_is_told_from_the_committed_one(tmp_path):
  def git(*args):
    subprocess.run(['git', *args], cwd=tmp_path, check=True,
                   capture_output=True)
  git('init', '-q')
  (tmp_path / 'm.py').write_text('x = 1\n')
  git('add', 'm.py')
  git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'm')
  assert run.unchanged_since_commit('m.py', str(tmp_path))
  (tmp_path / 'm.py').write_text('x = 2\n')  # A mutant left in place.
  assert not run.unchanged_since_commit('m.py', str(tmp_path))


def test_the_report_counts_each_survivor_as_listed(tmp_path, monkeypatch):
  """A survivor listed as equivalent is left out of the score; one listed
  with `killed_by` (a test outside the target's, run on it by hand) counts
  as killed and is named with its test; any other is a survivor."""
  import sqlite3  # pylint: disable=g-import-not-at-top
  target = run.Target('m', 'pkg/m.py', ('tests/m_test.py',))
  sessions = tmp_path / '.mutation'
  sessions.mkdir()
  con = sqlite3.connect(sessions / 'm.sqlite')
  con.execute('CREATE TABLE mutation_specs (job_id, operator_name, '
              'start_pos_row, occurrence)')
  con.execute('CREATE TABLE work_results (job_id, test_outcome, diff, '
              'worker_outcome)')
  mutants = [('1', 'core/A', 'x = a == b', 'x = a >= b', 'SURVIVED'),
             ('2', 'core/B', 'y = 1', 'y = 2', 'SURVIVED'),
             ('3', 'core/C', 'z = f(1)', 'z = f(0)', 'SURVIVED'),
             ('4', 'core/D', 'w = g()', 'w = not g()', 'KILLED')]
  for job, op, old, new, outcome in mutants:
    con.execute('INSERT INTO mutation_specs VALUES (?, ?, ?, 0)',
                (job, op, int(job)))
    con.execute('INSERT INTO work_results VALUES (?, ?, ?, ?)',
                (job, outcome, f'--- a\n+++ b\n-{old}\n+{new}\n', 'NORMAL'))
  con.commit()
  con.close()
  (tmp_path / 'eq.toml').write_text(
      '[[m]]\noperator = "core/A"\ncode = "x = a == b"\nwhy = "same"\n\n'
      '[[m]]\noperator = "core/B"\ncode = "y = 1"\n'
      'killed_by = "tests/slow_test.py::test_it"\nwhy = "two processes"\n')
  for name, value in (('SESSIONS', str(sessions)), ('TARGETS', (target,)),
                      ('EQUIVALENT', str(tmp_path / 'eq.toml')),
                      ('REPORT', str(tmp_path / 'report.md')),
                      ('ROOT', str(tmp_path))):
    monkeypatch.setattr(run, name, value)
  (tmp_path / 'pkg').mkdir()
  (tmp_path / 'pkg' / 'm.py').write_text('x = 1\n')
  (tmp_path / 'tests').mkdir()
  (tmp_path / 'tests' / 'm_test.py').write_text('')
  # Progress measured on other code is not reported as this code's.
  (sessions / 'm.fingerprint').write_text('0123 4567')
  stale = run.write_report()
  assert 'not run yet' in next(l for l in stale.splitlines()
                               if l.startswith('| `pkg/m.py`'))
  (sessions / 'm.fingerprint').write_text(' '.join(run._stamp(target)))  # pylint: disable=protected-access
  text = run.write_report()
  row = next(l for l in text.splitlines() if l.startswith('| `pkg/m.py`'))
  # mutants, killed (1 + the one killed outside), equivalent, survived,
  # not run, score = 2 / (4 - 1).
  assert row.split(' | ')[2:8] == ['4', '2', '1', '1', '0', '66.7%']
  assert '## m: killed by other tests' in text
  assert 'tests/slow_test.py::test_it: two processes' in text
  survived = text.split('## m: survived')[1].split('##')[0]
  assert 'z = f(0)' in survived and 'y = 2' not in survived
