"""A trained workdir's two branches, ready to embed new text and new audio.

Shared by the listening room (`serve`) and the batch embedder (`embed`):
restores the serving checkpoint with its data manifest, vocabulary and
descriptor statistics, and embeds a text or AcousticBrainz low-level
documents into the trained space, with the checks a user needs to trust the
result (extractor version, descriptors far from the training data).
"""

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from mardjax.data import descriptors as desc_lib
from mardjax.data import input_pipeline
from mardjax.models import two_branch
from mardjax.data import preprocess
from mardjax.data import text as text_lib
from mardjax.data import text_features
from mardjax.train import trainer
from mardjax.errors import UserError

# Standardised descriptor values beyond this are flagged: training data
# puts almost all values within a few standard deviations.
OUTLIER_Z = 8.0


class Embedder:
  """The restored model with what it needs to embed new inputs.

  Attributes:
    config, manifest, model: as trained.
    audio: the training data's `AudioTable` (for exporting the catalogue).
    step, state, source: the restored checkpoint and its directory name.
    names: (F,) descriptor feature names, in the model's input order.
    extractors: the extractor versions of the training documents.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               data_dir: str):
    self.config = config
    self.manifest = preprocess.load_manifest(data_dir)
    if config.model.audio_encoder != 'track':
      raise UserError("new recordings are single tracks: use a model with "
                      "audio_encoder='track'.")
    self.model = two_branch.build(config.model, self.manifest['vocab']['size'])
    self.audio = input_pipeline.load_audio_table(data_dir, self.manifest)
    sample = input_pipeline.load_reviews(data_dir, self.manifest, 'dev',
                                         config.data.max_len)
    if not len(sample['album']):
      sample = input_pipeline.load_reviews(data_dir, self.manifest, 'train',
                                           config.data.max_len)
    self.source = trainer.inference_source(workdir)
    self.step, self.state = trainer.restore_trained(
        config, workdir, data_dir, self.model, self.manifest, self.audio,
        sample, self.source)
    self.variables = trainer.inference_variables(self.state)
    with open(os.path.join(data_dir, self.manifest['vocab']['file'])) as f:
      self.vocab = text_lib.Vocabulary([w.rstrip('\n') for w in f])
    d = self.manifest['descriptors']
    self.specs = desc_lib.parse_descriptor_list(d['list'])
    self.mean, self.std = np.asarray(d['mean']), np.asarray(d['std'])
    self.names = desc_lib.feature_names(self.specs)
    self.extractors = self.manifest['report'].get('extractor_versions', {})
    self._embed_text = jax.jit(lambda t, l: self.model.apply(
        self.variables, tokens=t, lengths=l)['text'])
    self.text_encoder = None
    if config.model.text_encoder == 'pretrained':
      self.text_encoder = self._frozen_encoder(config)
      self._embed_features = jax.jit(lambda f: self.model.apply(
          self.variables, text_features=f)['text'])
    self._embed_audio = jax.jit(lambda a: self.model.apply(
        self.variables, audio=a)['audio'])

  def _frozen_encoder(self, config: ml_collections.ConfigDict):
    """The pretrained text encoder the records were built with, checked."""
    info = self.manifest['text_features']  # restore_trained checked it.
    path = config.data.text_encoder_path or info['path']
    encoder = text_features.FrozenEncoder(path, info['max_tokens'])
    if encoder.info['sha256'] != info['sha256']:
      raise UserError(
          f'The text encoder in {path!r} is not the one the records were '
          f'built with (sha256 {encoder.info["sha256"][:12]}…, records '
          f'{info["sha256"][:12]}…): point config.data.text_encoder_path to '
          'that model, or preprocess and train again.')
    return encoder

  def embed_text(self, text: str) -> tuple[np.ndarray, int, int]:
    """(embedding (1, E), words the model knows, words) of a text.

    A pretrained encoder reads every word (its tokenizer splits unknown
    ones into pieces); the word-table encoders know their vocabulary's.

    Raises:
      ValueError: no word of the text is in the vocabulary.
    """
    max_len = self.config.data.max_len
    words = text_lib.tokenize(text)
    if self.text_encoder is not None:
      features = self.text_encoder.encode([text])
      return (np.asarray(self._embed_features(features)), len(words),
              len(words))
    ids, _ = self.vocab.encode(words, max_len)
    known = int(np.sum(ids != text_lib.UNK_ID))
    if not known:
      raise ValueError('none of the words of this text is in the '
                       'vocabulary')
    tokens = np.zeros((1, max_len), np.int32)
    tokens[0, :len(ids)] = ids
    emb = self._embed_text(tokens, np.array([len(ids)], np.int32))
    return np.asarray(emb), known, len(words)

  def read_document(self, doc: Any) -> tuple[np.ndarray, np.ndarray,
                                             str | None, list[str]]:
    """A low-level document -> (raw (F,), standardised (F,), extractor
    version, warnings).

    Raises:
      descriptors.DescriptorError: not a low-level document the model reads.
    """
    raw = desc_lib.extract(doc, self.specs)
    z = desc_lib.normalize(raw[None], self.manifest['descriptors'][
        'transform'], self.mean, self.std)[0]
    warnings = []
    version = desc_lib.extractor_version(doc)
    if self.extractors and version not in self.extractors:
      warnings.append(
          f'this document comes from extractor {version or "(unknown)"}, the '
          f'model was trained on {sorted(self.extractors)}: descriptor values '
          'may not be comparable')
    far = np.flatnonzero(np.abs(z) > OUTLIER_Z)
    if len(far):
      warnings.append(
          f'{len(far)} descriptor values lie more than {OUTLIER_Z:g} standard '
          'deviations from the training data, e.g. ' + ', '.join(
              f'{self.names[i]} ({z[i]:+.1f})' for i in far[:3]))
    return raw, z.astype(np.float32), version, warnings

  def embed_audio(self, z: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(N, F) standardised descriptors -> (N, E) unit embeddings."""
    out = []
    for i in range(0, len(z), batch_size):
      chunk = z[i:i + batch_size]
      # Pad to the batch size so one compiled shape serves every chunk.
      pad = batch_size - len(chunk) if len(z) > batch_size else 0
      padded = np.concatenate([chunk, np.zeros((pad, z.shape[1]),
                                               z.dtype)]) if pad else chunk
      out.append(np.asarray(self._embed_audio(padded))[:len(chunk)])
    return (np.concatenate(out) if out else
            np.zeros((0, self.model.embed_dim), np.float32))
