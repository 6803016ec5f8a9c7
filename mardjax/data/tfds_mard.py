"""A TensorFlow Datasets builder for MARD (+ AcousticBrainz), built offline.

MARD is not downloadable by a script: you fetch it by hand and point TFDS at
the directory (`manual_dir`). The builder reads it through `mardjax.data.ingest`,
the same parser and the same splits as `launch.py --mode=preprocess`, so the
two never disagree.

Two configs:
  * `mard/reviews`: one example per usable review, splits train/dev/test
    (dev: 10% of album-review matches by review-id hash; test: reviews of
    albums held out entirely).
  * `mard/albums`: one example per album with usable audio, splits
    train/test; `descriptors` holds (num_tracks, dim) raw AcousticBrainz
    values in the documented order (`mardjax/descriptors.py`).
Join them on `album_index`.

    import tensorflow_datasets as tfds
    from mardjax.data import tfds_mard  # Registers 'mard'.
    ds = tfds.load('mard/reviews', split='train', data_dir=DATA_DIR,
                   download_and_prepare_kwargs={'download_config':
                       tfds.download.DownloadConfig(manual_dir=MARD_DIR)})
"""

import collections
import dataclasses

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from mardjax.data import descriptors as desc_lib
from mardjax.data import ingest
from mardjax.data import splits as splits_lib

_HOMEPAGE = 'https://www.upf.edu/web/mtg/mard'
_CITATION = """@inproceedings{oramas2016mard,
  title={Exploring Customer Reviews for Music Genre Classification and
         Evolutionary Studies},
  author={Oramas, Sergio and Espinosa-Anke, Luis and Lawlor, Aonghus and
          Serra, Xavier and Saggion, Horacio},
  booktitle={ISMIR}, year={2016}}"""


@dataclasses.dataclass(eq=False)
class MardConfig(tfds.core.BuilderConfig):
  """Which table, and the data settings (defaults:
  `ingest.default_data_config`, the same as configs/default.py's)."""
  table: str = 'reviews'
  data_overrides: dict = dataclasses.field(default_factory=dict)

  def data_config(self) -> ml_collections.ConfigDict:
    """The data fields ingestion reads, with `data_overrides` applied."""
    data = ingest.default_data_config()
    data.update(self.data_overrides)
    return data


class Mard(tfds.core.GeneratorBasedBuilder):
  """MARD album reviews with AcousticBrainz low-level descriptors."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Reviews and albums tables, mardjax splits.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download MARD (https://www.upf.edu/web/mtg/mard) and unpack it so that
  `manual_dir` holds mard_metadata.json, mard_reviews.json and
  acousticbrainz_descriptors/. Put the expanded AcousticBrainz documents (one
  per track: <amazonid>_<mbid>.json, AcousticBrainz dump files <mbid>-<n>.json,
  or bulk API responses) in manual_dir/acousticbrainz_expanded/.
  No MARD at hand? `python launch.py --config configs/default.py
  --workdir W --mode=synth` writes a synthetic corpus in the same layout.
  """
  BUILDER_CONFIGS = [
      MardConfig(name='reviews', table='reviews',
                 description='One example per review (train/dev/test).'),
      MardConfig(name='albums', table='albums',
                 description='One example per album with audio (train/test).'),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    if self.builder_config.table == 'reviews':
      features = tfds.features.FeaturesDict({
          'review_id': tfds.features.Text(),
          'amazon_id': tfds.features.Text(),
          'album_index': tfds.features.Scalar(dtype=np.int64),
          'text': tfds.features.Text(),
          'summary': tfds.features.Text(),
          'rating': tfds.features.Scalar(dtype=np.float32),
      })
    else:
      dim = desc_lib.dim(desc_lib.parse_descriptor_list(
          self.builder_config.data_config().descriptors))
      features = tfds.features.FeaturesDict({
          'album_index': tfds.features.Scalar(dtype=np.int64),
          'amazon_id': tfds.features.Text(),
          'artist': tfds.features.Text(),
          'title': tfds.features.Text(),
          'genre': tfds.features.Text(),
          'track_mbids': tfds.features.Sequence(tfds.features.Text()),
          'descriptors': tfds.features.Tensor(
              shape=(None, dim), dtype=np.float32),
      })
    return self.dataset_info_from_configs(features=features,
                                          homepage=_HOMEPAGE,
                                          citation=_CITATION)

  def _split_generators(self, dl_manager):
    data = self.builder_config.data_config()
    corpus = ingest.load(data, str(dl_manager.manual_dir), show_progress=False)
    names = (splits_lib.REVIEW_SPLITS if self.builder_config.table ==
             'reviews' else (splits_lib.TRAIN, splits_lib.TEST))
    return {s: self._generate_examples(corpus, s) for s in names}

  def _generate_examples(self, corpus: ingest.Corpus, split: str):
    if self.builder_config.table == 'reviews':
      return self._reviews(corpus, split)
    return self._albums(corpus, split)

  def _reviews(self, corpus: ingest.Corpus, split: str):
    for review, _, idx, review_split in corpus.usable_reviews(
        collections.Counter()):
      if review_split == split:
        yield review.review_id, {
            'review_id': review.review_id, 'amazon_id': review.amazon_id,
            'album_index': idx, 'text': review.text,
            'summary': review.summary, 'rating': review.rating}

  def _albums(self, corpus: ingest.Corpus, split: str):
    for idx, kept in enumerate(corpus.albums):
      if kept.split == split:
        yield kept.album.amazon_id, {
            'album_index': idx, 'amazon_id': kept.album.amazon_id,
            'artist': kept.album.artist, 'title': kept.album.title,
            'genre': kept.album.genre, 'track_mbids': kept.mbids,
            'descriptors': kept.descriptors}
