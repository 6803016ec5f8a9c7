"""The host's plan for steps that assemble their batch on the device
(`index_batches.Planner`), against hand-computed and plain answers: no
compiled program, so a wrong list or shape shows in seconds. The step built
from the plan is checked against the host's own batches in
tests/train_step_test.py (test_index_step_equals_the_host_step)."""

import dataclasses

import numpy as np
import pytest

from configs import test as test_config
from mardjax.data import tables
from mardjax.models import layouts
from mardjax.train import index_batches
from mardjax.train import losses
from mardjax.train import packing
from mardjax.train import sparse_embedding
from tests import step_helpers


def _reviews(lengths=(3, 1, 4, 2, 5, 2, 3, 1)):
  """Eight reviews of four albums; review r's tokens are 10 r + 2, ... ."""
  lengths = np.array(lengths, np.int32)
  tokens = np.concatenate([10 * r + 2 + np.arange(n)
                           for r, n in enumerate(lengths)]).astype(np.int32)
  return tables.ReviewTable(tokens=tokens,
                            offsets=np.cumsum(lengths) - lengths,
                            lengths=lengths,
                            album=np.array([0, 0, 1, 1, 2, 2, 3, 0], np.int32))


def _planner(positives='local', vocab_size=0, pack_rows=0, token_bucket=0,
             split_bag=False, max_len=4, vocab_bucket=4, sync=None,
             widths=None, reviews=None):
  config = test_config.get_config()
  config.data.max_len = max_len
  config.train.vocab_bucket = vocab_bucket
  plan = dataclasses.replace(
      step_helpers.cpu_plan(config, 1), positives=positives,
      pack_rows=pack_rows, token_bucket=token_bucket,
      text_layout='split_bag' if split_bag else 'padded')
  return index_batches.Planner(config, plan, reviews or _reviews(),
                               vocab_size, sync, widths)


def _item(rows):
  """One step's indices on len(rows) devices (as `train_indices` gives)."""
  rows = np.array(rows, np.int64)
  return (0, {'rows': rows, 'tracks': rows + 100})


@pytest.mark.parametrize('positives', ['local', 'across'])
def test_positive_list_widths_follow_the_plan(positives):
  """The planner sends no lists, only how many rows one album holds at
  most among a row's candidates (its device's, or every local device's),
  and the dispatch's width: the width of the host's lists
  (`losses.positive_lists`)."""
  planner = _planner(positives)
  # Albums (`_reviews`) [0, 0, 1, 1] and [0, 2, 3, 2]: at most 2 rows of
  # an album on a device, 3 across the two.
  rows = [[0, 1, 2, 3], [7, 4, 6, 5]]
  (_, idx), = planner.with_plans([_item(rows)])
  album = _reviews().album[np.array(rows)]
  lists = losses.positive_lists(album, positives == 'across')
  assert 'positives' not in idx
  assert idx['most_rows'] == (lists >= 0).sum(-1).max() == (
      3 if positives == 'across' else 2)
  out, layout = planner([idx], pmap=False)
  assert 'positives' not in out
  assert layout.positive_width == lists.shape[-1]
  (_, idx), = _planner('').with_plans([_item(rows)])
  assert 'most_rows' not in idx
  assert _planner('')([idx], pmap=False)[1].positive_width == 0


def test_word_lists_are_the_distinct_words_read():
  planner = _planner(vocab_size=100, max_len=3)
  (_, idx), = planner.with_plans([_item([[0, 2], [4, 1]])])
  # Each review's first 3 tokens (max_len): 2 3 4 | 22 23 24 | 42 43 44 | 12
  np.testing.assert_array_equal(idx['words'],
                                [2, 3, 4, 12, 22, 23, 24, 42, 43, 44])
  planner = _planner(vocab_size=100, max_len=3, split_bag=True)
  (_, idx), = planner.with_plans([_item([[0, 2], [4, 1]])])
  (w0, c0), (w1, c1) = idx['device_words']
  np.testing.assert_array_equal(w0, [2, 3, 4, 22, 23, 24])
  np.testing.assert_array_equal(w1, [12, 42, 43, 44])
  assert (c0 == 1).all() and (c1 == 1).all()
  np.testing.assert_array_equal(idx['words'],
                                [2, 3, 4, 12, 22, 23, 24, 42, 43, 44])


def test_packed_rows_come_from_the_packing_plan():
  planner = _planner(pack_rows=2, max_len=5)
  rows = [[0, 1, 2, 3], [4, 5, 6, 7]]
  (_, idx), = planner.with_plans([_item(rows)])
  place, used = packing.plan(_reviews().lengths[np.array(rows)], 5)
  np.testing.assert_array_equal(idx['place'], place)
  assert int(idx['packed_rows']) == used
  layout = planner.layout([idx])
  assert layout.packed_rows == packing.row_count(used, 2, 4)
  assert layout.num_tokens == 0


@pytest.mark.parametrize('pmap', [False, True])
@pytest.mark.parametrize('steps', [1, 3])
def test_a_dispatch_is_stacked_as_the_step_takes_it(pmap, steps):
  """Under pmap (D, n, b, ...), else (n, D * b, ...); one step drops n."""
  planner = _planner('local')
  rng = np.random.default_rng(steps)
  items = [idx for _, idx in planner.with_plans(
      [_item(rng.permutation(8).reshape(2, 4)) for _ in range(steps)])]
  out, _ = planner(items, pmap=pmap)
  assert set(out) == {'rows', 'tracks'}
  assert all(x.dtype == np.int32 for x in out.values())  # As on device.
  for s, x in enumerate(items):
    for d in range(2):
      for key in ('rows', 'tracks'):
        want = x[key][d]
        if pmap:
          got = out[key][d, s] if steps > 1 else out[key][d]
        else:
          got = (out[key][s] if steps > 1 else out[key])[d * 4:(d + 1) * 4]
        np.testing.assert_array_equal(got, want, err_msg=key)


def test_positive_list_widths_are_the_runs_and_then_reused():
  """A run's widths (`step_builder.positive_widths`) are used as given;
  without them, a width met before is reused by narrower dispatches (one
  program, not one per width); a dispatch's width is its widest step's."""
  from mardjax.train import train_step  # pylint: disable=g-import-not-at-top
  narrow = {'most_rows': np.int64(2)}
  wide = {'most_rows': np.int64(9)}
  run = train_step.ProgramSizes()
  run({'positives': 32})
  planner = _planner('local', widths=run)
  assert planner.positive_width([narrow]) == 32
  planner = _planner('local')
  assert planner.positive_width([wide]) == 16
  assert planner.positive_width([narrow]) == 16
  assert _planner('local').positive_width([narrow]) == losses.MIN_POSITIVES
  assert _planner('local').positive_width([narrow, wide, narrow]) == 16


def test_vocab_ids_list_the_padding_word_when_a_row_is_padded():
  planner = _planner(vocab_size=100, max_len=3, vocab_bucket=4)
  (_, full), = planner.with_plans([_item([[0, 2]])])  # Lengths 3, 4 >= 3.
  (_, short), = planner.with_plans([_item([[0, 1]])])  # Length 1 < 3.
  for idx, padded in ((full, False), (short, True)):
    layout = planner.layout([idx])
    ids, _ = planner.vocab_ids([idx], layout)
    words = np.union1d(idx['words'], [0]) if padded else idx['words']
    size = sparse_embedding.list_sizes(len(words), 4)['vocab']
    np.testing.assert_array_equal(ids, [[sparse_embedding.padded_ids(
        words, 100, size)]])
  # Packed rows: padding whenever the rows hold more slots than tokens.
  planner = _planner(vocab_size=100, max_len=4, pack_rows=1)
  (_, idx), = planner.with_plans([_item([[2, 4]])])  # 4 + 4 tokens.
  layout = planner.layout([idx])
  ids, _ = planner.vocab_ids([idx], layout)
  assert (0 in ids) == (layout.packed_rows * 4 > 8)
  # Two one-token reviews in one row of four slots: padding.
  (_, idx), = planner.with_plans([_item([[1, 7]])])
  layout = planner.layout([idx])
  assert layout.packed_rows == 1
  assert 0 in planner.vocab_ids([idx], layout)[0]
  # Rows of one slot (max_len 1) filled by one-token reviews: none.
  planner = _planner(vocab_size=100, max_len=1, pack_rows=1)
  (_, idx), = planner.with_plans([_item([[0, 2]])])
  layout = planner.layout([idx])
  assert 0 not in planner.vocab_ids([idx], layout)[0]
  # An empty review fills its row with padding, even where rows of one
  # slot (max_len 1) hold exactly as many slots as reviews.
  planner = _planner(vocab_size=100, max_len=1, pack_rows=1,
                     reviews=_reviews((1, 0, 1, 1, 1, 1, 1, 1)))
  (_, idx), = planner.with_plans([_item([[0, 1, 2]])])
  layout = planner.layout([idx])
  assert layout.packed_rows == 3
  ids, _ = planner.vocab_ids([idx], layout)
  assert 0 in ids


def test_rare_count_is_the_most_tokens_beyond_the_bag(monkeypatch):
  monkeypatch.setattr(layouts, 'BAG_SLOTS', 3)
  planner = _planner(vocab_size=100, max_len=5, split_bag=True)
  items = [idx for _, idx in planner.with_plans([_item([[0, 1], [2, 4]])])]
  words = [items[0]['words']]  # 2 3 4 12 22 23 24 25 42 43 44 45 46
  # The bag holds the first 3 words (up to 4). Beyond them: device 0,
  # review 1's 12 (1 token); device 1, review 2's 22-25 and review 4's
  # 42-46 (9 tokens).
  assert planner.rare_count(items, words) == 9
  monkeypatch.setattr(layouts, 'BAG_SLOTS', 30)
  assert planner.rare_count(items, words) == 0


def test_the_flat_size_covers_every_step_of_the_dispatch():
  planner = _planner(token_bucket=4, max_len=4)
  items = [idx for _, idx in planner.with_plans(
      [_item([[1, 7]]), _item([[2, 4]])])]
  layout = planner.layout(items)
  floor = planner._token_floor(2)
  lengths = np.minimum(_reviews().lengths, 4)
  mean, std = lengths.mean(), lengths.std()
  assert floor == int(min(2 * mean + 4 * np.sqrt(2) * std, 2 * 4))
  assert layout.num_tokens == layouts.flat_size(max(8, floor), 4)
  assert layout.num_tokens >= 8  # Reviews 2 and 4: 4 + 4 tokens read.
  # Below the cap (rows * max_len), the floor is the mean of `rows`
  # lengths plus 4 standard deviations of their sum.
  lengths = np.minimum(_reviews().lengths, 5)
  want = 8 * lengths.mean() + 4 * np.sqrt(8) * lengths.std()
  assert want < 8 * 5
  assert _planner(token_bucket=4, max_len=5)._token_floor(8) == int(want)


class _TwoProcesses:
  """The other process of a two-process run, as `train_step.ProcessSync`
  answers for it: its words and its sizes."""

  def __init__(self, words, value):
    self.words, self.value = words, value

  def any(self, mask):
    other = np.zeros_like(mask)
    other[self.words] = True
    return mask | other

  def max(self, value):
    return max(value, self.value)


def test_processes_agree_on_word_lists_and_sizes():
  """With several processes, every word list holds the words of all of
  them, and the flat size is the largest any of them needs."""
  sync = _TwoProcesses(words=[7, 90], value=40)
  planner = _planner(vocab_size=100, max_len=3, sync=sync, token_bucket=4)
  (_, idx), = planner.with_plans([_item([[0, 2]])])
  layout = planner.layout([idx])
  assert layout.num_tokens == layouts.flat_size(40, 4)  # The other's 40.
  ids, _ = planner.vocab_ids([idx], layout)
  words = np.union1d(idx['words'], [7, 90])
  size = sparse_embedding.list_sizes(len(words), 4)['vocab']
  np.testing.assert_array_equal(
      ids, [[sparse_embedding.padded_ids(words, 100, size)]])
