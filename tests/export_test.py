"""--mode=export: the trained space as files, read back, searched."""

import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import test as test_config
from mardjax import modes
from mardjax.serve import export
from mardjax.train import checkpoints
from mardjax.errors import UserError


def test_export_round_trip(tiny_corpus_master, tmp_path):
  config = test_config.get_config()
  config.data.mard_dir = tiny_corpus_master
  config.train.update(num_steps=4, eval_every=4, checkpoint_every=4)
  workdir = str(tmp_path)
  trained = modes.run_mode('train', config, workdir, show_progress=False)
  info = modes.run_mode('export', config, workdir, show_progress=False)
  assert info['checkpoint'] == 'best' and info['reviews_without_text'] == 0
  # The best-by-recall evaluation's step (its first, on ties) is exported.
  best = max(trained['history'], key=lambda h: (h['recall@10'], -h['step']))
  assert info['step'] == best['step']
  # The exported weights are the best checkpoint's, whichever step it is:
  # its parameters read straight from best/<step>/state with Orbax (not
  # through the loader the export uses) have the export's fingerprint.
  best_dir = tmp_path / checkpoints.BEST_DIR
  assert str(best['step']) in os.listdir(best_dir)
  saved = ocp.PyTreeCheckpointer().restore(
      str(best_dir / str(best['step']) / 'state'))
  assert info['params_sha256'] == checkpoints.params_fingerprint(
      saved['params']), 'the export is not the best checkpoint\'s weights'
  # The run's last parameters have the export's fingerprint exactly when
  # the best step is the last one.
  assert (info['params_sha256'] == trained['params_sha256']) == (
      best['step'] == trained['steps'])
  bank = export.load(info['directory'])
  assert bank['albums'].shape == (info['albums'], 16)
  np.testing.assert_allclose(np.linalg.norm(bank['reviews'], axis=1), 1,
                             rtol=1e-5)
  splits = {m['split'] for m in bank['review_meta']}
  assert splits == {'train', 'dev', 'test'}
  assert all(m['text'] for m in bank['review_meta'])
  assert {'artist', 'title', 'genre'} <= set(bank['album_meta'][0])
  # Exact search: every review finds itself first.
  assert bank['info']['index'] == {'kind': 'exact'}
  idx, scores = bank['review_index'].search(bank['reviews'][:5], k=3)
  np.testing.assert_array_equal(idx[:, 0], np.arange(5))
  assert np.all(np.diff(scores, axis=1) <= 1e-6)
  # The same embeddings the evaluator ranks: the dev recall follows.
  dev = [i for i, m in enumerate(bank['review_meta']) if m['split'] == 'dev']
  row_of = {m['album_index']: i for i, m in enumerate(bank['album_meta'])}
  top, _ = bank['album_index'].search(bank['reviews'][dev], k=10)
  hit = [row_of[bank['review_meta'][i]['album_index']] in t
         for i, t in zip(dev, top)]
  assert np.mean(hit) == pytest.approx(trained['recall@10'], abs=0.02)

  # The approximate index: written beside the banks, read back, and on a
  # bank this small it finds what exact search finds.
  config.export.index = 'hnsw'
  info = modes.run_mode('export', config, workdir, show_progress=False)
  assert info['index']['kind'] == 'hnsw'
  approx = export.load(info['directory'], ef_search=64)
  assert approx['album_index'].kind == 'hnsw'
  approx_top, _ = approx['album_index'].search(bank['reviews'][dev], k=10)
  overlap = np.mean([len(set(a) & set(b)) / 10
                     for a, b in zip(top, approx_top)])
  assert overlap > 0.95


def test_export_without_training_is_a_clear_error(tiny_corpus_master,
                                                  tmp_path):
  config = test_config.get_config()
  config.data.mard_dir = tiny_corpus_master
  with pytest.raises(UserError, match='No manifest.json'):
    modes.run_mode('export', config, str(tmp_path), show_progress=False)
  modes.run_mode('preprocess', config, str(tmp_path), show_progress=False)
  with pytest.raises(UserError, match='No checkpoint'):
    modes.run_mode('export', config, str(tmp_path), show_progress=False)
  with pytest.raises(UserError, match='No export'):
    export.load(str(tmp_path / 'nothing'))


def test_an_export_of_another_format_is_refused(tmp_path):
  (tmp_path / 'export.json').write_text(json.dumps({'format_version': 99}))
  with pytest.raises(UserError, match='format 99'):
    export.load(str(tmp_path))
