"""The project's best recipe: the paper's model trained to retrieve better.

Same two-branch network, sizes and data as `configs/default.py` (the paper's
best row, which stays there and in `configs/table1/` for reproduction); the
changes, each with its effect on dev recall in the documentation (What
limits the paper's recipe):

* hardest negatives: the 10 closest wrong albums per (anchor, positive)
  instead of 10 uniform ones, most of which are already past the margin
  after a few epochs;
* a higher peak learning rate with warmup and cosine decay;
* word dropout: each training step reads half of a review's words, so the
  model cannot tie an album to one review's exact wording (without it,
  recall on training reviews reaches 0.9 while dev recall stalls at 0.2);
* early stopping on dev recall; the reported model is the best evaluation.
"""

from configs import default


def get_config():
  """Returns the best-recipe config."""
  config = default.get_config()
  config.loss.negatives = 'hardest:10'
  config.model.word_dropout = 0.5
  config.train.learning_rate = 3e-3
  config.train.warmup_steps = 200
  config.train.lr_schedule = 'cosine'
  config.train.num_epochs = 60
  config.train.eval_every = 500
  config.train.early_stop_patience = 4
  return config
