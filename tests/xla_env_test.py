"""XLA flag defaults: the CPU scheduler flag, and the GPU scatter workaround
only where the installed jax needs it."""

import os

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
