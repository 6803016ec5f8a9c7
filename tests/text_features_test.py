"""Pretrained text features: a tiny local BERT, through preprocessing and
training with text_encoder='pretrained'."""

import os
import shutil

import numpy as np
import pytest

from configs import test as test_config
from mardjax import stages
from mardjax.data import manifest as manifest_lib
from mardjax.evaluation import evaluate
from mardjax.data import input_pipeline
from mardjax.data import preprocess
from mardjax.serve import web
from mardjax.data import text_features
from mardjax.errors import UserError


@pytest.fixture(scope='module')
def tiny_bert(tmp_path_factory):
  """A randomly initialised 1-layer BERT saved as save_pretrained writes it."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  out = str(tmp_path_factory.mktemp('tiny_bert'))
  words = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'great', 'album',
           'the', 'music', 'songs', 'guitar', 'voice', 'love', 'cd', '.', ',']
  transformers.BertTokenizerFast(
      vocab={w: i for i, w in enumerate(words)}).save_pretrained(out)
  torch.manual_seed(0)
  transformers.BertModel(transformers.BertConfig(
      vocab_size=len(words), hidden_size=12, num_hidden_layers=1,
      num_attention_heads=2, intermediate_size=24,
      max_position_embeddings=64)).save_pretrained(out)
  return out


@pytest.mark.slow
def test_encoder_mean_pools_the_last_layer(tiny_bert):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  enc = text_features.FrozenEncoder(tiny_bert, max_tokens=16, batch_size=2)
  texts = ['great album', 'the guitar and the voice , love it .', 'cd']
  got = enc.encode(texts)
  assert got.shape == (3, 12) and got.dtype == np.float32
  # One text at a time (no padding) gives the same vectors.
  tok = transformers.AutoTokenizer.from_pretrained(tiny_bert)
  model = transformers.AutoModel.from_pretrained(tiny_bert).eval()
  for text, row in zip(texts, got):
    with torch.no_grad():
      hidden = model(**tok([text], return_tensors='pt')).last_hidden_state
    np.testing.assert_allclose(row, hidden[0].mean(0).numpy(), rtol=1e-4,
                               atol=1e-5)
  assert enc.info['dim'] == 12 and len(enc.info['sha256']) == 64


def test_a_directory_without_a_model_is_a_clear_error(tmp_path):
  with pytest.raises(UserError, match='not a model directory'):
    text_features.FrozenEncoder(str(tmp_path), max_tokens=8)
  with pytest.raises(UserError, match='does not exist'):
    text_features.encoder_fingerprint(str(tmp_path / 'nope'))


@pytest.mark.slow
def test_pretrained_features_preprocess_and_train(tiny_bert,
                                                  tiny_corpus_master,
                                                  tmp_path):
  config = test_config.get_config()
  config.data.text_encoder_path = tiny_bert
  config.data.text_encoder_max_tokens = 32
  data_dir = str(tmp_path / 'data')
  preprocess.preprocess_corpus(config, tiny_corpus_master, data_dir,
                               show_progress=False)
  manifest = manifest_lib.load(data_dir)
  assert manifest.feature_dim == 12
  dev = input_pipeline.load_reviews(manifest, 'dev', 64)
  assert dev['text_features'].shape == (len(dev['album']), 12)
  assert np.all(np.isfinite(dev['text_features']))
  assert np.std(dev['text_features'][:, 0]) > 0  # Not one vector for all.
  config.model.text_encoder = 'pretrained'
  config.train.num_steps = 10
  config.train.eval_every = 10
  state, metrics = stages.train_and_evaluate(config, str(tmp_path / 'run'),
                                             data_dir)
  assert int(state.step) == 10 and 0 <= metrics['recall@10'] <= 1
  assert 'text_features' not in state.params  # No embedding table.
  again = evaluate.evaluate_checkpoint(config, str(tmp_path / 'run'), data_dir)
  np.testing.assert_allclose(again['recall@10'], metrics['recall@10'])
  # The listening room runs the same frozen encoder on a typed text: a
  # review's own text lands on the vector exported for that review.
  room = web.Room(config, str(tmp_path / 'run'), data_dir,
                    tiny_corpus_master)
  meta = room.bank['review_meta'][0]
  emb, _, _ = room.embedder.embed_text(meta['text'])
  np.testing.assert_allclose(emb[0], room.bank['reviews'][0], atol=1e-4)
  assert len(room.text_query('a quiet record', 3)['albums']) == 3
  # Word weights are not defined for an encoder of word pieces in context:
  # said so, with the rest of the answer.
  out = room.text_query('a quiet record', 3, explain=True)
  assert [a['why_words'] for a in out['albums']] == [None] * 3
  why = room.explainer.review_words(meta['text'], 0, emb[0], 300)
  assert why['why'] is None and 'pretrained' in why['why_unavailable']
  assert why['excerpt']
  other = tmp_path / 'other_bert'
  shutil.copytree(tiny_bert, other)
  with open(other / 'config.json', 'a') as f:
    f.write('\n')
  config.data.text_encoder_path = str(other)
  with pytest.raises(UserError, match='not the one the records were built'):
    web.Room(config, str(tmp_path / 'run'), data_dir, tiny_corpus_master)
  config.data.text_encoder_path = tiny_bert
  # Another encoder (or none) is another data version.
  os.utime(os.path.join(tiny_bert, 'config.json'))
  config.data.text_encoder_path = ''
  assert preprocess.preprocess_corpus(
      config, tiny_corpus_master, data_dir,
      show_progress=False)['reused'] is False
  assert manifest_lib.load(data_dir).feature_dim == 0


def test_pretrained_without_features_is_a_clear_error(tiny_records, tmp_path):
  data_dir, _ = tiny_records
  config = test_config.get_config()
  config.model.text_encoder = 'pretrained'
  with pytest.raises(UserError, match='text_encoder_path'):
    stages.train_and_evaluate(config, str(tmp_path), data_dir)
