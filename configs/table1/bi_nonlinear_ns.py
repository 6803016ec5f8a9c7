"""Table 1, row 6 (the paper's best): non-linear, bi-directional,
neighbourhood sampling. Identical to configs/default.py."""

from configs import default


def get_config():
  return default.get_config()
