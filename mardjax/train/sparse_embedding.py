"""Row-sparse training of the word-embedding table (lazy Adam).

A batch of 128 reviews touches a few thousand of the 60,002 rows of the
embedding table, yet a dense step scatters the gradient into a full
(V, D) zero array and runs Adam over all V x D entries (about 60 MB read and
written several times), a cost that follows the table, not the batch, and
dominates a `mean` step where memory bandwidth is scarce, as on CPUs. Here
the step sees only the rows its batch uses:

1. `compact_batch` (numpy, on the host) lists the distinct word ids of the
   global batch, `vocab_ids` (U,), padded with out-of-range ids (>= V) to a
   multiple of a bucket size (so only a few shapes are ever compiled), and
   rewrites each review's tokens as `slots`, indices into that list.
2. The step gathers those rows, `table[vocab_ids]` (U, D), differentiates the
   loss with respect to them, and averages the (U, D) gradient over devices
   (every device holds the same `vocab_ids`, so this is exact).
3. `lazy_adam` updates those rows of the table and of Adam's moments and
   leaves every other row alone (TensorFlow's LazyAdam, PyTorch's
   SparseAdam). Rows not in the batch do not keep moving on their old
   momentum as they would under dense Adam; for rows in the batch the update
   is dense Adam's up to rounding: the moments' decay and update are one
   multiply-add, which the compiler may fuse (tests/sparse_embedding_test.py).

The `mean` encoder then needs no (B, L, D) gather at all: its features are a
(B, U) bag-of-words matrix times the (U, D) rows, or with `split_bag` that
product over the first `layouts.BAG_SLOTS` rows plus the other rows'
tokens one by one ('rare_tokens', `layouts.rare_mask`).
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mardjax.models import layouts

# Where nn.Embed keeps the table in the model's params.
EMBED_PATH = ('text_features', 'embed', 'embedding')


class LazyAdamState(NamedTuple):
  """Adam's moments of the embedding table: moments[:, 0] = mu, [:, 1] = nu.

  One (V, 2, D) array, so a step gathers the new moments of its rows once,
  not twice.
  """
  moments: jax.Array


def has_table(params: dict[str, Any]) -> bool:
  node = params
  for key in EMBED_PATH:
    if not isinstance(node, dict) or key not in node:
      return False
    node = node[key]
  return True


def split_table(params: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
  """(embedding table (V, D), the other params without it)."""
  a, b, c = EMBED_PATH
  rest = dict(params)
  text = dict(rest[a])
  rest[a] = text
  table = text.pop(b)[c]
  return table, rest


def merge_table(table: jax.Array, rest: dict[str, Any]) -> dict[str, Any]:
  """Inverse of `split_table`."""
  a, b, c = EMBED_PATH
  params = dict(rest)
  params[a] = dict(params[a], **{b: {c: table}})
  return params


def init(table: jax.Array) -> LazyAdamState:
  return LazyAdamState(jnp.zeros((table.shape[0], 2, table.shape[1]),
                                 table.dtype))


def compact_batch(batch: dict[str, np.ndarray], vocab_size: int,
                  bucket: int, union: Callable[[np.ndarray], np.ndarray]
                  | None = None, split_bag: bool = False,
                  sizes: Callable[[dict[str, int]], dict[str, int]]
                  | None = None) -> dict[str, np.ndarray]:
  """Replaces 'tokens' (D, b, L) by 'slots' (D, b, L) and 'vocab_ids' (D, U).

  Args:
    batch: a training batch (`input_pipeline.train_batches`), D devices;
      with (D, b) 'lengths' of padded (unpacked) reviews, the tokens past
      each review's length are not read (their slots are the padding
      word's).
    vocab_size: V, rows of the embedding table; ids must be in [0, V).
    bucket: U is the number of distinct ids rounded up to a multiple of this.
    union: with several processes, maps this process's (V,) bool mask of
      ids present to the mask of ids present in any process, so that every
      device of the run holds the same `vocab_ids`.

  Returns:
    A new dict: `vocab_ids[d]` is the same sorted id list on every device,
    padded with ids >= V (no row has them: no slot refers to them and
    their updates are dropped); `vocab_ids[d, slots[d, i, t]] == tokens[d, i, t]`.
  """
  tokens = batch['tokens']
  lengths = batch.get('lengths')
  real = None
  if (lengths is not None and 'starts' not in batch  # Not packed.
      and lengths.shape == tokens.shape[:-1]):
    # Padded (D, b, L) reviews: only their real tokens are read, a fifth of
    # the positions at MARD's lengths, so the host's work per step follows
    # the tokens, not the padding. The padding word (id 0) stays in the
    # list when the array holds padding, as the device-assembled step's
    # `index_batches` lists it, and padding positions get its slot.
    real = np.arange(tokens.shape[-1]) < lengths[..., None]
    words = tokens[real]
  else:  # Packed rows (the LSTM) or no lengths: every position.
    words = tokens.reshape(-1)
  low, high = (words.min(), words.max()) if words.size else (0, 0)
  if low < 0 or high >= vocab_size:
    raise ValueError(f'token id {high if high >= vocab_size else low} is '
                     f'outside the vocabulary of {vocab_size}')
  # A scatter of True: presence only, no counts to add up (cheaper than
  # np.bincount).
  present = np.zeros(vocab_size, bool)
  present[words] = True
  if words.size < tokens.size:
    present[0] = True
  if union is not None:
    present = union(present)
  ids = np.flatnonzero(present).astype(np.int32)
  lookup = np.zeros(vocab_size, np.int32)
  lookup[ids] = np.arange(ids.shape[0], dtype=np.int32)
  out = {k: v for k, v in batch.items() if k != 'tokens'}
  if real is None:
    out['slots'] = lookup[tokens]
  else:
    out['slots'] = np.zeros(tokens.shape, np.int32)
    out['slots'][real] = lookup[words]
  if split_bag:
    rare = layouts.rare_mask(out['slots'], batch['lengths'], np)
    rare = rare.reshape(rare.shape[0], -1)
    size = list_sizes(ids.shape[0], bucket, int(rare.sum(1).max())
                      if rare.shape[0] else 0)
    if sizes:
      size = sizes(size)
    out['rare_tokens'] = np.stack([layouts.rare_tokens(x, size['rare'], np)
                                   for x in rare])
  else:
    size = list_sizes(ids.shape[0], bucket)
  padded = padded_ids(ids, vocab_size, size['vocab'])
  out['vocab_ids'] = np.broadcast_to(padded, (tokens.shape[0], len(padded)))
  return out


def list_sizes(distinct: int, bucket: int, rare: int | None = None
               ) -> dict[str, int]:
  """The bucketed sizes of a batch's word list ('vocab', U: `distinct`
  words) and, with the split bag-of-words (`rare` tokens outside its
  product), of its token list ('rare', R). Split, U is at least
  `layouts.BAG_SLOTS`, so that the product's size never changes."""
  if rare is None:
    return {'vocab': bucket_size(distinct, bucket)}
  return {'vocab': bucket_size(max(distinct, layouts.BAG_SLOTS), bucket),
          'rare': bucket_size(rare, bucket)}


def bucket_size(count: int, bucket: int) -> int:
  """U for `count` distinct ids: rounded up to a multiple of `bucket`."""
  return -(-count // bucket) * bucket


def padded_ids(ids: np.ndarray, vocab_size: int, size: int) -> np.ndarray:
  """(size,) int32: the sorted distinct `ids` (k,), then padding ids V,
  V+1, ...: out of range, and distinct like the real ones."""
  padded = np.arange(vocab_size - ids.shape[0],
                     vocab_size - ids.shape[0] + size, dtype=np.int32)
  padded[:ids.shape[0]] = ids
  return padded


def slots_on_device(tokens: jax.Array, vocab_ids: jax.Array,
                    vocab_size: int) -> jax.Array:
  """`compact_batch`'s 'slots' inside a jitted step: each token's index in
  `vocab_ids` (U,) (`padded_ids`, holding every id of `tokens`), through a
  (V,) lookup as the host builds it."""
  lookup = jnp.zeros(vocab_size, jnp.int32).at[vocab_ids].set(
      jnp.arange(vocab_ids.shape[0], dtype=jnp.int32), mode='drop',
      unique_indices=True)
  return lookup[tokens]


def gather_rows(table: jax.Array, vocab_ids: jax.Array) -> jax.Array:
  """(U, ...) rows of `table`; padding ids (>= V) read its last row.

  What padding rows hold does not matter: no slot refers to them (their
  bag-of-words weight is 0 and no token looks them up) and their updates
  are dropped. Clamping instead of zero-filling saves a pass over the rows.
  """
  return jnp.take(table, vocab_ids, axis=0, mode='clip')


def lazy_adam(table: jax.Array, state: LazyAdamState, vocab_ids: jax.Array,
              row_grads: jax.Array, count: jax.Array, *,
              learning_rate: float | Callable[[jax.Array], jax.Array],
              b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
              ) -> tuple[jax.Array, LazyAdamState]:
  """Adam on the rows `vocab_ids` only (optax.adam's formula and defaults).

  Args:
    table: (V, D) embedding table.
    state: its moments.
    vocab_ids: (U,) distinct row ids; ids >= V are padding and ignored.
    row_grads: (U, D) gradient of the loss with respect to those rows.
    count: the step number after this update (1 for the first), for Adam's
      bias correction, as optax counts.
    learning_rate, b1, b2, eps: optax.adam's; a schedule is called with
      the number of earlier updates, as optax calls it.

  Returns:
    (new table, new moments).
  """
  moments = state.moments
  # Each moment's update is its scatter's combiner, applied to the raw
  # gradient rows: no (U, D) update array is written and read per moment.
  for plane, combine in enumerate((
      lambda old, g: b1 * old + (1 - b1) * g,
      lambda old, g: b2 * old + (1 - b2) * g * g)):
    moments = _update_rows(moments, vocab_ids, plane, combine, row_grads)
  new = gather_rows(moments, vocab_ids)
  count = count.astype(row_grads.dtype)
  mu_hat = new[:, 0] / (1 - b1 ** count)
  nu_hat = new[:, 1] / (1 - b2 ** count)
  if callable(learning_rate):
    learning_rate = learning_rate(count - 1)
  step = -learning_rate * (mu_hat / (jnp.sqrt(nu_hat) + eps))
  # The ids are distinct, so `add` touches each row once.
  table = table.at[vocab_ids].add(step, mode='drop', unique_indices=True)
  return table, LazyAdamState(moments)


# (U, 2) indices (row, plane) of a (V, 2, D) array, each addressing a (D,)
# window.
_PLANE_ROWS = jax.lax.ScatterDimensionNumbers(
    update_window_dims=(1,), inserted_window_dims=(0, 1),
    scatter_dims_to_operand_dims=(0, 1))


def _update_rows(moments: jax.Array, vocab_ids: jax.Array, plane: int,
                 combine: Callable[[jax.Array, jax.Array], jax.Array],
                 grads: jax.Array) -> jax.Array:
  """moments[vocab_ids, plane] = combine(moments[vocab_ids, plane], grads).

  One scatter whose combiner is the moment's own update, so each row is
  read and written once where it lies, and the gradient rows are its
  update operand as they are. Gathering the old rows, computing the new
  ones and scattering them back (`.at[].set`) passes the rows through more
  (U, D) arrays, and so does an update array computed before the scatter
  (`(1 - b1) * g`), a visible part of a `mean` step on CPUs (the train
  benchmark; see docs/performance.md).
  `jax.lax.scatter_p` is the primitive behind `.at[]`, which offers only
  fixed combiners (add, multiply, min, max, replace).

  Args:
    moments: (V, 2, D).
    vocab_ids: (U,) distinct row ids; ids >= V are dropped.
    plane: which of the two (V, D) planes.
    combine: (old, gradient) -> new, elementwise on scalars.
    grads: (U, D) the rows' gradient.
  """
  scalar = jax.ShapeDtypeStruct((), moments.dtype)
  combiner = jax.make_jaxpr(combine)(scalar, scalar)
  index = jnp.stack([vocab_ids, jnp.full_like(vocab_ids, plane)], 1)
  return jax.lax.scatter_p.bind(
      moments, index, grads.astype(moments.dtype),
      update_jaxpr=combiner.jaxpr, update_consts=tuple(combiner.consts),
      dimension_numbers=_PLANE_ROWS, indices_are_sorted=False,
      unique_indices=True, mode=jax.lax.GatherScatterMode.FILL_OR_DROP)
