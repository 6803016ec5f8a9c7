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
