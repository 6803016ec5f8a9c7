"""The project's best recipe: the paper's sizes and data, trained to retrieve
better on held-out reviews and on albums never seen in training.

Chosen on the corpus suite (`--mode=suite`, five synthetic catalogues of
400 to 9,000 albums that differ where real ones do; docs/recipe.md has the
table); the paper's best row stays in `configs/default.py` and
`configs/table1/`. The changes:

* linear heads (one Dense per branch, as the paper's linear row): the
  non-linear heads fit the training albums better and carry over to new
  albums worse (docs/recipe.md has the variants tried);
* negatives: the 10 hardest wrong albums per (anchor, positive) and 10
  uniform ones beside them: the hardest keep the hinges active (the
  uniform ones alone are mostly past the margin after a few epochs), the
  uniform ones keep the layout of the whole space in view, which is what
  transfers to new albums;
* every review trains (`train.fill_groups`): an album with fewer training
  reviews than a neighbourhood group completes its group with its own
  reviews; without it the albums with a single training review (most of
  MARD's, half of a large heavy-tailed catalogue's) never train;
* margin 0.2: wider hinges keep pushing past the nearest wrong albums,
  which carries over to new albums; with every album in training it no
  longer costs the corpus shaped as MARD its new albums;
* word dropout 0.7: each training step reads 30% of a review's words, so
  the model cannot tie an album to one review's exact wording (without
  it, recall on training reviews reaches 0.9 while dev recall stalls);
* a higher peak learning rate with warmup and cosine decay, 60 epochs;
* early stopping on held-out training reviews; the reported model is the
  best evaluation;
* the model starts where the data already points (`model.init`,
  mardjax/train/prototype_init.py): each word at the mean sound of its
  training albums, in the sound's principal directions; with few reviews
  per album (as most of MARD's albums have) a random start has too few
  steps to learn that;
* reviews read through the words whose use follows the albums' sound
  (`eval.evidence_ks`, mardjax/evaluation/word_evidence.py): the cut, or
  none, chosen per run on the same held-out training reviews; it helps
  albums never seen in training where reviews carry much talk about
  nothing audible, and is left off where it does not help.
"""

from configs import default


def get_config():
  """Returns the best-recipe config."""
  config = default.get_config()
  config.model.linear = True
  config.loss.negatives = 'hardest:10+sampled:10'
  config.loss.margin = 0.2
  config.train.fill_groups = True
  config.model.word_dropout = 0.7
  config.train.learning_rate = 3e-3
  config.train.warmup_steps = 200
  config.train.lr_schedule = 'cosine'
  config.train.num_epochs = 60
  config.train.eval_every = 500
  config.train.early_stop_patience = 4
  config.eval.evidence_ks = '0.5,1,2,4'
  config.model.init = 'prototypes'
  return config
