"""Embedding with trained variables: albums, tracks, reviews, texts.

Shared by evaluation (the training loop's periodic dev check and
--mode=eval), the export and the listening room. Each jitted function takes
the variables as an argument and the model as a static one, so it compiles
once per model and input shape, and repeated calls with new variables (an
evaluation every `eval_every` steps) reuse the program. A jitted lambda that
closed over the variables would bake them in as constants and compile again
at every call.
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mardjax.data import tables
from mardjax.models import layouts
from mardjax.models import two_branch

# Review embedding's flat size is rounded up to a multiple of this.
FLAT_BUCKET = 1024


@functools.partial(jax.jit, static_argnums=0)
def audio(model: two_branch.TwoBranch, variables: dict[str, Any],
          descriptors: jax.Array) -> jax.Array:
  """(B, A) standardised descriptors -> (B, E) unit track embeddings."""
  return model.apply(variables, audio=descriptors)['audio']


@functools.partial(jax.jit, static_argnums=0)
def album_sequences(model: two_branch.TwoBranch, variables: dict[str, Any],
                    tracks: jax.Array, num_tracks: jax.Array) -> jax.Array:
  """(B, T, A) albums' tracks + (B,) counts -> (B, E) (the album LSTM)."""
  return model.apply(variables, audio=tracks, num_tracks=num_tracks)['audio']


@functools.partial(jax.jit, static_argnums=0)
def text(model: two_branch.TwoBranch, variables: dict[str, Any],
         tokens: jax.Array, lengths: jax.Array) -> jax.Array:
  """(B, L) token ids + (B,) lengths -> (B, E) unit text embeddings."""
  return model.apply(variables, tokens=tokens, lengths=lengths)['text']


@functools.partial(jax.jit, static_argnums=0)
def text_layout(model: two_branch.TwoBranch, variables: dict[str, Any],
                tokens: jax.Array, lengths: jax.Array,
                layout: dict[str, jax.Array]) -> jax.Array:
  """`text` of the mean encoder, reading only the real tokens: `layout` is
  the flat layout's (T,) review of each position, {'flat_review': ...}
  (`layouts.flat_review`), or the split bag-of-words' (R,) positions of
  the tokens outside its product, {'rare_tokens': ...}
  (`layouts.rare_tokens`)."""
  return model.apply(variables, tokens=tokens, lengths=lengths,
                     **layout)['text']


@functools.partial(jax.jit, static_argnums=0)
def text_features(model: two_branch.TwoBranch, variables: dict[str, Any],
                  features: jax.Array) -> jax.Array:
  """(B, F) pretrained-encoder features -> (B, E) unit text embeddings."""
  return model.apply(variables, text_features=features)['text']


def _padded_batches(arrays: tuple[np.ndarray, ...], batch_size: int):
  """(row batches of `arrays`, rows of each that are real): the last batch
  repeats its last row up to `batch_size`, so that one compiled shape
  serves every batch."""
  for start in range(0, arrays[0].shape[0], batch_size):
    part = [a[start:start + batch_size] for a in arrays]
    real = part[0].shape[0]
    if real < batch_size:
      part = [np.concatenate([p, np.repeat(p[-1:], batch_size - real, 0)])
              for p in part]
    yield part, real


def batched(fn: Callable[..., jax.Array], arrays: tuple[np.ndarray, ...],
            batch_size: int, out_dim: int = 0) -> np.ndarray:
  """fn over row batches of `arrays` (`_padded_batches`).

  Returns:
    (N, ...) the rows of fn's outputs; (0, out_dim) when N is 0.
  """
  out = [fn(*part)[:real] for part, real in _padded_batches(arrays,
                                                             batch_size)]
  if not out:
    return np.zeros((0, out_dim), np.float32)
  return np.concatenate([np.asarray(x) for x in out])


@functools.partial(jax.jit, static_argnums=(0, 4))
def _album_directions(model: two_branch.TwoBranch, variables: dict[str, Any],
                      descriptors: jax.Array, album_of_track: jax.Array,
                      num_albums: int) -> jax.Array:
  """(N, A) descriptors, N a multiple of the chunk they are embedded in
  ((N / chunk, chunk, A)), and (N,) their albums (sorted; num_albums for
  padding rows) -> (num_albums, E) unit vectors along each album's mean
  track embedding (the sum's direction is the mean's; an album without
  tracks gets zeros). One program: an evaluation is one dispatch here."""
  per_track = jax.lax.map(
      lambda d: model.apply(variables, audio=d)['audio'], descriptors)
  sums = jax.ops.segment_sum(per_track.reshape(-1, per_track.shape[-1]),
                             album_of_track.reshape(-1),
                             num_segments=num_albums, indices_are_sorted=True)
  return two_branch.l2_normalize(sums)


# The last table's tracks on the device (`_tracks_on_device`).
_ON_DEVICE: dict[str, Any] = {}


def _tracks_on_device(audio_table: tables.AudioTable, chunk: int
                      ) -> tuple[jax.Array, jax.Array]:
  """The table's descriptors in (N / chunk, chunk, A) chunks (zeros
  padding the last) and each row's album (num_albums for padding), put on
  the device once per table and kept for the next call: the training
  loop's evaluation every `eval_every` steps embeds the same 343,882
  tracks, and on an accelerator copying them from the host in batches each
  time is a large share of an evaluation (the train_loop benchmark's
  evaluations; see docs/performance.md)."""
  key = (audio_table.descriptors, audio_table.counts, chunk)
  cached = _ON_DEVICE.get('key')
  if cached is None or not (cached[0] is key[0] and cached[1] is key[1]
                            and cached[2] == chunk):
    n, a = audio_table.descriptors.shape
    pad = (-n) % chunk
    descriptors = np.concatenate([audio_table.descriptors,
                                  np.zeros((pad, a), np.float32)])
    album = np.repeat(np.arange(len(audio_table.counts), dtype=np.int32),
                      audio_table.counts)
    album = np.concatenate([album, np.full(pad, len(audio_table.counts),
                                           np.int32)])
    _ON_DEVICE.clear()  # Dropped before the next is made.
    _ON_DEVICE.update(key=key, arrays=(
        jnp.asarray(descriptors.reshape(-1, chunk, a)),
        jnp.asarray(album.reshape(-1, chunk))))
  return _ON_DEVICE['arrays']


def albums(variables: dict[str, Any], model: two_branch.TwoBranch,
           audio_table: tables.AudioTable, batch_size: int = 4096,
           max_tracks: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Embeds every album that has tracks.

  Track models: the normalised mean of the album's track embeddings,
  computed where the tracks were embedded (an evaluation then copies C x E
  album embeddings to the host, not every track's). The album LSTM: the
  model's embedding of the album's first `max_tracks` tracks (required
  then).

  Returns:
    (album indices (C,), embeddings (C, E)).
  """
  album_ids = np.flatnonzero(audio_table.counts > 0)
  if model.audio_encoder == 'album_lstm':
    if max_tracks < 1:
      raise ValueError('embed.albums: the album LSTM needs max_tracks.')
    return album_ids, batched(
        lambda a: album_sequences(model, variables,
                                  *audio_table.sequences(a, max_tracks)),
        (album_ids,), 256, model.embed_dim)
  if not audio_table.descriptors.shape[0]:
    return album_ids, np.zeros((0, model.embed_dim), np.float32)
  directions = _album_directions(
      model, variables, *_tracks_on_device(audio_table, batch_size),
      len(audio_table.counts))
  return album_ids, np.asarray(directions)[album_ids]


def review_layout() -> str:
  """How `reviews` reads the mean encoder's tokens on this backend.

  'split' on CPUs: the bag-of-words product over the
  `layouts.BAG_SLOTS` most frequent words plus the other tokens one by
  one, several times faster there than the flat layout (XLA's CPU gathers
  and segment sums go row by row, a matrix product does not; the
  train_loop benchmark's evaluations; see docs/performance.md).
  'flat' elsewhere: every real token gathered and summed per review, which
  accelerators do at memory speed.
  """
  return 'split' if jax.default_backend() == 'cpu' else 'flat'


def _largest(count: Callable[..., int], arrays: tuple[np.ndarray, ...],
             batch_size: int) -> int:
  """The most `count(*batch)` of the batches `batched` makes (its padded
  last batch included), 0 for none."""
  return max([count(*part) for part, _ in _padded_batches(arrays,
                                                          batch_size)] or [0])


def reviews(variables: dict[str, Any], model: two_branch.TwoBranch,
            rows: dict[str, np.ndarray], batch_size: int = 256,
            layout: str = '') -> np.ndarray:
  """(N, E) embeddings of `input_pipeline.load_reviews` output; `layout`
  of the mean encoder 'flat' or 'split' ('': `review_layout()`)."""
  if model.text_encoder == 'pretrained':
    return batched(functools.partial(text_features, model, variables),
                   (rows['text_features'],), batch_size, model.embed_dim)
  if model.text_encoder != 'mean':
    return batched(functools.partial(text, model, variables),
                   (rows['tokens'], rows['lengths']), batch_size,
                   model.embed_dim)
  # The mean encoder reads only real tokens, in one size for every batch
  # (one program): the largest of the batches `batched` makes.
  arrays = (rows['tokens'], np.minimum(rows['lengths'],
                                       rows['tokens'].shape[1]))
  layout = layout or review_layout()
  if layout == 'split':
    def rare(tokens, lengths):
      return layouts.rare_mask(tokens, lengths, np).reshape(-1)
    size = layouts.flat_size(
        _largest(lambda *a: int(rare(*a).sum()), arrays, batch_size),
        FLAT_BUCKET)

    def place(tokens, lengths):
      return {'rare_tokens': layouts.rare_tokens(rare(tokens, lengths),
                                                    size, np)}
  elif layout == 'flat':
    size = layouts.flat_size(
        _largest(lambda _, lengths: int(lengths.sum()), arrays, batch_size),
        FLAT_BUCKET)

    def place(tokens, lengths):
      del tokens
      return {'flat_review': layouts.flat_review(lengths[None], size)[0]}
  else:
    raise ValueError(f"embed.reviews: layout {layout!r}: 'flat' or 'split'.")
  return batched(
      lambda tokens, lengths: text_layout(model, variables, tokens,
                                          lengths, place(tokens, lengths)),
      arrays, batch_size, model.embed_dim)
