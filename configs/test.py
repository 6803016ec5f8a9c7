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
  config.model.word_dim = 16
  config.model.hidden_dim = 32
  config.model.embed_dim = 16
  config.model.lstm_dim = 16
  config.loss.negatives = 'sampled:5'
  config.train.batch_size = 32
  config.train.num_steps = 30
  config.train.log_every = 10
  config.train.checkpoint_every = 10
  config.train.eval_every = 20
  # Selection on dev: the tiny corpus's 250-odd training reviews would hold
  # out some 25 for a validation share, too few to choose a model by, and
  # fill fewer batches. The tests of that selection set it.
  config.eval.validation_fraction = 0.0
  return config
