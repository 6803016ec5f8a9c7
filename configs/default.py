"""Default configuration: the paper's best setting on the synthetic MARD corpus.

Every other config calls `get_config()` from here and changes only what differs.
Override any field from the command line, e.g. `--config.data.vocab_size=30000`.
"""

import ml_collections


def get_config():
  """Returns the default config."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds everything random that is not data layout.

  # --- Raw data -----------------------------------------------------------
  config.data = ml_collections.ConfigDict()
  # Raw MARD directory (mard_metadata.json, mard_reviews.json,
  # acousticbrainz_descriptors/). Empty: a synthetic corpus is generated in
  # WORKDIR/synthetic_mard and used.
  config.data.mard_dir = ''
  # Extra directories with AcousticBrainz documents for every track
  # (the paper's expanded set): comma-separated, absolute or relative to
  # mard_dir. `acousticbrainz_expanded` inside mard_dir is always searched.
  config.data.extra_descriptor_dirs = ''
  # Where TFRecords + manifest go. Empty: WORKDIR/data.
  config.data.tfrecord_dir = ''
  # Descriptor list: a named set ('paper' = the paper's 369 values) or a
  # comma-separated list of `path[:shape]` entries (see mardjax/descriptors.py).
  config.data.descriptors = 'paper'
  # Stable transform applied before standardisation: 'signed_log' or 'none'.
  config.data.transform = 'signed_log'
  # Word vocabulary: the N most frequent training words (+ <pad>, <unk>).
  config.data.vocab_size = 60000
  config.data.min_word_count = 1  # Words seen fewer times map to <unk>.
  config.data.max_len = 400  # Reviews are truncated to this many tokens.
  # Review-level dev split: this fraction of album-review matches, by a
  # deterministic hash of the review id (the paper withholds 10%).
  config.data.dev_fraction = 0.1
  # Album-level test split: albums never seen in training.
  config.data.test_album_fraction = 0.1
  config.data.split_salt = 'mardjax-split-v1'  # Change to draw new splits.
  config.data.examples_per_shard = 20000  # Review records per TFRecord file.
  config.data.albums_per_shard = 5000  # Album records per TFRecord file.
  config.data.num_workers = 2  # Processes parsing descriptor documents.

  # --- Synthetic corpus (mode=synth, and the default data) -----------------
  config.data.synth_preset = 'small'  # 'tiny' (tests), 'small', 'full' (MARD size).
  config.data.synth_seed = 0
  # Overrides of the preset's sizes; 0 keeps the preset's value.
  config.data.synth_num_albums = 0
  config.data.synth_num_reviews = 0
  config.data.synth_num_tracks = 0

  return config
