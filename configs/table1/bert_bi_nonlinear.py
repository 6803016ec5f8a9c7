"""Table 1, row 3: pretrained (BERT) text features, non-linear,
bi-directional, no neighbourhood sampling. Needs
config.data.text_encoder_path (a local Hugging Face model directory)."""

from configs import default


def get_config():
  config = default.get_config()
  config.train.neighbourhood_sampling = False
  config.model.text_encoder = 'pretrained'
  return config
