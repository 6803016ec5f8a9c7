"""The two-branch embedding network (Flax linen, pure).

    variables = model.init(rng, audio=a, tokens=t, lengths=l)
    out = model.apply(variables, audio=a, tokens=t, lengths=l)
    out['audio'], out['text']   # (B, embed_dim), L2-normalised

Either branch may be skipped (pass only `audio`, or only `tokens`): the
evaluator and the server embed albums and reviews separately with the same
parameters.

* Audio branch: descriptors (B, A) -> Dense -> ReLU -> Dense -> [BatchNorm]
  -> L2. With `audio_encoder='album_lstm'` the input is an album's tracks
  (B, T, A) with `num_tracks` (B,), run through an LSTM whose final state
  feeds the head (the paper's "LSTM to generate audio features").
* Text branch: tokens (B, L) -> encoder -> Dense -> ReLU -> Dense -> [BN] ->
  L2. Encoders: `mean` (masked mean of learned word embeddings, padding
  excluded), `lstm` (bi-directional LSTM, final states of both directions
  concatenated, each sequence's length respected; in training the reviews
  are packed end to end so padding costs nothing, `mardjax.train.packing`), `pretrained` (features
  computed by a frozen encoder and stored beside the tokens: input
  `text_features` (B, F)).
* `linear=True`: one Dense per branch (the WSABIE-like ablation row).
  `linear_path=True`: a Dense from the head's input added to the
  Dense-ReLU-Dense output before BatchNorm (a residual linear map beside
  the non-linear one).

BatchNorm follows Wang et al. (after the last linear layer); its statistics
are averaged over `bn_axis_name` when training data-parallel.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mardjax import plan as plan_lib
from mardjax.data import manifest as manifest_lib
from mardjax.errors import need
from mardjax.errors import need_choice
from mardjax.errors import UserError
from mardjax.models import lstm
from mardjax.models import layouts

AUDIO_ENCODERS = ('track', 'album_lstm')
# Mean encoder's pooling: plain mean (the paper) or IDF-weighted (learned).
POOLINGS = ('mean', 'idf')


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), eps))


class Head(nn.Module):
  """Dense-ReLU-Dense (or one Dense), optional BatchNorm, L2 normalisation."""
  hidden_dim: int
  embed_dim: int
  linear: bool = False
  # A linear map of the input added to the non-linear one's output: what
  # is linear in the input (the part that carries over to albums never
  # seen in training) need not be fitted through the ReLU layer.
  linear_path: bool = False
  batch_norm: bool = False
  bn_axis_name: str | None = None
  dropout: float = 0.0  # On the hidden layer, in training.
  dtype: Any = jnp.float32  # Of the products and activations.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    inputs = x
    if not self.linear:
      x = nn.relu(nn.Dense(self.hidden_dim, dtype=self.dtype,
                           name='hidden')(x))
      if self.dropout:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    # BatchNorm subtracts the mean, so a bias before it would only collect
    # round-off (which Adam then amplifies into real updates).
    x = nn.Dense(self.embed_dim, use_bias=not self.batch_norm,
                 dtype=self.dtype, name='out')(x)
    if self.linear_path and not self.linear:
      x = x + nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                       name='skip')(inputs)
    if self.batch_norm:
      # Statistics in float32 whatever the dtype (flax promotes them).
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                       axis_name=self.bn_axis_name if train else None,
                       dtype=self.dtype, name='bn')(x)
    # The loss's distances are float32 whatever the compute dtype.
    return l2_normalize(x.astype(jnp.float32))


class LSTMDirection(nn.Module):
  """One direction's LSTM kernels, for a recurrence over rows of packed
  reviews, time-major (`mardjax.models.lstm`; `BiLSTMEncoder` runs it).

  The input projection of every position is one matrix product before the
  recurrence (only h @ W_h stays inside the loop), and the state is reset
  where a review begins in the direction of travel, so rows may hold
  several reviews end to end (`mardjax.train.packing`). Gates i, f, g, o;
  kernels initialised as flax's LSTM cells (lecun normal, orthogonal
  recurrent, zero bias).
  """
  hidden: int
  dtype: Any = jnp.float32  # Of the products and the recurrence.

  @nn.compact
  def __call__(self, features: int
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """-> wi (F, 4H), wh (H, 4H), bias (4H,) in `dtype`."""
    h_dim, dt = self.hidden, self.dtype
    wi = self.param('wi', nn.initializers.lecun_normal(),
                    (features, 4 * h_dim))
    wh = self.param('wh', nn.initializers.orthogonal(), (h_dim, 4 * h_dim))
    bias = self.param('bias', nn.initializers.zeros, (4 * h_dim,))
    return wi.astype(dt), wh.astype(dt), bias.astype(dt)


def padded_layout(lengths: jax.Array, max_len: int
                  ) -> dict[str, jax.Array]:
  """The packed layout's markers for a padded (B, L) batch.

  One review per row from position 0 to max(length, 1) - 1 (an empty review
  reads one <pad>); see `mardjax.train.packing`.
  """
  b = lengths.shape[0]
  end = jnp.maximum(lengths, 1) - 1
  pos = jnp.arange(max_len)[None, :]
  rows = jnp.arange(b)
  return {'starts': jnp.broadcast_to(pos == 0, (b, max_len)),
          'ends': pos == end[:, None],
          'first': jnp.stack([rows, jnp.zeros_like(rows)], 1),
          'last': jnp.stack([rows, end], 1)}


class MeanEncoder(nn.Module):
  """tokens (B, L) + lengths (B,) -> (B, word_dim): the masked mean of the
  words' learned embeddings (padding excluded).

  With `weighted`, the mean is weighted: each word has a learned score (an
  extra last column of the embedding table, so that row-sparse training
  updates it with the word's row) and a review's words are weighted by the
  softmax of their scores over the review. Scores initialised to the log of
  the words' inverse document frequency (`idf_scores`) make the pooling a
  TF-IDF-weighted mean: rare, telling words (an artist's name) then count
  for far more than 'the' (README: What limits the paper's recipe).

  With `table` (U, D) given, `tokens` are indices into it instead of word ids
  and the module's own embedding is not used (row-sparse training,
  `mardjax.train.sparse_embedding`). With `flat_review` (T,) (training,
  `flat_review`) only the real tokens are gathered
  and summed per review (a segment sum over T positions); otherwise a
  padded batch is a (B, L, D) gather, or with `table` a (B, U)
  bag-of-words product; with `rare_tokens` (R,) (training,
  `mardjax.train.sparse_embedding.compact_batch`, and evaluation on CPUs,
  `mardjax.models.embed.reviews`) the product covers the first
  `layouts.BAG_SLOTS`
  rows only (of `table`, or of the embedding table: the most frequent
  words) and the tokens of the other rows, listed in `rare_tokens`, are
  summed one by one. The features are the same.
  """
  vocab_size: int
  word_dim: int
  lstm_dim: int = 0  # Unused: every encoder takes the same fields.
  weighted: bool = False
  dtype: Any = jnp.float32  # Of the pooling product.

  @nn.compact
  def __call__(self, tokens: jax.Array, lengths: jax.Array | None,
               table: jax.Array | None = None,
               packed: dict[str, jax.Array] | None = None,
               keep: jax.Array | None = None,
               flat_review: jax.Array | None = None,
               rare_tokens: jax.Array | None = None) -> jax.Array:
    """`keep` (B, L) bool: the words read (word dropout); None: all."""
    if packed is not None:
      raise ValueError('Only the lstm text encoder reads packed reviews.')
    mask = (jnp.arange(tokens.shape[1])[None, :] < lengths[:, None])
    if keep is not None:
      mask = mask & keep
    lookup = table is None
    if lookup:
      table = nn.Embed(self.vocab_size, self.word_dim + self.weighted,
                       name='embed').embedding
    if self.weighted:
      weights = _softmax_weights(jnp.take(table[:, -1], tokens, axis=0),
                                 mask)
      vectors = table[:, :-1]
    else:
      weights = mask / jnp.maximum(mask.sum(1, keepdims=True), 1)
      vectors = table
    if flat_review is not None:
      # Gathered and summed in the table's float32, then cast: in bfloat16
      # the gradient's scatter into the table would add bfloat16 rows,
      # which a GPU does one compare-and-swap at a time.
      return _flat_sum(vectors, tokens, lengths, weights,
                       flat_review).astype(self.dtype)
    vectors = vectors.astype(self.dtype)
    if rare_tokens is not None:
      return _split_bag(vectors, tokens, weights, rare_tokens)
    if lookup:
      emb = jnp.take(vectors, tokens, axis=0)
      return jnp.einsum('bld,bl->bd', emb, weights.astype(emb.dtype))
    bag = jnp.zeros((tokens.shape[0], table.shape[0]), self.dtype)
    bag = bag.at[jnp.arange(tokens.shape[0])[:, None], tokens].add(
        weights.astype(self.dtype))
    return bag @ vectors


def _flat_sum(vectors: jax.Array, tokens: jax.Array, lengths: jax.Array,
              weights: jax.Array, flat_review: jax.Array) -> jax.Array:
  """(B, D): sum over each review's real tokens of weight * vector.

  Args:
    vectors: (V or U, D) rows the tokens index.
    tokens, weights: (B, L) padded tokens and their weights.
    lengths: (B,) true lengths, the ones `flat_review` was made from.
    flat_review: (T,) the review of each flat position, B past the end.
  """
  b, length = tokens.shape
  real = flat_review < b
  review = jnp.minimum(flat_review, b - 1)
  lengths = jnp.minimum(lengths, length)
  starts = jnp.cumsum(lengths) - lengths
  pos = jnp.clip(jnp.arange(flat_review.shape[0]) - starts[review], 0,
                 length - 1)
  # Positions past the last real token read no row and, in the backward
  # pass, add to none: their token index is out of range, the gather fills
  # zeros and its transposed scatter drops them (in range, each step would
  # add thousands of zeros into one row, one atomic add each on a GPU).
  word = jnp.where(real, tokens[review, pos], vectors.shape[0])
  w = jnp.where(real, weights[review, pos], 0.0)
  rows = jnp.take(vectors, word, axis=0, mode='fill', fill_value=0)
  # Their review, B, is past the last segment: dropped by the sum.
  return jax.ops.segment_sum(rows * w[:, None].astype(rows.dtype),
                             flat_review, num_segments=b,
                             indices_are_sorted=True)


def _split_bag(vectors: jax.Array, slots: jax.Array, weights: jax.Array,
               rare_tokens: jax.Array) -> jax.Array:
  """(B, D): the bag-of-words product, split
  (`layouts.BAG_SLOTS`).

  Args:
    vectors: (U, D) the batch's rows.
    slots, weights: (B, L) each token's row and weight.
    rare_tokens: (R,) the flat positions (b * L + l) of the real tokens
      whose row is `layouts.BAG_SLOTS` or beyond, B * L past the end.
  """
  b, length = slots.shape
  head = min(layouts.BAG_SLOTS, vectors.shape[0])
  # One flat index per token, its cell of the row-major (b, head) bag; the
  # tokens of the other rows get an index past the end and are dropped (no
  # (b * L, 2) index array to build, no extra column to slice off).
  cell = jnp.where(slots < head,
                   jnp.arange(b, dtype=slots.dtype)[:, None] * head + slots,
                   b * head)
  bag = jnp.zeros((b * head,), vectors.dtype).at[cell.ravel()].add(
      weights.astype(vectors.dtype).ravel(), mode='drop').reshape(b, head)
  out = bag @ vectors[:head]
  # Padding entries (past the end) read no row, and in the backward pass
  # add to none: their slot is out of range too.
  flat_slots = jnp.ravel(slots).at[rare_tokens].get(
      mode='fill', fill_value=vectors.shape[0])
  flat_weights = jnp.ravel(weights).at[rare_tokens].get(mode='fill',
                                                       fill_value=0)
  rows = jnp.take(vectors, flat_slots, axis=0, mode='fill', fill_value=0)
  # Positions past the end belong to review B: dropped by the sum.
  return out + jax.ops.segment_sum(
      rows * flat_weights[:, None].astype(rows.dtype), rare_tokens // length,
      num_segments=b, indices_are_sorted=True)


def _softmax_weights(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """(B, L) scores and mask -> (B, L) weights: the softmax of each row's
  scores over its real tokens, zero on padding (and on empty rows)."""
  scores = jnp.where(mask, scores, -jnp.inf)
  top = jnp.max(scores, axis=1, keepdims=True)
  e = jnp.where(mask, jnp.exp(scores - jnp.where(mask.any(1, keepdims=True),
                                                 top, 0.0)), 0.0)
  return e / jnp.maximum(e.sum(1, keepdims=True), 1e-30)


def idf_scores(document_frequency: np.ndarray, num_documents: int
               ) -> np.ndarray:
  """(V,) word scores of the weighted mean: the log of each word's inverse
  document frequency, smoothed as scikit-learn's TF-IDF, so that the
  softmax weights are proportional to log((1 + N) / (1 + df)) + 1."""
  idf = np.log((1.0 + num_documents) / (1.0 + document_frequency)) + 1.0
  return np.log(idf).astype(np.float32)


class BiLSTMEncoder(nn.Module):
  """tokens (B, L) + lengths (B,) -> (B, 2 * lstm_dim): the final states of a
  forward and a backward LSTM, each sequence's length respected.

  `table` as for `MeanEncoder`. With `packed`, `tokens` are (R, P) rows of
  reviews packed end to end and `packed` holds their markers
  (`mardjax.train.packing`); lengths are unused.
  """
  vocab_size: int
  word_dim: int
  lstm_dim: int
  dtype: Any = jnp.float32  # Of the products and the recurrence.
  # 'per_direction' or 'bidirectional' (`mardjax.plan`): the same function.
  loop: str = 'per_direction'

  @nn.compact
  def __call__(self, tokens: jax.Array, lengths: jax.Array | None,
               table: jax.Array | None = None,
               packed: dict[str, jax.Array] | None = None) -> jax.Array:
    tokens = tokens.T  # The LSTM runs time-major: (P, R).
    if table is None:
      emb = nn.Embed(self.vocab_size, self.word_dim, name='embed')(tokens)
    else:
      emb = jnp.take(table, tokens, axis=0)
    if packed is None:
      packed = padded_layout(lengths, tokens.shape[0])
    dt = self.dtype
    x = emb.astype(dt)  # (P, R, F)
    fwd = LSTMDirection(self.lstm_dim, dt, name='fwd')(x.shape[-1])
    bwd = LSTMDirection(self.lstm_dim, dt, name='bwd')(x.shape[-1])
    # 0 resets the state: a review starts there in the direction of travel.
    keep_f = 1.0 - packed['starts'].T.astype(dt)[..., None]
    keep_b = 1.0 - packed['ends'].T.astype(dt)[..., None]
    last, first = packed['last'], packed['first']  # (row, position)
    if self.loop == 'bidirectional':
      # Both input kernels side by side: one product, (P, R, 2, 4H).
      proj = jnp.einsum('prf,fdg->prdg', x, jnp.stack([fwd[0], bwd[0]], 1))
      hs = lstm.bidirectional(proj + jnp.stack([fwd[2], bwd[2]]), keep_f,
                              keep_b, jnp.stack([fwd[1], bwd[1]]))
      # (P, 2, R, H) in loop order: the backward direction's time reversed.
      return jnp.concatenate(
          [hs[last[:, 1], 0, last[:, 0]],
           hs[hs.shape[0] - 1 - first[:, 1], 1, first[:, 0]]], -1)
    hf = lstm.recurrence(x @ fwd[0] + fwd[2], keep_f, fwd[1], False)
    hb = lstm.recurrence(x @ bwd[0] + bwd[2], keep_b, bwd[1], True)
    return jnp.concatenate([hf[last[:, 1], last[:, 0]],
                            hb[first[:, 1], first[:, 0]]], -1)


# config.model.text_encoder -> the module that turns tokens into features;
# None: features were computed at preprocessing by a frozen pretrained
# encoder and the model reads `text_features` (B, F) directly. A new encoder
# is a module with the fields and call of the two above, and an entry here.
TEXT_ENCODERS: dict[str, type[nn.Module] | None] = {
    'mean': MeanEncoder, 'lstm': BiLSTMEncoder, 'pretrained': None}


def check_config(model_config) -> None:
  """The model fields that choose from this module: the encoders
  (`TEXT_ENCODERS`, `AUDIO_ENCODERS`), the pooling (`POOLINGS`), and the
  options only the mean encoder has.

  Raises:
    UserError: one line naming the field.
  """
  m = model_config
  need_choice('model.text_encoder', m.text_encoder, TEXT_ENCODERS)
  need_choice('model.audio_encoder', m.audio_encoder, AUDIO_ENCODERS)
  need_choice('model.pooling', m.pooling, POOLINGS)
  need(m.pooling == 'mean' or m.text_encoder == 'mean', 'model.pooling',
       m.pooling, "weighted pooling is the mean encoder's "
       "(model.text_encoder='mean')")
  need(not m.word_dropout or m.text_encoder == 'mean', 'model.word_dropout',
       m.word_dropout, "word dropout is the mean encoder's "
       "(model.text_encoder='mean')")


class TwoBranch(nn.Module):
  """Audio and text branches into one embedding space (module docstring)."""
  vocab_size: int
  text_encoder: str = 'mean'
  audio_encoder: str = 'track'
  word_dim: int = 256
  hidden_dim: int = 256
  embed_dim: int = 128
  lstm_dim: int = 256
  lstm_loop: str = 'per_direction'  # BiLSTMEncoder's `loop`.
  linear: bool = False
  linear_path: bool = False  # Head's `linear_path`.
  batch_norm: bool = False
  bn_axis_name: str | None = None
  pooling: str = 'mean'  # Mean encoder: 'mean' or 'idf' (weighted).
  dropout: float = 0.0  # Heads' hidden layers, in training.
  word_dropout: float = 0.0  # Mean encoder: words dropped in training.
  # Products and activations (`train.compute_dtype`); parameters, their
  # optimizer state and the embeddings the loss reads stay float32.
  dtype: Any = jnp.float32

  def setup(self):
    head = dict(hidden_dim=self.hidden_dim, embed_dim=self.embed_dim,
                linear=self.linear, linear_path=self.linear_path,
                batch_norm=self.batch_norm,
                bn_axis_name=self.bn_axis_name, dropout=self.dropout,
                dtype=self.dtype)
    self.audio_head = Head(**head)
    self.text_head = Head(**head)
    encoder = TEXT_ENCODERS[self.text_encoder]
    if encoder is not None:
      extra = ({'weighted': True} if self.pooling == 'idf' else
               {'loop': self.lstm_loop} if self.text_encoder == 'lstm' else {})
      self.text_features = encoder(vocab_size=self.vocab_size,
                                   word_dim=self.word_dim,
                                   lstm_dim=self.lstm_dim, dtype=self.dtype,
                                   **extra)
    if self.audio_encoder == 'album_lstm':
      self.album_rnn = nn.RNN(nn.OptimizedLSTMCell(self.lstm_dim,
                                                   dtype=self.dtype),
                              return_carry=True)

  def embed_audio(self, audio: jax.Array, train: bool = False,
                  num_tracks: jax.Array | None = None) -> jax.Array:
    """(B, A) descriptors, or (B, T, A) tracks with num_tracks -> (B, E)."""
    if self.audio_encoder == 'album_lstm':
      if audio.ndim != 3 or num_tracks is None:
        raise ValueError('album_lstm embeds (B, T, A) tracks with num_tracks.')
      (_, audio), _ = self.album_rnn(audio, seq_lengths=jnp.maximum(
          num_tracks, 1))
    return self.audio_head(audio, train)

  def embed_text(self, tokens: jax.Array | None = None,
                 lengths: jax.Array | None = None,
                 text_features: jax.Array | None = None,
                 train: bool = False,
                 table: jax.Array | None = None,
                 packed: dict[str, jax.Array] | None = None,
                 flat_review: jax.Array | None = None,
                 rare_tokens: jax.Array | None = None) -> jax.Array:
    """tokens (B, L) + lengths (B,), or text_features (B, F) -> (B, E).

    `table` (U, D): tokens index these rows instead of the embedding table;
    `packed`: tokens are packed rows (BiLSTMEncoder); `flat_review` (T,):
    the mean encoder reads only the real tokens; `rare_tokens` (R,): its
    bag-of-words product is split (MeanEncoder).
    """
    if TEXT_ENCODERS[self.text_encoder] is None:
      if text_features is None:
        raise ValueError('text_encoder=pretrained embeds text_features.')
      return self.text_head(text_features, train)
    extra = {}
    if flat_review is not None:
      if self.text_encoder != 'mean':
        raise ValueError('Only the mean text encoder reads the flat layout.')
      extra['flat_review'] = flat_review
    if rare_tokens is not None:
      if self.text_encoder != 'mean':
        raise ValueError('rare_tokens: only the mean text encoder splits '
                         'its bag-of-words.')
      extra['rare_tokens'] = rare_tokens
    if train and self.word_dropout:
      # Each word of each review read with probability 1 - word_dropout:
      # the mean of the rest (Iyyer et al. 2015) keeps the model from
      # tying an album to one review's exact words.
      # Drawn flat, then shaped: the same bits as a (B, L) draw, and the
      # threefry hash of a flat counter compiles much faster on XLA's CPU
      # backend than a multi-dimensional one (`losses.ranking_loss`).
      extra['keep'] = jax.random.bernoulli(
          self.make_rng('dropout'), 1.0 - self.word_dropout,
          (tokens.size,)).reshape(tokens.shape)
    return self.text_head(
        self.text_features(tokens, lengths, table, packed, **extra), train)

  def __call__(self, audio: jax.Array | None = None,
               tokens: jax.Array | None = None,
               lengths: jax.Array | None = None,
               text_features: jax.Array | None = None,
               num_tracks: jax.Array | None = None,
               train: bool = False,
               text_table: jax.Array | None = None,
               packed: dict[str, jax.Array] | None = None,
               flat_review: jax.Array | None = None,
               rare_tokens: jax.Array | None = None) -> dict[str, Any]:
    out = {}
    if audio is not None:
      out['audio'] = self.embed_audio(audio, train, num_tracks)
    if tokens is not None or text_features is not None:
      out['text'] = self.embed_text(tokens, lengths, text_features, train,
                                    text_table, packed, flat_review,
                                    rare_tokens)
    return out


def build(model_config, vocab_size: int, bn_axis_name: str | None = None,
          dtype: Any = jnp.float32, lstm_loop: str | None = None
          ) -> TwoBranch:
  """The model a config describes (fields: see configs/default.py),
  computing in `dtype` (training's plan's `compute_dtype`; inference
  computes in float32), its BiLSTM's directions run as `lstm_loop` (the
  plan's; None: `mardjax.plan.lstm_loop` for the default backend). Both
  loops compute the same function from the same parameters."""
  if model_config.text_encoder not in TEXT_ENCODERS:
    raise ValueError(f'config.model.text_encoder={model_config.text_encoder!r}'
                     f': choose from {tuple(TEXT_ENCODERS)}.')
  if model_config.audio_encoder not in AUDIO_ENCODERS:
    raise ValueError(f'config.model.audio_encoder='
                     f'{model_config.audio_encoder!r}: choose from '
                     f'{AUDIO_ENCODERS}.')
  return TwoBranch(vocab_size=vocab_size,
                   text_encoder=model_config.text_encoder,
                   audio_encoder=model_config.audio_encoder,
                   word_dim=model_config.word_dim,
                   hidden_dim=model_config.hidden_dim,
                   embed_dim=model_config.embed_dim,
                   lstm_dim=model_config.lstm_dim,
                   lstm_loop=lstm_loop or plan_lib.lstm_loop(
                       model_config, jax.default_backend()),
                   linear=model_config.linear,
                   linear_path=model_config.linear_path,
                   batch_norm=model_config.batch_norm,
                   bn_axis_name=bn_axis_name,
                   pooling=model_config.pooling,
                   dropout=model_config.dropout,
                   word_dropout=model_config.word_dropout,
                   dtype=dtype)


def album_tracks(config: ml_collections.ConfigDict) -> int:
  """Tracks per album the album LSTM reads (0: a track model, one track)."""
  return (config.model.max_tracks
          if config.model.audio_encoder == 'album_lstm' else 0)


def from_manifest(config: ml_collections.ConfigDict,
                  manifest: manifest_lib.Manifest,
                  bn_axis_name: str | None = None,
                  dtype: Any = jnp.float32, lstm_loop: str | None = None
                  ) -> TwoBranch:
  """The configured model for the data of `manifest` (its vocabulary size).

  Raises:
    UserError: the pretrained text encoder on records without its features.
  """
  if (TEXT_ENCODERS.get(config.model.text_encoder, 0) is None
      and not manifest.feature_dim):
    raise UserError(
        "config.model.text_encoder='pretrained' reads precomputed text "
        'features, and these records hold none: set '
        'config.data.text_encoder_path to a local Hugging Face model '
        'directory (preprocessing then computes them).')
  return build(config.model, manifest.vocab.size, bn_axis_name, dtype,
               lstm_loop)


def dummy_inputs(config: ml_collections.ConfigDict,
                 manifest: manifest_lib.Manifest, rows: int = 2
                 ) -> dict[str, Any]:
  """Zero inputs of the shapes the model takes, for `init` under
  `jax.eval_shape` (restore targets without reading data)."""
  dim, tracks = manifest.descriptors.dim, album_tracks(config)
  out = {'tokens': np.zeros((rows, config.data.max_len), np.int32),
         'lengths': np.ones((rows,), np.int32), 'train': False,
         'audio': np.zeros((rows, tracks, dim) if tracks else (rows, dim),
                           np.float32)}
  if tracks:
    out['num_tracks'] = np.ones((rows,), np.int32)
  if manifest.feature_dim:
    out['text_features'] = np.zeros((rows, manifest.feature_dim), np.float32)
  return out
