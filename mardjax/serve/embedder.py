"""A trained workdir's two branches, ready to embed new text and new audio.

Shared by the listening room (`serve`) and the batch embedder (`embed`):
restores the serving checkpoint with its data manifest, vocabulary and
descriptor statistics, and embeds a text or AcousticBrainz low-level
documents into the trained space, with the checks a user needs to trust the
result (extractor version, descriptors far from the training data).
"""

import functools
from typing import Any

from absl import logging
import ml_collections
import numpy as np

from mardjax.data import descriptors as desc_lib
from mardjax.data import manifest as manifest_lib
from mardjax.data import text as text_lib
from mardjax.data import text_features
from mardjax.errors import UserError
from mardjax.evaluation import word_evidence
from mardjax.models import embed
from mardjax.train import checkpoints

# Standardised descriptor values beyond this are flagged: training data
# puts almost all values within a few standard deviations.
OUTLIER_Z = 8.0


class Embedder:
  """The restored model with what it needs to embed new inputs.

  Attributes:
    config, manifest, model: as trained.
    trained: what `checkpoints.load_for_inference` restored.
    variables: the restored parameters (and BatchNorm statistics).
    step, source: the restored checkpoint's step and directory name.
    names: (F,) descriptor feature names, in the model's input order.
    extractors: the extractor versions of the training documents.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               data_dir: str):
    self.config = config
    if config.model.audio_encoder != 'track':
      raise UserError("new recordings are single tracks: use a model with "
                      "audio_encoder='track'.")
    self.manifest = manifest_lib.load(data_dir, records=False)
    self.trained = trained = checkpoints.load_for_inference(
        config, workdir, self.manifest)
    self.model, self.variables = trained.model, trained.variables
    self.step, self.source = trained.step, trained.source
    self.vocab = manifest_lib.read_vocabulary(self.manifest)
    d = self.manifest.descriptors
    self.specs = desc_lib.parse_descriptor_list(list(d.specs))
    self.names = desc_lib.feature_names(self.specs)
    self.extractors = self.manifest.extractor_versions
    self.gated = self._gated_reading(config, workdir)
    self.text_encoder = None
    if config.model.text_encoder == 'pretrained':
      self.text_encoder = self._frozen_encoder(config)

  def _gated_reading(self, config: ml_collections.ConfigDict, workdir: str
                     ) -> tuple[np.ndarray, np.ndarray] | None:
    """(word vectors (V, E), word weights (V,)) of the run's evidence-gated
    query rule, as evaluation and the export fitted it for this model; None
    when it is off, its cut is off, or it was not fitted (texts then read
    as the model reads them)."""
    if not word_evidence.parse_ks(config.eval.evidence_ks):
      return None
    rule = word_evidence.load(workdir)
    if rule is None or rule.step != self.step:
      logging.warning(
          'config.eval.evidence_ks is set but no query rule was fitted for '
          'the model of step %d: texts are read by the model alone; run '
          '--mode=eval or --mode=export to fit it.', self.step)
      return None
    if not rule.k:
      return None
    return word_evidence.word_vectors(self.variables), rule.weights()

  def _frozen_encoder(self, config: ml_collections.ConfigDict):
    """The pretrained text encoder the records were built with, checked."""
    info = self.manifest.text_features  # load_for_inference checked it.
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
      return (np.asarray(embed.text_features(self.model, self.variables,
                                             features)), len(words),
              len(words))
    ids, _ = self.vocab.encode(words, max_len)
    known = int(np.sum(ids != text_lib.UNK_ID))
    if not known:
      raise ValueError('none of the words of this text is in the '
                       'vocabulary')
    tokens = np.zeros((1, max_len), np.int32)
    tokens[0, :len(ids)] = ids
    lengths = np.array([len(ids)], np.int32)
    if self.gated is not None:  # The run's query rule.
      emb = word_evidence.queries(*self.gated,
                                  {'tokens': tokens, 'lengths': lengths})
    else:
      emb = embed.text(self.model, self.variables, tokens, lengths)
    return np.asarray(emb), known, len(words)

  def read_document(self, doc: Any) -> tuple[np.ndarray, np.ndarray,
                                             str | None, list[str]]:
    """A low-level document -> (raw (F,), standardised (F,), extractor
    version, warnings).

    Raises:
      descriptors.DescriptorError: not a low-level document the model reads.
    """
    raw = desc_lib.extract(doc, self.specs)
    d = self.manifest.descriptors
    z = desc_lib.normalize(raw[None], d.transform, d.mean, d.std)[0]
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
    # Batches padded to one size (for N above it) share one compiled shape.
    return embed.batched(
        functools.partial(embed.audio, self.model, self.variables),
        (z,), batch_size if len(z) > batch_size else max(len(z), 1),
        self.model.embed_dim)
