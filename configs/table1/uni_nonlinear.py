"""Table 1, row 1: non-linear, uni-directional loss (l2 = 0), no
neighbourhood sampling."""

from configs import default


def get_config():
  config = default.get_config()
  config.train.neighbourhood_sampling = False
  config.loss.weights = (1.0, 0.0, 0.1, 0.1)
  return config
