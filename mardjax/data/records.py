"""TFRecord schema: what preprocessing writes and the input pipeline reads.

Two kinds of `tf.train.Example`, in sharded files:

* reviews (`reviews-<split>-<i>-of-<n>.tfrecord`, splits train/dev/test):
    review_id    bytes   `<amazon-id>/<reviewerID>`
    album_index  int64   row of the album in `albums.jsonl`
    tokens       int64[] word ids, truncated to max_len, no padding
    length       int64   len(tokens)
    full_length  int64   number of words before truncation
    rating       float   Amazon star rating (0 when absent)
    text_features float[] only with a pretrained text encoder configured:
                 its features of the review (`Manifest.text_features`)
* albums (`albums-<split>-<i>-of-<n>.tfrecord`, splits train/test; train
  albums also hold the dev reviews' albums):
    album_index  int64
    amazon_id    bytes
    num_tracks   int64
    track_mbids  bytes[] num_tracks
    descriptors  float[] num_tracks * dim, raw values, track-major; the
                 manifest holds the transform and training statistics.

Bump `manifest.SCHEMA_VERSION` on any change; readers refuse other versions.
"""

from typing import Any, Iterator

import numpy as np
import tensorflow as tf

from mardjax.data import manifest as manifest_lib

SCHEMA_VERSION = manifest_lib.SCHEMA_VERSION


def _int64(values) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def _float(values) -> tf.train.Feature:
  return tf.train.Feature(float_list=tf.train.FloatList(value=values))


def _bytes(values) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def review_example(review_id: str, album_index: int, tokens: np.ndarray,
                   full_length: int, rating: float,
                   text_features: np.ndarray | None = None) -> bytes:
  """Serializes one review; tokens: (length,) int ids; text_features (F,)."""
  feature = {
      'review_id': _bytes([review_id.encode('utf-8')]),
      'album_index': _int64([album_index]),
      'tokens': _int64(tokens.tolist()),
      'length': _int64([len(tokens)]),
      'full_length': _int64([full_length]),
      'rating': _float([rating]),
  }
  if text_features is not None:
    feature['text_features'] = _float(text_features.tolist())
  return tf.train.Example(features=tf.train.Features(
      feature=feature)).SerializeToString()


def album_example(album_index: int, amazon_id: str, mbids: list[str],
                  descriptors: np.ndarray) -> bytes:
  """Serializes one album; descriptors: (num_tracks, dim) float32."""
  return tf.train.Example(features=tf.train.Features(feature={
      'album_index': _int64([album_index]),
      'amazon_id': _bytes([amazon_id.encode('utf-8')]),
      'num_tracks': _int64([len(mbids)]),
      'track_mbids': _bytes([m.encode('utf-8') for m in mbids]),
      'descriptors': _float(descriptors.ravel().tolist()),
  })).SerializeToString()


REVIEW_FEATURES = {
    'review_id': tf.io.FixedLenFeature([], tf.string),
    'album_index': tf.io.FixedLenFeature([], tf.int64),
    'tokens': tf.io.VarLenFeature(tf.int64),
    'length': tf.io.FixedLenFeature([], tf.int64),
    'full_length': tf.io.FixedLenFeature([], tf.int64),
    'rating': tf.io.FixedLenFeature([], tf.float32),
    'text_features': tf.io.VarLenFeature(tf.float32),
}
ALBUM_FEATURES = {
    'album_index': tf.io.FixedLenFeature([], tf.int64),
    'amazon_id': tf.io.FixedLenFeature([], tf.string),
    'num_tracks': tf.io.FixedLenFeature([], tf.int64),
    'track_mbids': tf.io.VarLenFeature(tf.string),
    'descriptors': tf.io.VarLenFeature(tf.float32),
}


def parse_review(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
  """tf.data map function: one serialized review -> dense tensors."""
  ex = tf.io.parse_single_example(serialized, REVIEW_FEATURES)
  ex['tokens'] = tf.sparse.to_dense(ex['tokens'])
  ex['text_features'] = tf.sparse.to_dense(ex['text_features'])
  return ex


def parse_reviews_batch(serialized: tf.Tensor, max_len: int,
                        feature_dim: int = 0) -> dict[str, tf.Tensor]:
  """tf.data map function over a batch of serialized reviews (vectorized).

  Returns:
    {'tokens': (n, max_len) int32 zero-padded, 'lengths': (n,) int32 (at
    most max_len), 'album': (n,) int32, 'review_id': (n,) string}, and 'text_features' (n,
    feature_dim) float32 when feature_dim > 0. Parsing a batch at once is
    one vectorised op per feature instead of one per record.
  """
  spec = {k: v for k, v in REVIEW_FEATURES.items() if k != 'text_features'}
  if feature_dim:
    spec['text_features'] = tf.io.FixedLenFeature([feature_dim], tf.float32)
  ex = tf.io.parse_example(serialized, spec)
  tokens = tf.cast(tf.sparse.to_dense(ex['tokens'])[:, :max_len], tf.int32)
  tokens = tf.pad(tokens, [[0, 0], [0, max_len - tf.shape(tokens)[1]]])
  out = {'tokens': tokens,
         'lengths': tf.cast(tf.minimum(ex['length'], max_len), tf.int32),
         'album': tf.cast(ex['album_index'], tf.int32),
         'review_id': ex['review_id']}
  if feature_dim:
    out['text_features'] = ex['text_features']
  return out


def parse_album(serialized: tf.Tensor, dim: int) -> dict[str, tf.Tensor]:
  """tf.data map function: descriptors come back as (num_tracks, dim)."""
  ex = tf.io.parse_single_example(serialized, ALBUM_FEATURES)
  ex['track_mbids'] = tf.sparse.to_dense(ex['track_mbids'])
  ex['descriptors'] = tf.reshape(tf.sparse.to_dense(ex['descriptors']),
                                 [-1, dim])
  return ex


def read_numpy(paths: list[str], kind: str, dim: int = 0
               ) -> Iterator[dict[str, Any]]:
  """Reads records eagerly as numpy dicts (tests, small tools; not training)."""
  ds = tf.data.TFRecordDataset(paths)
  parse = parse_review if kind == 'review' else (
      lambda s: parse_album(s, dim))
  for ex in ds.map(no_autograph(parse)).as_numpy_iterator():
    yield ex


def no_autograph(fn):
  """`fn` for tf.data's map, traced as written. The parsers have no Python
  control flow on tensors, and autograph's conversion writes a module per
  function into the temp directory, which a killed run leaves behind."""
  return tf.autograph.experimental.do_not_convert(fn)
