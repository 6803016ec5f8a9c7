"""Table 1, row 5: LSTM text encoder, non-linear, bi-directional, no
neighbourhood sampling."""

from configs import default


def get_config():
  config = default.get_config()
  config.train.neighbourhood_sampling = False
  config.model.text_encoder = 'lstm'
  return config
