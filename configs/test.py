"""Tiny config for CPU tests: seconds, not minutes."""

from configs import default


def get_config():
  """Returns the test config."""
  config = default.get_config()
  config.data.vocab_size = 500
  config.data.max_len = 64
  config.data.examples_per_shard = 100
  config.data.albums_per_shard = 20
  config.data.num_workers = 1
  config.data.synth_preset = 'tiny'
  return config
