"""Extra row: the best model trained with symmetric InfoNCE instead of the
margin ranking loss."""

from configs import default


def get_config():
  config = default.get_config()
  config.loss.kind = 'infonce'
  return config
