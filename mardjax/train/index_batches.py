"""What the host decides for steps that assemble their batch on the device.

Such a step (`train_step.step_program` with device assembly) is sent a batch's
review rows and track rows; the rest of what it needs that depends on the
batch is decided here, on the host, from those indices alone:

  * `Planner.with_plans`, in the prefetch thread, per batch: where the
    packed LSTM layout puts each review (`packing.plan`), the lazy
    update's distinct words and the most rows one album holds (how wide
    the ranking loss's lists of positives get);
  * `Planner.__call__`, at dispatch, where the processes of a run can
    agree: the static sizes (`train_step.Layout`) over the dispatch's
    steps, devices and processes (the positive lists' width among them:
    the step makes the lists, `losses.device_positive_lists`), the lazy
    update's padded word list, and the arrays shaped as the step's
    wrapper takes them.

The step then builds the same batch `train_step.prepare_batch` builds on
the host, bit for bit (tests/train_step_test.py, tests/train_test.py).
"""

from typing import Iterator

import ml_collections
import numpy as np

from mardjax import plan as plan_lib
from mardjax.data import input_pipeline
from mardjax.data import tables
from mardjax.models import layouts
from mardjax.models import two_branch
from mardjax.train import losses
from mardjax.train import packing
from mardjax.train import sparse_embedding
from mardjax.train import train_step


class Planner:
  """Turns the iterator's items for one dispatch into the step's arguments.

  Args:
    config: the run's config.
    plan: the run's plan (its text layout and positive lists).
    reviews: this process's training reviews (the device tables' rows).
    vocab_size: V, rows of the embedding table trained with the lazy
      update; 0 when the update is dense (no word lists).
    sync: with several processes, how they agree on sizes and word lists.
    widths: the run's widths of the positive lists
      (`step_builder.positive_widths`); None: each dispatch's own.
  """

  def __init__(self, config: ml_collections.ConfigDict, plan: plan_lib.Plan,
               reviews: tables.ReviewTable, vocab_size: int,
               sync: train_step.ProcessSync | None = None,
               widths: train_step.ProgramSizes | None = None):
    self.max_len = config.data.max_len
    self.token_bucket = plan.token_bucket
    self.pack_rows = plan.pack_rows
    self.vocab_bucket = config.train.vocab_bucket
    self.album_tracks = two_branch.album_tracks(config)
    self.reviews = reviews
    self.lengths = np.minimum(reviews.lengths, self.max_len)
    self.vocab_size = vocab_size
    self.split_bag = bool(vocab_size) and plan.split_bag
    self.sync = sync
    self.positives = plan.positives
    self.sizes = train_step.ProgramSizes(sync)
    self.widths = widths or train_step.ProgramSizes()
    # The flat layout's sizes (`layout`): at least `_token_floor`'s.
    self.token_sizes = train_step.ProgramSizes()
    self.token_floor: int | None = None

  def with_plans(self, it: Iterator) -> Iterator:
    """`input_pipeline.train_indices` batches plus what the host decides
    for each from its indices, made in the iterator (the prefetch thread),
    off the step's path.

    For the packed LSTM, where the layout puts each review, 'place'
    (D, b, 2), and the rows the fullest device uses, 'packed_rows'
    (`packing.plan`; best-fit decreasing, a Python loop over the batch,
    linear in its size). For the
    lazy update, the sorted distinct words of the batch's reviews on all
    local devices, 'words' (k,), and with the split bag-of-words each
    device's distinct words and their token counts, 'device_words'. For
    the ranking loss, the most rows one album holds among a row's
    candidates (its device's rows, or all local devices'), 'most_rows':
    the step makes the lists of positives (the host's lists would cost a
    sort of the batch here and their bytes in each dispatch).
    """
    for position, idx in it:
      idx = dict(idx)
      if self.positives:
        rows = idx['rows']
        idx['most_rows'] = np.int64(input_pipeline.most_album_rows(
            self.reviews, rows if self.positives == 'local'
            else rows.reshape(1, -1)))
      if self.pack_rows:
        idx['place'], used = packing.plan(self.lengths[idx['rows']],
                                          self.max_len)
        idx['packed_rows'] = np.int64(used)
      # The words read: each review's first max_len tokens, as the host's
      # batches hold them (a word only beyond them would have its Adam
      # moments decayed by the lazy update in this path alone).
      if self.split_bag:
        idx['device_words'] = [np.unique(self.reviews.tokens[
            self.reviews.token_index(r, self.max_len)], return_counts=True)
                               for r in idx['rows']]
        idx['words'] = np.unique(np.concatenate(
            [w for w, _ in idx['device_words']]))
      elif self.vocab_size:
        idx['words'] = np.unique(self.reviews.tokens[
            self.reviews.token_index(idx['rows'].ravel(), self.max_len)])
      yield position, idx

  def _max(self, value: int) -> int:
    return self.sync.max(value) if self.sync else value

  def layout(self, items: list[dict[str, np.ndarray]]) -> train_step.Layout:
    """The text layout's static sizes, the largest of any step, device and
    process of the dispatch."""
    num_tokens = packed_rows = 0
    if self.token_bucket:
      if self.token_floor is None:  # Agreed once, at the first dispatch.
        self.token_floor = self._max(
            self._token_floor(items[0]['rows'].shape[-1]))
      # The most real tokens of any step and device.
      size = int(max(self.lengths[x['rows']].sum(-1).max() for x in items))
      num_tokens = self.token_sizes({'tokens': layouts.flat_size(
          max(self._max(size), self.token_floor), self.token_bucket)}
                                    )['tokens']
    if self.pack_rows:
      used = max(int(x['packed_rows']) for x in items)
      packed_rows = packing.row_count(self._max(used), self.pack_rows,
                                      items[0]['rows'].shape[-1])
    width = self.positive_width(items) if self.positives else 0
    return train_step.Layout(num_tokens, packed_rows, self.album_tracks,
                             positive_width=width)

  def _token_floor(self, rows: int) -> int:
    """The flat layout's smallest size: a batch of `rows` reviews holds
    more tokens only 3 times in 100,000 (4 standard deviations above the
    mean of `rows` lengths drawn from the table). Each flat size is a
    program, compiled once (seconds each on a GPU, often more than a short
    run's steps): with each batch's own bucket a run compiles one program
    per size it meets; with the floor, nearly always one. The floor pads a
    batch of 1,024 MARD-like reviews by about a tenth of its tokens (more
    at small batches, where the padding is cheap). A larger
    batch still gets its own size, and later ones that fit reuse it
    (`train_step.ProgramSizes`)."""
    mean = float(self.lengths.mean()) if len(self.lengths) else 0.0
    std = float(self.lengths.std()) if len(self.lengths) else 0.0
    return int(min(rows * mean + 4.0 * np.sqrt(rows) * std,
                   rows * self.max_len))

  def vocab_ids(self, items: list[dict[str, np.ndarray]],
                sizes: train_step.Layout
                ) -> tuple[np.ndarray, train_step.Layout]:
    """(n, D, U) each step's distinct words (`sparse_embedding.padded_ids`),
    the same list on every device, as `prepare_batch` compacts them; and
    `sizes` with the split bag-of-words' size."""
    words = []
    for x in items:
      lens = self.lengths[x['rows']]  # (D, b)
      # The host compacts the token array of the layout, padding included:
      # the padding word is in the list when that array holds one.
      if sizes.packed_rows:
        padding = ((lens == 0).any() or (sizes.packed_rows * self.max_len
                                         > np.maximum(lens, 1).sum(-1)).any())
      else:
        padding = (lens < self.max_len).any()
      w = np.union1d(x['words'], [0]) if padding else x['words']
      if self.sync:
        present = np.zeros(self.vocab_size, bool)
        present[w] = True
        w = np.flatnonzero(self.sync.any(present))
      words.append(w)
    count = max(len(w) for w in words)
    if self.split_bag:  # As `compact_batch`.
      size = self.sizes(sparse_embedding.list_sizes(
          count, self.vocab_bucket, self.rare_count(items, words)))
      sizes = sizes._replace(rare_tokens=size['rare'])
    else:
      size = sparse_embedding.list_sizes(count, self.vocab_bucket)
    d = items[0]['rows'].shape[0]
    return np.stack([np.broadcast_to(sparse_embedding.padded_ids(
        w, self.vocab_size, size['vocab']), (d, size['vocab']))
                     for w in words]), sizes

  def positive_width(self, items: list[dict[str, np.ndarray]]) -> int:
    """The width of the steps' positive lists: the longest any step,
    device or process needs, widened to the width a compiled program
    agrees on (`train_step.program_width`)."""
    return train_step.program_width(
        losses.positive_width(max(int(x['most_rows']) for x in items)),
        self.sync, self.widths)

  def rare_count(self, items: list[dict[str, np.ndarray]],
                 words: list[np.ndarray]) -> int:
    """The split bag-of-words' most tokens of any step and local device
    outside the product: those whose word is beyond the step's first
    `layouts.BAG_SLOTS` words (`layouts.rare_mask`)."""
    most = 0
    for x, w in zip(items, words):
      if len(w) > layouts.BAG_SLOTS:
        last = w[layouts.BAG_SLOTS - 1]
        most = max([most] + [int(c[ids > last].sum())
                             for ids, c in x['device_words']])
    return most

  def __call__(self, items: list[dict[str, np.ndarray]], pmap: bool
               ) -> tuple[dict[str, np.ndarray], train_step.Layout]:
    """(idx, layout) for the n = len(items) steps of one dispatch.

    idx's arrays are (D, b, ...) per step, stacked as the wrappers take
    them: under pmap (D, b, ...) for one step, (D, n, b, ...) for several;
    otherwise (D * b, ...) and (n, D * b, ...) (one device or a mesh).
    """
    # int32, as the device holds them (jax's default integers): sent as
    # drawn (int64), they would be converted on the host at every dispatch.
    idx = {k: np.stack([x[k] for x in items]).astype(np.int32, copy=False)
           for k in ('rows', 'tracks', 'place') if k in items[0]}
    sizes = self.layout(items)
    if self.vocab_size:
      idx['vocab_ids'], sizes = self.vocab_ids(items, sizes)
    if pmap:
      idx = {k: np.swapaxes(x, 0, 1) for k, x in idx.items()}
    else:
      idx = {k: x.reshape(len(items), -1, *x.shape[3:])
             for k, x in idx.items()}
    if len(items) == 1:
      idx = {k: x[:, 0] if pmap else x[0] for k, x in idx.items()}
    return idx, sizes
