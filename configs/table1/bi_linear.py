"""Table 1, row 2: linear (one Dense per branch), bi-directional loss, no
neighbourhood sampling."""

from configs import default


def get_config():
  config = default.get_config()
  config.train.neighbourhood_sampling = False
  config.model.linear = True
  return config
