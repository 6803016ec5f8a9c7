"""Frozen pretrained text encoder: review text -> one feature vector.

The paper's "pretrained text features" row feeds BERT features to the text
branch instead of learned word embeddings. Preprocessing computes them once,
with a frozen Hugging Face encoder loaded from a local directory
(`config.data.text_encoder_path`: `config.json`, weights, tokenizer files,
as `save_pretrained` writes them), and stores them beside the tokens in the
review records; training and evaluation only read them.

Features: the mean of the last hidden layer over the review's word pieces
(attention mask respected; [CLS] and [SEP] included), truncated to
`config.data.text_encoder_max_tokens` pieces. Nothing is downloaded: the
directory must hold the model.

torch and transformers are imported only here, and only when an encoder is
configured.
"""

import hashlib
import os
from typing import Any

import numpy as np

from mardjax.errors import UserError


def _weights_sha256(path: str) -> str:
  """Hash of the directory's files (names and bytes): identifies the model."""
  h = hashlib.sha256()
  for name in sorted(os.listdir(path)):
    full = os.path.join(path, name)
    if os.path.isfile(full):
      h.update(name.encode() + b'\0')
      with open(full, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
          h.update(block)
  return h.hexdigest()


class FrozenEncoder:
  """A Hugging Face encoder in inference mode on the CPU."""

  def __init__(self, path: str, max_tokens: int, batch_size: int = 32,
               sha256: str | None = None):
    if not os.path.isfile(os.path.join(path, 'config.json')):
      raise UserError(
          f'config.data.text_encoder_path={path!r} is not a model directory '
          '(no config.json): point it to a local directory written by '
          "transformers' save_pretrained (e.g. a downloaded bert-base-uncased)"
          '.')
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    try:
      self._tokenizer = transformers.AutoTokenizer.from_pretrained(
          path, local_files_only=True)
      self._model = transformers.AutoModel.from_pretrained(
          path, local_files_only=True)
    except (OSError, ValueError) as e:
      raise UserError(f'Cannot load the text encoder in {path!r}: {e}'
                      ) from None
    self._model.eval()
    self._torch = torch
    self.max_tokens = max_tokens
    self.batch_size = batch_size
    self.dim = int(self._model.config.hidden_size)
    self.info = {'path': os.path.abspath(path),
                 'model_type': self._model.config.model_type,
                 'dim': self.dim, 'max_tokens': max_tokens,
                 'pooling': 'mean of the last hidden layer',
                 'sha256': sha256 or _weights_sha256(path)}

  def encode(self, texts: list[str]) -> np.ndarray:
    """(len(texts), dim) float32 features."""
    out = []
    for start in range(0, len(texts), self.batch_size):
      batch = self._tokenizer(texts[start:start + self.batch_size],
                              padding=True, truncation=True,
                              max_length=self.max_tokens,
                              return_tensors='pt')
      with self._torch.no_grad():
        hidden = self._model(**batch).last_hidden_state
      mask = batch['attention_mask'].unsqueeze(-1).to(hidden.dtype)
      pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
      out.append(pooled.numpy().astype(np.float32))
    if not out:
      return np.zeros((0, self.dim), np.float32)
    return np.concatenate(out)


def review_text(summary: str, text: str) -> str:
  """What the encoder reads of a review: its summary line, then its body."""
  return f'{summary}. {text}' if summary else text


def encoder_fingerprint(path: str) -> dict[str, Any]:
  """What a preprocessing fingerprint needs of the encoder (no model load)."""
  if not path:
    return {}
  if not os.path.isdir(path):
    raise UserError(f'config.data.text_encoder_path={path!r} does not exist.')
  return {'path': os.path.abspath(path), 'sha256': _weights_sha256(path)}
