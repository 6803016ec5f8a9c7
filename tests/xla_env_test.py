"""XLA flag defaults: the CPU scheduler flag, and the GPU scatter workaround
only where the installed jax needs it."""

import os
import platform
import subprocess
import sys

import pytest

from mardjax import xla_env


@pytest.fixture
def slow_scatter_gpu(monkeypatch):
  """An install with a CUDA plugin and a jax whose GPU scatter is slow."""
  monkeypatch.setattr(xla_env, '_jax_version', lambda: (0, 10, 2))
  monkeypatch.setattr(xla_env, '_cuda_plugin_installed', lambda: True)
  return monkeypatch


def test_defaults_keep_the_users_own_setting(monkeypatch):
  monkeypatch.setenv(
      'XLA_FLAGS', '--xla_force_host_platform_device_count=2 '
      '--xla_cpu_enable_concurrency_optimized_scheduler=true')
  xla_env.apply_defaults()
  flags = os.environ['XLA_FLAGS']
  assert flags.count('concurrency_optimized_scheduler') == 1
  assert 'scheduler=true' in flags and 'device_count=2' in flags


def test_no_gpu_workaround_without_a_cuda_plugin(monkeypatch):
  """An affected jax with no CUDA plugin: the flags are left as they are."""
  monkeypatch.setattr(xla_env, '_jax_version', lambda: (0, 10, 2))
  monkeypatch.setattr(xla_env, '_cuda_plugin_installed', lambda: False)
  assert xla_env.gpu_scatter_workaround('--a=1') == '--a=1'


def test_no_gpu_workaround_on_a_cpu_only_install():
  """The install running the suite, when it has no CUDA plugin (found the
  way the module finds it): no workaround whatever the jax version."""
  if xla_env._cuda_plugin_installed():  # pylint: disable=protected-access
    pytest.skip('a CUDA plugin is installed here; the case with a plugin '
                'is checked with a stubbed install below')
  assert xla_env.gpu_scatter_workaround('--a=1') == '--a=1'


def test_gpu_workaround_where_the_installed_jax_needs_it(slow_scatter_gpu):
  assert xla_env.gpu_scatter_workaround('') == (
      '--xla_backend_extra_options=-nvptx-allow-ftz-atomics')
  # Joined to the user's own extra options, the other flags kept.
  assert xla_env.gpu_scatter_workaround(
      '--a=1 --xla_backend_extra_options=-x=2') == (
          '--a=1 --xla_backend_extra_options=-x=2,-nvptx-allow-ftz-atomics')
  # The user's choice wins: the option already there, or flush-to-zero.
  for flags in ('--xla_backend_extra_options=-nvptx-allow-ftz-atomics',
                '--xla_gpu_ftz=false'):
    assert xla_env.gpu_scatter_workaround(flags) == flags
  # Fixed jax versions, before and after, get nothing.
  for version in ((0, 10, 1), (0, 11, 1), (0, 11, 2)):
    slow_scatter_gpu.setattr(xla_env, '_jax_version', lambda v=version: v)
    assert xla_env.gpu_scatter_workaround('--a=1') == '--a=1'
  slow_scatter_gpu.setattr(xla_env, '_jax_version', lambda: (0, 11, 0))
  assert xla_env.FTZ_ATOMICS in xla_env.gpu_scatter_workaround('')


def test_apply_defaults_adds_the_gpu_workaround(slow_scatter_gpu):
  slow_scatter_gpu.setenv('XLA_FLAGS', '--a=1')
  xla_env.apply_defaults()
  assert os.environ['XLA_FLAGS'] == (
      '--a=1 --xla_cpu_enable_concurrency_optimized_scheduler=false '
      '--xla_backend_extra_options=-nvptx-allow-ftz-atomics')


# A fresh process whose worker thread (as XLA's runtime runs a step)
# allocates, touches and frees blocks of 1 to 8 MiB and one larger than
# glibc's largest mmap threshold, 112 MiB a round; it prints whether the
# setting was applied and the page faults of the later rounds per round.
# numpy's huge-page advice is off, so that a fault is one 4 KiB page, as
# in XLA's own buffers.
_FAULTS_PER_ROUND = '''
import resource, threading
from mardjax import xla_env
print(xla_env.keep_freed_memory())
import numpy as np
def rounds(n):
  for _ in range(n):
    blocks = [np.empty((1 << 20) * (1 + i % 8), np.uint8) for i in range(16)]
    blocks.append(np.empty(40 << 20, np.uint8))
    for a in blocks:
      a[::4096] = 1
    del a, blocks
def run(n):
  t = threading.Thread(target=rounds, args=(n,))
  t.start()
  t.join()
run(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
run(5)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
'''


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_freed_memory_is_reused_without_page_faults():
  """With the setting, freed blocks are served again from the heap (no
  page faults); with the system's own settings a round faults thousands
  of its 28,672 pages in again."""
  def run(env):
    out = subprocess.run([sys.executable, '-c', _FAULTS_PER_ROUND],
                         env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__)))).stdout.split()
    return out[0], float(out[1])

  env = {k: v for k, v in os.environ.items()
         if k != xla_env.SYSTEM_MALLOC_ENV}
  env['NUMPY_MADVISE_HUGEPAGE'] = '0'
  if xla_env._accelerator_installed():  # pylint: disable=protected-access
    pytest.skip('an accelerator plugin is installed here: the setting is '
                'skipped (checked with a stubbed install below)')
  applied, kept = run(env)
  assert applied == 'True' and kept < 100
  applied, system = run(dict(env, **{xla_env.SYSTEM_MALLOC_ENV: '1'}))
  assert applied == 'False' and system > 1000


def test_freed_memory_setting_is_skipped_with_an_accelerator(monkeypatch):
  monkeypatch.setattr(xla_env, '_accelerator_installed', lambda: True)
  assert xla_env.keep_freed_memory() is False
