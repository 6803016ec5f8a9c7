"""Table 1, row 4: non-linear, bi-directional, no neighbourhood sampling."""

from configs import default


def get_config():
  config = default.get_config()
  config.train.neighbourhood_sampling = False
  return config
