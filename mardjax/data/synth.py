"""A synthetic corpus in exactly the raw MARD layout (`mardjax.data.mard_io`).

MARD cannot be downloaded on every machine, so this generator writes one:

  mard_dir/
    mard_metadata.json            one album per line (MARD fields)
    mard_reviews.json             one review per line (Amazon fields)
    acousticbrainz_descriptors/   <amazonid>_<mbid>.json, first track of
                                  about 43% of albums (as in MARD: 28,403 of
                                  65,566)
    acousticbrainz_expanded/      every track, in the three expanded forms:
      lowlevel/ab/c/<mbid>-0.json   AcousticBrainz dump layout (most albums)
      bulk/bulk-<chunk>.json        bulk API responses {mbid: {"0": doc}}
      by_album/<amazonid>_<mbid>.json

How the data hang together. Every album has a latent vector z (energy,
valence, tempo, acousticness, brightness, vocals, complexity, loudness) drawn
around its genre's centre; each track perturbs it. A fixed random "physics"
maps a track's z to complete AcousticBrainz low-level documents: the real key
set, magnitudes taken from a real document (`assets/lowlevel_template.json`,
derived from AcousticBrainz document 0dad432b-16cc-4bf0-8961-fd31d124b01b,
CC0, rounded to 4 digits), with the paper's features (MFCC mean, covariance,
inverse covariance, spectral rolloff and zero-crossing-rate statistics)
computed from simulated frames so they are internally consistent. Reviews are
sentences whose descriptive words depend on the album's z (a noisy view of it)
and on its genre, mixed with what real reviews also hold: talk of shipping,
price, packaging and gifts, the artist and title, opinions, and rare words.
Reviews per album and tracks per album are heavy-tailed; review lengths are
log-normal. Retrieval is learnable (text and audio share z) but not trivial
(both views are noisy, and much of each review is unrelated to the sound).

How a catalogue reads and sounds is a `Style` (`config.data.synth_style`):
how heavy-tailed reviews and tracks per album are, how many albums hold a
single track, how closely a review's words follow the sound, and the share
of each kind of sentence (the sound, the genre, off-topic talk, opinion,
naming the album's artist, title or songs). Its defaults write the corpus
this generator has always written, byte for byte; the corpus suite
(`mardjax.experiments.suite`) varies them.

Everything is deterministic given the seed: each album draws from its own
random stream, so the output does not depend on the number of workers.
"""

import collections
import dataclasses
import functools
import json
import os
import time
from typing import Any, NamedTuple

import numpy as np
import orjson
from scipy import signal

from mardjax.data import descriptors as desc_lib
from mardjax.data import files as files_lib
from mardjax.data import mard_io
from mardjax import progress
from mardjax.errors import UserError

PRESETS = {
    'tiny': dict(num_albums=40, num_reviews=320, num_tracks=180),
    'small': dict(num_albums=2000, num_reviews=9000, num_tracks=10500),
    'full': dict(num_albums=65566, num_reviews=263525, num_tracks=343882),
}
_TEMPLATE_PATH = os.path.join(os.path.dirname(__file__), 'assets',
                              'lowlevel_template.json')
_PHYSICS_SEED = 20161  # The latent -> sound map is fixed across corpora.
_ALBUMS_PER_CHUNK = 250
# Written last: a corpus without it is incomplete (an interrupted run).
DONE_MARKER = '.synth_complete.json'
# Bumped when the same request would write another corpus.
GENERATOR_VERSION = 1
# Written first: a folder holding it is a corpus mardjax was generating.
STARTED_MARKER = '.synth_started.json'

LATENT = ('energy', 'valence', 'tempo', 'acousticness', 'brightness', 'vocals',
          'complexity', 'loudness')
# Genre centres in latent space (same order as LATENT) and genre weights.
GENRES = {
    'Pop': ((0.5, 1.0, 0.4, -0.6, 0.6, 1.2, -0.8, 0.6), 16),
    'Rock': ((1.2, 0.2, 0.5, -1.0, 0.5, 0.8, 0.0, 1.0), 18),
    'Alternative Rock': ((0.9, -0.5, 0.3, -0.7, 0.3, 0.7, 0.4, 0.7), 9),
    'Metal': ((2.0, -1.2, 1.0, -1.8, 1.2, 0.3, 0.6, 1.8), 5),
    'Jazz': ((-0.4, 0.3, 0.0, 1.2, 0.0, -0.6, 1.6, -0.6), 8),
    'Classical': ((-0.9, 0.0, -0.6, 2.0, -0.3, -1.6, 1.8, -1.2), 8),
    'Country': ((0.0, 0.6, 0.0, 0.9, 0.0, 1.0, -0.6, 0.0), 7),
    'Folk': ((-0.8, 0.0, -0.5, 1.6, -0.4, 0.9, -0.2, -0.8), 4),
    'Blues': ((0.0, -0.6, -0.4, 0.6, -0.2, 0.8, 0.2, 0.0), 4),
    'R&B': ((0.2, 0.6, -0.2, -0.5, 0.2, 1.4, 0.0, 0.4), 6),
    'Rap & Hip-Hop': ((0.8, -0.2, 0.2, -1.4, 0.4, 1.6, -0.4, 1.2), 5),
    'Dance & Electronic': ((1.4, 0.8, 1.6, -2.0, 1.0, -0.4, 0.2, 1.4), 6),
    'New Age': ((-1.6, 0.5, -1.4, 0.8, -0.8, -1.2, -0.2, -1.6), 3),
    'Latin Music': ((0.8, 1.2, 0.9, 0.4, 0.4, 1.0, 0.2, 0.4), 3),
    'Reggae': ((0.0, 1.0, -0.6, 0.0, -0.2, 1.0, -0.6, 0.2), 2),
    'Gospel': ((0.4, 1.4, 0.0, 0.4, 0.0, 1.6, -0.2, 0.2), 2),
}

# --- Words -------------------------------------------------------------------
# (low pole, high pole) descriptive words per latent dimension.
_POLES = {
    'energy': ('mellow calm gentle relaxed laid-back soothing soft quiet subdued '
               'peaceful restrained tender dreamy sleepy hushed',
               'energetic driving powerful intense explosive furious frantic '
               'fiery relentless raucous pounding punchy rousing wild fierce'),
    'valence': ('dark sad melancholy gloomy bleak haunting somber mournful '
                'bittersweet brooding moody lonely sorrowful tragic wistful',
                'happy joyful upbeat cheerful sunny uplifting bright fun '
                'playful optimistic warm feelgood celebratory bouncy carefree'),
    'tempo': ('slow unhurried languid leisurely plodding stately crawling '
              'lingering drawn-out ballad-paced',
              'fast uptempo rapid breakneck speedy brisk quick racing '
              'danceable frenetic'),
    'acousticness': ('electronic synthetic programmed synthesized digital '
                     'processed electric distorted amplified sampled',
                     'acoustic unplugged organic natural live intimate '
                     'orchestral wooden stripped-down raw'),
    'brightness': ('murky muddy warm bassy deep dull thick heavy low-end '
                   'boomy',
                   'bright crisp sparkling shimmering sharp brilliant airy '
                   'trebly clear glassy'),
    'vocals': ('instrumental wordless vocal-free',
               'vocal sung soulful lyrical harmonized crooning belting '
               'singalong anthemic'),
    'complexity': ('simple repetitive minimal straightforward catchy basic '
                   'predictable formulaic plain',
                   'complex intricate sophisticated layered virtuosic '
                   'adventurous experimental challenging elaborate '
                   'progressive'),
    'loudness': ('quiet delicate understated subtle faint whispered '
                 'low-key sparse',
                 'loud massive huge crushing booming thunderous dense '
                 'overpowering wall-of-sound compressed'),
}
_POLE_NOUNS = {
    'energy': 'songs tracks performances grooves riffs numbers',
    'valence': 'mood atmosphere feel vibe tone spirit',
    'tempo': 'tempos beats rhythms pace grooves',
    'acousticness': 'sound instrumentation arrangements textures production',
    'brightness': 'production mix sound tone recording',
    'vocals': 'vocals singing voice performances harmonies',
    'complexity': 'compositions arrangements songwriting structures melodies',
    'loudness': 'sound mix production guitars drums',
}
_INSTRUMENTS = {
    'acousticness': ('synthesizers drum machines samplers electric guitars '
                     'turntables keyboards',
                     'acoustic guitar piano violin cello upright bass banjo '
                     'mandolin strings flute harp'),
    'energy': ('brushes pads ambient textures', 'drums bass guitar horns'),
}
_GENRE_WORDS = {
    'Pop': 'pop catchy hooks radio chart mainstream',
    'Rock': 'rock guitar riffs classic anthems band',
    'Alternative Rock': 'alternative indie grunge alt-rock shoegaze',
    'Metal': 'metal heavy thrash shredding headbanging doom',
    'Jazz': 'jazz swing bebop improvisation saxophone trumpet',
    'Classical': 'classical symphony concerto orchestra sonata conductor',
    'Country': 'country twang honky-tonk nashville fiddle steel',
    'Folk': 'folk traditional ballads singer-songwriter storytelling',
    'Blues': 'blues delta slide twelve-bar soulful harmonica',
    'R&B': 'rnb soul smooth motown grooves falsetto',
    'Rap & Hip-Hop': 'rap hip-hop beats rhymes flow mc',
    'Dance & Electronic': 'dance electronic techno house club edm',
    'New Age': 'ambient meditative relaxation spa healing newage',
    'Latin Music': 'latin salsa rhythms spanish tropical bossa',
    'Reggae': 'reggae dub roots island offbeat ska',
    'Gospel': 'gospel choir praise spiritual church worship',
}
_DESCRIBE = (
    'The {adj} {noun} make this one of their best.',
    'I love how {adj} the {noun} are on this record.',
    'It is a {adj} album with {adj2} {noun}.',
    'Expect {adj} {noun} from start to finish.',
    'The {noun} here are {adj} and {adj2}.',
    'Track after track the {noun} stay {adj}.',
    'What a {adj} record, full of {adj2} {noun}.',
    'Some reviewers call it {adj}, and I agree the {noun} feel {adj2}.',
    'The {inst} sound {adj} throughout.',
    'Lots of {inst} and {adj} {noun}.',
)
_GENRE_SENT = (
    'If you like {g1} you will enjoy this.',
    'A fine example of {g1} with a touch of {g2}.',
    'Great {g1} album, the {g2} parts are the highlight.',
    'Fans of {g1} and {g2} should pick this up.',
)
_NOISE = {
    'shipping': ('It arrived quickly and the shipping was fast.',
                 'Shipping took three weeks which was annoying.',
                 'The seller shipped it promptly, no complaints.',
                 'Delivery was late but the disc was fine.'),
    'price': ('Worth every penny at this price.',
              'A bit expensive for a single disc.',
              'I got it on sale for a few dollars.',
              'Too pricey for what you get, wait for a discount.'),
    'packaging': ('The jewel case was cracked when it arrived.',
                  'Nice packaging with a booklet of lyrics and photos.',
                  'The digipak is beautiful.',
                  'The case was scratched but the cd plays fine.'),
    'gift': ('I bought this as a gift for my dad and he loves it.',
             'Got this for my wife for her birthday.',
             'A great present for any music lover.',
             'My kids gave me this for christmas.'),
}
_OPINION = {
    1: ('Very disappointing.', 'I returned it.', 'Not worth your time.',
        'Skip this one.'),
    2: ('Not their best work.', 'A few good songs but mostly filler.',
        'I expected more.'),
    3: ('It is okay.', 'Decent but not essential.', 'Some highs and lows.'),
    4: ('Really good album.', 'Highly recommended.', 'A solid release.'),
    5: ('A masterpiece!', 'Five stars, no question.', 'An absolute classic.',
        'One of my all time favorites.'),
}
_FILLER = (
    'I have been listening to this album for {n} weeks now.',
    'My favorite track is {title_word} but they are all good.',
    '{artist} have done it again.',
    'This is the {ordinal} album I bought from {artist}.',
    'I first heard them on the radio in {year}.',
    'The liner notes mention {rare} and {rare2}.',
    'I saw them live in {rare} and this brings back memories.',
    'The title track is a standout.',
    'It reminds me of {rare} and the {rare2} sessions.',
    'Recorded in {rare} with {rare2} on production.',
    'The second half is stronger than the first.',
    'Every song tells a story.',
    'I play it in the car all the time.',
    'The remastering is an improvement over the original release.',
    'Compared to {rare} this is a step forward.',
    'The lyrics about {rare} are memorable.',
    'My friends who heard it all wanted a copy.',
    'I would recommend starting with this one.',
)
_SYLLABLES = ('ka ra mo lin dor sa vel ti qua zen bro mi lu tan gor pe sha '
              'nel vi ro cas ter ol am fen dri jo ul bek sto ny').split()
_TITLE_WORDS = ('night road heart fire river dream light shadow home blue '
                'gold stone rain summer city ghost wild song time love '
                'echo storm island window mirror morning silver ocean '
                'garden machine electric paper').split()
_ORDINALS = ('first second third fourth fifth').split()
_PITCHES = ('C C# D D# E F F# G G# A A# B').split()
_STAT_LOC = ('min', 'max', 'mean', 'median', 'dmean', 'dmean2')
_STAT_VAR = ('var', 'dvar', 'dvar2')
# Split once: the review writer picks from these lists millions of times.
_POLE_LISTS = {k: (a.split(), b.split()) for k, (a, b) in _POLES.items()}
_NOUN_LISTS = {k: v.split() for k, v in _POLE_NOUNS.items()}
_INST_LISTS = {k: (a.split(), b.split()) for k, (a, b) in _INSTRUMENTS.items()}
_GENRE_LISTS = {k: v.split() for k, v in _GENRE_WORDS.items()}
_NOISE_LISTS = list(_NOISE.values())


@dataclasses.dataclass(frozen=True)
class SynthSizes:
  num_albums: int
  num_reviews: int
  num_tracks: int


@dataclasses.dataclass(frozen=True)
class Style:
  """How a synthetic catalogue reads and sounds; the defaults are the
  generator's original corpus.

  Attributes:
    review_tail: sigma of the log-normal weights that spread the reviews
      over albums (larger: more albums with one review, a few with many).
    track_tail: the same for tracks.
    single_track: fraction of albums given exactly one track (as MARD's
      original release has), drawn apart from the other draws.
    impression_noise: sd of each reviewer's impression around the album's
      latent traits, which the describing words follow (larger: a weaker
      link between sound and words).
    trait, genre, offtopic, opinion: shares of a review's sentences that
      describe the sound, name a genre, talk of shipping, price, packaging
      or gifts, or give an opinion.
    naming: share of sentences that name the album's artist, title or one
      of its songs; the rest are filler. Below 0: naming sentences are
      among the filler as the original corpus has them (3 of 18 filler
      sentences).
  """
  review_tail: float = 1.3
  track_tail: float = 0.6
  single_track: float = 0.0
  impression_noise: float = 0.6
  trait: float = 0.45
  genre: float = 0.10
  offtopic: float = 0.13
  opinion: float = 0.10
  naming: float = -1.0

  def check(self) -> None:
    """Raises ValueError naming the first field out of range."""
    shares = (self.trait, self.genre, self.offtopic, self.opinion,
              max(self.naming, 0.0))
    for name in ('review_tail', 'track_tail', 'impression_noise'):
      if not 0 <= getattr(self, name) < 10:
        raise ValueError(f'{name}={getattr(self, name)} must be in [0, 10).')
    if not 0 <= self.single_track <= 1:
      raise ValueError(f'single_track={self.single_track} must be in [0, 1].')
    if min(shares) < 0 or sum(shares) > 1 + 1e-9:
      raise ValueError('the sentence shares (trait, genre, offtopic, opinion, '
                       f'naming) {shares} must be >= 0 and sum to at most 1.')

  def bounds(self) -> tuple[float, ...]:
    """The running sums of the sentence shares, rounded so that the
    defaults give the original corpus's bounds exactly."""
    shares = [self.trait, self.genre, self.offtopic, self.opinion]
    if self.naming >= 0:
      shares.append(self.naming)
    return tuple(round(float(x), 12) for x in np.cumsum(shares))


def style_from_config(data_config) -> Style:
  """`config.data.synth_style` as a `Style` (unknown fields are refused by
  the config itself); raises ValueError for a value out of range."""
  style = Style(**{k: float(v) for k, v in
                   data_config.get('synth_style', {}).items()})
  style.check()
  return style


def sizes_from_config(data_config) -> SynthSizes:
  """Preset sizes with the config's non-zero overrides applied."""
  preset = data_config.synth_preset
  if preset not in PRESETS:
    raise ValueError(f'Unknown synth_preset {preset!r}; choose from '
                     f'{sorted(PRESETS)}.')
  sizes = dict(PRESETS[preset])
  for key in sizes:
    override = data_config.get(f'synth_{key}', 0)
    if override:
      sizes[key] = int(override)
  s = SynthSizes(**sizes)
  if s.num_albums < 1 or s.num_reviews < s.num_albums or (
      s.num_tracks < s.num_albums):
    raise ValueError(f'Synthetic sizes need albums >= 1 and at least one '
                     f'review and one track per album, got {s}.')
  return s


# --- The fixed physics: latent -> descriptors ---------------------------------


def _is_stats(node: Any) -> bool:
  return isinstance(node, dict) and set(node) == set(desc_lib.STATS)


# Generated from the latent vector by dedicated code, not the generic scaling.
_SPECIAL = {'lowlevel.mfcc', 'lowlevel.gfcc', 'lowlevel.spectral_rolloff',
            'lowlevel.zerocrossingrate', 'rhythm.bpm', 'rhythm.beats_count',
            'rhythm.beats_position', 'tonal.key_key', 'tonal.key_scale',
            'tonal.chords_key', 'tonal.chords_scale', 'tonal.chords_histogram',
            'tonal.tuning_frequency', 'tonal.key_strength'}


class _Physics:
  """Fixed random maps from a track's latent vector to a low-level document.

  Values without dedicated code follow the template scaled by a positive
  factor exp(a . z + noise), one factor per value (per element of a vector):
  the location statistics (min, max, mean, median, dmean, dmean2) scale by f
  and the variances by f^2, so the order min <= median <= max and the sign of
  every value survive.
  """

  def __init__(self):
    with open(_TEMPLATE_PATH, 'rb') as f:
      self.template = orjson.loads(f.read())
    rng = np.random.default_rng(_PHYSICS_SEED)
    d = len(LATENT)
    # layout: (section, key, stat or None, scalar?, slice into the flat vector)
    self.layout = []
    bases, groups, powers = [], [], []
    n_groups = 0
    for section in ('lowlevel', 'rhythm', 'tonal'):
      for key, node in self.template[section].items():
        if f'{section}.{key}' in _SPECIAL or isinstance(node, (str, bool)):
          continue
        if _is_stats(node):
          size = np.asarray(node['mean']).size
          items = [(st, node[st], 2 if st in _STAT_VAR else 1)
                   for st in desc_lib.STATS]
        elif isinstance(node, (int, float, list)):
          size = np.asarray(node).size
          items = [(None, node, 1)]
        else:
          continue  # Nested dicts (gfcc) have dedicated code.
        for stat, value, power in items:
          base = np.asarray(value, np.float64).ravel()
          lo = sum(b.size for b in bases)
          self.layout.append((section, key, stat, np.ndim(value) == 0,
                              slice(lo, lo + base.size)))
          bases.append(base)
          groups.append(np.arange(n_groups, n_groups + size))
          powers.append(np.full(size, power))
        n_groups += size
    self.base = np.concatenate(bases)
    self.group = np.concatenate(groups)
    self.power = np.concatenate(powers)
    self.generic_load = rng.normal(0, 0.18, (n_groups, d))
    tmpl = self.template['lowlevel']
    self.mfcc_mean = np.asarray(tmpl['mfcc']['mean'], np.float64)
    cov = np.asarray(tmpl['mfcc']['cov'], np.float64)
    self.mfcc_chol = np.linalg.cholesky(cov + 1e-6 * np.eye(13))
    self.gfcc = {k: np.asarray(v, np.float64) for k, v in tmpl['gfcc'].items()}
    scale = np.array([60.0] + [12.0] * 12)
    self.mfcc_mean_load = rng.normal(0, 1.0, (13, d)) * scale[:, None] / 2
    self.mfcc_scale_load = rng.normal(0, 0.12, (13, d))
    self.rolloff_load = rng.normal(0, 0.12, d)
    self.rolloff_load[LATENT.index('brightness')] = 0.45
    self.zcr_load = rng.normal(0, 0.12, d)
    self.zcr_load[LATENT.index('brightness')] = 0.35
    self.zcr_load[LATENT.index('acousticness')] = -0.25

  def documents(self, z: np.ndarray, rng: np.random.Generator,
                tags: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Complete low-level documents for one album's tracks.

    Args:
      z: (num_tracks, len(LATENT)) track latents.
      rng: the album's random stream.
      tags: per-track `metadata.tags` dicts.
    """
    n = z.shape[0]
    log_f = z @ self.generic_load.T + rng.normal(
        0, 0.05, (n, self.generic_load.shape[0]))
    values = np.ascontiguousarray(
        self.base * np.exp(log_f[:, self.group] * self.power), np.float32)
    special = self._special(z, rng)
    lengths = np.exp(rng.normal(5.4, 0.35, n))  # ~220 s tracks.
    docs = []
    for t in range(n):
      row, row_list = values[t], values[t].tolist()
      doc = {'lowlevel': {}, 'rhythm': {}, 'tonal': {}}
      for section, key, stat, scalar, sl in self.layout:
        value = row_list[sl.start] if scalar else row[sl]
        if stat is None:
          doc[section][key] = value
        else:
          doc[section].setdefault(key, {})[stat] = value
      for section, key, value in special[t]:
        doc[section][key] = value
      self._rhythm(doc, z[t], rng, float(lengths[t]))
      props = dict(self.template['metadata']['audio_properties'])
      props.update(length=round(float(lengths[t]), 3),
                   replay_gain=round(float(-9.0 - 2.5 * z[t, 7] +
                                           rng.normal(0, 1)), 3),
                   md5_encoded=rng.bytes(16).hex())
      doc['metadata'] = {'audio_properties': props, 'tags': tags[t],
                         'version': dict(self.template['metadata']['version'])}
      docs.append(doc)
    return docs

  def _special(self, z, rng) -> list[list[tuple[str, str, Any]]]:
    """The paper's features and tonal keys for all tracks of an album at once.

    Returns:
      per track, (section, key, value) triples to set in its document.
    """
    n = z.shape[0]
    # MFCC: simulated frames so that cov is a real covariance, icov its inverse.
    mean = self.mfcc_mean + z @ self.mfcc_mean_load.T  # (n, 13)
    chol = self.mfcc_chol * np.exp(z @ self.mfcc_scale_load.T)[:, :, None]
    frames = mean[:, None, :] + np.einsum('nfk,njk->nfj',
                                          rng.normal(0, 1, (n, 64, 13)), chol)
    centred = frames - frames.mean(1, keepdims=True)
    cov = np.einsum('nfi,nfj->nij', centred, centred) / 63
    icov = np.linalg.inv(cov)
    mfcc_mean = frames.mean(1)
    # Rolloff (Hz) and zero-crossing rate: smooth log-normal frame series.
    rolloff = _frame_stats(np.exp(_ar1(rng, n, 256, np.log(650.0) +
                                       z @ self.rolloff_load, 0.9)))
    zcr = _frame_stats(np.exp(_ar1(rng, n, 256, np.log(0.03) +
                                   z @ self.zcr_load, 0.6)))
    g = np.exp(0.15 * z[:, 0] + rng.normal(0, 0.05, n))
    keys = rng.integers(0, 12, n)
    major = z[:, 1] + rng.normal(0, 0.7, n) > 0
    strength = rng.uniform(0.4, 0.9, n)
    tuning = 440 + rng.normal(0, 1.5, n)
    chords = rng.dirichlet(np.full(24, 0.4), n) * 100
    out = []
    for t in range(n):
      key, scale = _PITCHES[keys[t]], 'major' if major[t] else 'minor'
      out.append([
          ('lowlevel', 'mfcc', {'mean': _num(mfcc_mean[t]),
                                'cov': _num(cov[t]), 'icov': _num(icov[t])}),
          ('lowlevel', 'gfcc', {'mean': _num(self.gfcc['mean'] * g[t]),
                                'cov': _num(self.gfcc['cov'] * g[t]**2),
                                'icov': _num(self.gfcc['icov'] / g[t]**2)}),
          ('lowlevel', 'spectral_rolloff', {k: v[t] for k, v in rolloff.items()}),
          ('lowlevel', 'zerocrossingrate', {k: v[t] for k, v in zcr.items()}),
          ('tonal', 'key_key', key), ('tonal', 'key_scale', scale),
          ('tonal', 'chords_key', key), ('tonal', 'chords_scale', scale),
          ('tonal', 'key_strength', round(float(strength[t]), 4)),
          ('tonal', 'tuning_frequency', round(float(tuning[t]), 3)),
          ('tonal', 'chords_histogram', _num(chords[t])),
      ])
    return out

  def _rhythm(self, doc, z, rng, length):
    bpm = float(np.clip(112 + 24 * z[2] + rng.normal(0, 6), 50, 210))
    beats = np.cumsum(rng.normal(60 / bpm, 0.01 * 60 / bpm,
                                 int(length * bpm / 60)))
    beats = beats[beats < length]
    doc['rhythm'].update(bpm=round(bpm, 3), beats_count=int(beats.size),
                         beats_position=_num(beats))


def _ar1(rng, n, steps, mean, sigma, rho=0.9):
  """(n, steps) AR(1) series around per-series means (n,), stationary sd."""
  eps = rng.normal(0, sigma * np.sqrt(1 - rho**2), (n, steps))
  eps[:, 0] = rng.normal(0, sigma, n)
  return mean[:, None] + signal.lfilter([1.0], [1.0, -rho], eps, axis=1)


def _frame_stats(frames: np.ndarray) -> dict[str, list[float]]:
  """Essentia's nine statistics of (n, frames) series, per series."""
  d1 = np.abs(np.diff(frames, axis=1))
  d2 = np.abs(np.diff(frames, 2, axis=1))
  stats = {'min': frames.min(1), 'max': frames.max(1), 'mean': frames.mean(1),
           'median': np.median(frames, 1), 'var': frames.var(1),
           'dmean': d1.mean(1), 'dmean2': d2.mean(1), 'dvar': d1.var(1),
           'dvar2': d2.var(1)}
  return {k: v.astype(np.float32).tolist() for k, v in stats.items()}


def _num(x):
  """float32 array or Python float: orjson writes float32 in ~9 digits."""
  x = np.asarray(x)
  if x.ndim == 0:
    return float(np.float32(x))
  return x.astype(np.float32)


# --- Albums and reviews ---------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _physics() -> _Physics:
  return _Physics()


@functools.lru_cache(maxsize=1)
def _rare_words() -> tuple[list[str], np.ndarray]:
  """A Zipfian lexicon of pseudo-words (names, places): a realistic long tail.

  Returns:
    (words, cumulative weights).
  """
  rng = np.random.default_rng(_PHYSICS_SEED + 1)
  syl = np.array(_SYLLABLES)
  n = 250000
  parts = syl[rng.integers(0, len(syl), (n, 4))].tolist()
  lengths = rng.integers(2, 5, n).tolist()  # 2 to 4 syllables.
  words = sorted({''.join(p[:k]) for p, k in zip(parts, lengths)})
  order = rng.permutation(len(words))
  words = [words[i] for i in order]
  return words, np.cumsum(1.0 / np.arange(1, len(words) + 1))


def _uuid(rng) -> str:
  h = rng.bytes(16).hex()
  return f'{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:32]}'


def _code(rng, first: str, n: int) -> str:
  chars = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'
  return first + ''.join(chars[i] for i in rng.integers(0, 36, n))


def _name(rng, words=2) -> str:
  return ' '.join(''.join(rng.choice(_SYLLABLES, rng.integers(2, 4))).title()
                  for _ in range(words))


def _pick(rng, seq):
  return seq[int(rng.integers(len(seq)))]


class _Draws:
  """Uniforms drawn in blocks: one generator call per review, not per word."""

  def __init__(self, rng: np.random.Generator, block: int = 256):
    self._rng, self._block = rng, block
    self._u, self._i = rng.random(block), 0

  def unit(self) -> float:
    if self._i == self._block:
      self._u, self._i = self._rng.random(self._block), 0
    self._i += 1
    return self._u[self._i - 1]

  def pick(self, seq):
    return seq[int(self.unit() * len(seq))]

  def weighted(self, cdf: np.ndarray) -> int:
    return min(int(np.searchsorted(cdf, self.unit() * cdf[-1])), len(cdf) - 1)


def _review_text(draws: _Draws, album: dict, z: np.ndarray,
                 rating: int, n_sent: int,
                 bounds: tuple[float, ...] = Style().bounds()) -> str:
  """One review: noisy descriptions of the album's latent traits + the rest.

  Args:
    draws: the album's uniforms.
    album: the metadata record.
    z: (len(LATENT),) this reviewer's impression of the album's latent vector.
    rating: 1..5.
    n_sent: number of sentences.
    bounds: `Style.bounds()`: where each kind of sentence ends on [0, 1).
  """
  rare, rare_cdf = _rare_words()
  salience = np.cumsum(np.abs(z) + 0.2)
  title_words = album['title'].split()
  acoustic = int(z[LATENT.index('acousticness')] > 0)
  sentences = []
  for _ in range(n_sent):
    r = draws.unit()
    if r < bounds[0]:  # Describe a salient trait.
      k = draws.weighted(salience)
      dim = LATENT[k]
      pole = int(z[k] + 0.8 * (draws.unit() - 0.5) > 0)
      words = _POLE_LISTS[dim][pole]
      inst = (_INST_LISTS[dim][pole] if dim in _INST_LISTS else
              _INST_LISTS['acousticness'][acoustic])
      sentences.append(draws.pick(_DESCRIBE).format(
          adj=draws.pick(words), adj2=draws.pick(words),
          noun=draws.pick(_NOUN_LISTS[dim]), inst=draws.pick(inst)))
    elif r < bounds[1]:
      genre = (album['root-genre'] if draws.unit() < 0.85 else
               draws.pick(list(GENRES)))
      gw = _GENRE_LISTS[genre]
      sentences.append(draws.pick(_GENRE_SENT).format(
          g1=draws.pick(gw), g2=draws.pick(gw)))
    elif r < bounds[2]:
      sentences.append(draws.pick(draws.pick(_NOISE_LISTS)))
    elif r < bounds[3]:
      sentences.append(draws.pick(_OPINION[rating]))
    elif len(bounds) > 4 and r < bounds[4]:
      sentences.append(_naming_sentence(draws, album))
    else:
      sentences.append(draws.pick(
          _FILLER if len(bounds) == 4 else _PLAIN_FILLER).format(
          n=2 + int(draws.unit() * 18), title_word=draws.pick(title_words),
          artist=album['artist'], ordinal=draws.pick(_ORDINALS),
          year=1970 + int(draws.unit() * 45),
          rare=rare[draws.weighted(rare_cdf)].title(),
          rare2=rare[draws.weighted(rare_cdf)]))
  return ' '.join(sentences)


# Filler that names nothing of the album (`Style.naming` >= 0 draws the
# naming sentences apart).
_PLAIN_FILLER = tuple(f for f in _FILLER
                      if '{artist}' not in f and '{title_word}' not in f)
_NAMING = (
    '{artist} have done it again.',
    'This is the {ordinal} album I bought from {artist}.',
    'My favorite track is {title_word} but they are all good.',
    '{title} is the best thing {artist} ever released.',
    'The song {song} alone is worth the price.',
    'I keep coming back to {song} and {song2}.',
)


def _naming_sentence(draws: _Draws, album: dict) -> str:
  """A sentence naming the album's artist, a title word, or its songs."""
  songs = [s['title'] for s in album.get('songs', [])] or [album['title']]
  return draws.pick(_NAMING).format(
      artist=album['artist'], ordinal=draws.pick(_ORDINALS),
      title_word=draws.pick(album['title'].split()), title=album['title'],
      song=draws.pick(songs), song2=draws.pick(songs))


def _ids_for_albums(seed: int, start: int, count: int):
  """Per-album random streams: independent of chunking and worker count."""
  return [np.random.default_rng([seed, start + i]) for i in range(count)]


class _Chunk(NamedTuple):
  """One worker's share of the corpus: albums start .. start + len(genres)."""
  seed: int
  start: int
  genres: np.ndarray  # (n,) genre index of each album.
  n_reviews: np.ndarray  # (n,) reviews of each album.
  n_tracks: np.ndarray  # (n,) tracks of each album.
  out_dir: str
  chunk_id: int
  reviewer_pool: np.ndarray  # Reviewer ids to draw from.
  style: Style = Style()


class _Files(NamedTuple):
  """Where a chunk's descriptor documents go, and what it wrote."""
  out_dir: str
  bulk: dict  # mbid -> {'0': doc}, written as one bulk file per chunk.
  made_dirs: set
  counts: collections.Counter


def _album(rng, genre: str) -> tuple[dict[str, Any], np.ndarray]:
  """(MARD metadata record with its songs, latent traits (len(LATENT),))."""
  z_album = np.asarray(GENRES[genre][0]) + rng.normal(0, 0.7, len(LATENT))
  amazon_id = _code(rng, 'B', 9)
  artist = _name(rng, int(rng.integers(1, 3)))
  title = ' '.join(_pick(rng, _TITLE_WORDS).title()
                   for _ in range(int(rng.integers(1, 4))))
  year = int(rng.integers(1960, 2015))
  return {'amazon-id': amazon_id, 'artist': artist, 'title': title,
          'root-genre': genre, 'first-release-year': year}, z_album


def _songs(rng, album: dict[str, Any], num_tracks: int) -> None:
  """Adds the songs and the remaining metadata fields to `album`."""
  genre = album['root-genre']
  album['songs'] = [{'title': ' '.join(_pick(rng, _TITLE_WORDS).title()
                                       for _ in range(int(rng.integers(1, 4)))),
                     'mbid': _uuid(rng)} for _ in range(num_tracks)]
  album['categories'] = [['CDs & Vinyl', genre],
                         ['CDs & Vinyl', genre, _pick(
                             rng, _GENRE_LISTS[genre]).title()]]
  album['release-group-mbid'] = _uuid(rng)
  album['artist-mbid'] = _uuid(rng)
  album['label'] = _name(rng, 1) + ' Records'


def _metadata_line(album: dict[str, Any]) -> bytes:
  # MARD's field order.
  keys = ('amazon-id', 'artist', 'title', 'root-genre', 'categories',
          'first-release-year', 'release-group-mbid', 'artist-mbid', 'label',
          'songs')
  return orjson.dumps({k: album[k] for k in keys})


def _track_latents(rng, z_album: np.ndarray, num_tracks: int) -> np.ndarray:
  """(num_tracks, len(LATENT)): each track's traits, around its album's."""
  return z_album + rng.normal(0, 0.35, (num_tracks, len(LATENT)))


def _track_documents(rng, physics, album: dict[str, Any],
                     z_album: np.ndarray, files: _Files) -> None:
  """Each song's AcousticBrainz document, in one of the expanded set's forms
  (dump file, bulk response, amazonid_mbid file) and sometimes MARD's
  original first-track file."""
  songs, nt = album['songs'], len(album['songs'])
  z_tracks = _track_latents(rng, z_album, nt)
  album_mbid = _uuid(rng)
  tags = [{'album': [album['title']], 'artist': [album['artist']],
           'albumartist': [album['artist']],
           'title': [s['title']], 'date': [str(album['first-release-year'])],
           'musicbrainz_recordingid': [s['mbid']],
           'musicbrainz_albumid': [album_mbid],
           'musicbrainz_releasegroupid': [album['release-group-mbid']],
           'tracknumber': [f'{k + 1}/{nt}'],
           'file_name': f'{k + 1:02d} {s["title"]}.mp3'}
          for k, s in enumerate(songs)]
  docs = physics.documents(z_tracks, rng, tags)
  form = rng.random()
  expanded = os.path.join(files.out_dir, mard_io.EXPANDED_DESCRIPTOR_DIR)
  for k, (song, doc) in enumerate(zip(songs, docs)):
    data = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    mbid = song['mbid']
    if form < 0.8:
      sub = os.path.join(expanded, 'lowlevel', mbid[:2], mbid[2])
      if sub not in files.made_dirs:
        os.makedirs(sub, exist_ok=True)
        files.made_dirs.add(sub)
      _write(os.path.join(sub, f'{mbid}-0.json'), data)
    elif form < 0.9:
      files.bulk[mbid] = {'0': doc}
    else:
      _write(os.path.join(expanded, 'by_album',
                          f'{album["amazon-id"]}_{mbid}.json'), data)
    files.counts['tracks'] += 1
    if k == 0 and rng.random() < 0.433:  # MARD's original first-track file.
      _write(os.path.join(files.out_dir, mard_io.ORIGINAL_DESCRIPTOR_DIR,
                          f'{album["amazon-id"]}_{mbid}.json'), data)
      files.counts['original_descriptor_files'] += 1


def _reviews(rng, album: dict[str, Any], z_album: np.ndarray,
             num_reviews: int, reviewer_pool: np.ndarray,
             style: Style = Style()) -> list[bytes]:
  """The album's review lines: distinct reviewers, ratings around a hidden
  quality, texts from each reviewer's noisy impression of the album."""
  reviewers = rng.choice(reviewer_pool, size=num_reviews, replace=False)
  nr = len(reviewers)
  quality = rng.normal(0, 1)
  ratings = np.clip(np.round(4.2 + 0.6 * quality + rng.normal(0, 1, nr)),
                    1, 5).astype(int).tolist()
  times = rng.integers(946684800, 1404172800, nr).tolist()  # 2000..2014.
  impressions = z_album + rng.normal(0, style.impression_noise,
                                     (nr, len(LATENT)))
  # Log-normal sentence counts: median ~11 sentences (~90 words); about 2%
  # of reviews run past 400 words, as long Amazon reviews do.
  n_sents = np.maximum(1, np.round(np.exp(rng.normal(2.4, 0.7, nr)))
                       ).astype(int).tolist()
  helpful = rng.poisson(2, nr).tolist()
  draws = _Draws(rng)
  lines = []
  for j, reviewer in enumerate(reviewers.tolist()):
    tm = time.gmtime(times[j])
    lines.append(orjson.dumps({
        'amazon-id': album['amazon-id'],
        'reviewerID': f'A{reviewer:013d}',
        'reviewerName': draws.pick(_SYLLABLES).title() + draws.pick(
            _SYLLABLES),
        'helpful': [int(draws.unit() * (helpful[j] + 1)), helpful[j]],
        'reviewText': _review_text(draws, album, impressions[j],
                                   ratings[j], n_sents[j], style.bounds()),
        'overall': float(ratings[j]),
        'summary': draws.pick(_OPINION[ratings[j]]),
        'unixReviewTime': times[j],
        'reviewTime': f'{tm.tm_mon:02d} {tm.tm_mday}, {tm.tm_year}',
    }))
  return lines


def _generate_chunk(job: _Chunk) -> tuple[bytes, bytes, collections.Counter]:
  """Writes one chunk's descriptor files; returns its metadata/review lines."""
  physics = _physics()
  meta_lines, review_lines = [], []
  files = _Files(job.out_dir, {}, set(), collections.Counter())
  genre_names = list(GENRES)
  for i, rng in enumerate(_ids_for_albums(job.seed, job.start,
                                          len(job.genres))):
    album, z_album = _album(rng, genre_names[job.genres[i]])
    _songs(rng, album, int(job.n_tracks[i]))
    meta_lines.append(_metadata_line(album))
    _track_documents(rng, physics, album, z_album, files)
    lines = _reviews(rng, album, z_album, int(job.n_reviews[i]),
                     job.reviewer_pool, job.style)
    review_lines.extend(lines)
    files.counts['albums'] += 1
    files.counts['reviews'] += len(lines)
  if files.bulk:
    _write(os.path.join(job.out_dir, mard_io.EXPANDED_DESCRIPTOR_DIR, 'bulk',
                        f'bulk-{job.chunk_id:05d}.json'),
           orjson.dumps(files.bulk, option=orjson.OPT_SERIALIZE_NUMPY))
    files.counts['bulk_files'] += 1
  return (b'\n'.join(meta_lines) + b'\n', b'\n'.join(review_lines) + b'\n',
          files.counts)


def _write(path: str, data: bytes) -> None:
  with open(path, 'wb') as f:
    f.write(data)


def _heavy_tailed_counts(rng, n_items: int, total: int, sigma: float):
  """`total` split over items, at least one each, log-normal weights."""
  weights = np.exp(rng.normal(0, sigma, n_items))
  return 1 + rng.multinomial(total - n_items, weights / weights.sum())


def _plan(sizes: SynthSizes, seed: int, style: Style
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(genre index, reviews, tracks) of each album, (num_albums,) each."""
  rng = np.random.default_rng([seed, 2**31 - 1])
  names = list(GENRES)
  weights = np.array([GENRES[g][1] for g in names], np.float64)
  genres = rng.choice(len(names), size=sizes.num_albums, p=weights / weights.sum())
  n_reviews = _heavy_tailed_counts(rng, sizes.num_albums, sizes.num_reviews,
                                   style.review_tail)
  n_tracks = _heavy_tailed_counts(rng, sizes.num_albums, sizes.num_tracks,
                                  style.track_tail)
  if style.single_track > 0:  # Its own stream: the other draws stay put.
    single = np.random.default_rng([seed, 2**31 - 2]).random(
        sizes.num_albums) < style.single_track
    n_tracks[single] = 1
  return genres, n_reviews, n_tracks


class Traits(NamedTuple):
  """A generated corpus's hidden album traits, replayed.

  Attributes:
    amazon_ids: (num_albums,) each album's id, in generation order.
    tracks: (num_albums, len(LATENT)) the mean of each album's tracks'
      traits (what its descriptors carry).
    genres: (num_albums,) index in `GENRES` of each album's genre.
    num_tracks: (num_albums,) its tracks.
    style: the corpus's `Style`.
  """
  amazon_ids: list[str]
  tracks: np.ndarray
  genres: np.ndarray
  num_tracks: np.ndarray
  style: Style


def replay_traits(mard_dir: str) -> Traits:
  """The hidden traits of the corpus `generate` wrote into `mard_dir`,
  drawn again from its request (the same streams, no file written).

  Raises:
    UserError: `mard_dir` holds no complete corpus of this generator.
  """
  marker = os.path.join(mard_dir, DONE_MARKER)
  try:
    with open(marker) as f:
      request = json.load(f)['request']
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f'{mard_dir}: not a complete synthetic corpus ({marker}: '
                    f'{e}); its traits are known only for corpora this '
                    'generator wrote.') from e
  if request.get('generator_version') != GENERATOR_VERSION:
    raise UserError(f'{marker}: generator version '
                    f'{request.get("generator_version")!r}, this one is '
                    f'{GENERATOR_VERSION}.')
  sizes, seed = SynthSizes(**request['sizes']), request['seed']
  style = Style(**request.get('style', {}))
  genres, _, n_tracks = _plan(sizes, seed, style)
  names = list(GENRES)
  ids, tracks = [], np.zeros((sizes.num_albums, len(LATENT)))
  for i, rng in enumerate(_ids_for_albums(seed, 0, sizes.num_albums)):
    album, z_album = _album(rng, names[genres[i]])
    _songs(rng, album, int(n_tracks[i]))
    ids.append(album['amazon-id'])
    tracks[i] = _track_latents(rng, z_album, int(n_tracks[i])).mean(0)
  return Traits(ids, tracks, genres, n_tracks, style)


def trait_words() -> dict[str, tuple[list[str], list[str]]]:
  """{trait: (its low pole's words, its high pole's)}, as reviews use them."""
  return {k: (list(lo), list(hi)) for k, (lo, hi) in _POLE_LISTS.items()}


def genre_words() -> dict[str, list[str]]:
  """{genre: the words its genre sentences draw from}."""
  return {k: list(v) for k, v in _GENRE_LISTS.items()}


def generate(out_dir: str, sizes: SynthSizes, seed: int = 0,
             num_workers: int = 1, show_progress: bool = True,
             style: Style = Style()) -> dict[str, Any]:
  """Writes a synthetic MARD corpus of `style` into `out_dir`.

  Idempotent: when `out_dir` already holds a complete corpus of the same
  sizes and seed, nothing is rewritten. The corpus is written into a hidden
  folder beside `out_dir` and swapped in when complete, so `out_dir` holds a
  whole corpus or none; what an interrupted run left is removed.

  Raises:
    UserError: the disk refused a write (full, read-only); nothing is left.

  Returns:
    A summary: counts, paths, seconds.
  """
  start_time = time.time()
  marker = os.path.join(out_dir, DONE_MARKER)
  wanted = {'sizes': dataclasses.asdict(sizes), 'seed': seed,
            'generator_version': GENERATOR_VERSION}
  if style != Style():  # The original corpus's request stays as it was.
    wanted['style'] = dataclasses.asdict(style)
  if os.path.exists(marker):
    with open(marker) as f:
      done = json.load(f)
    if done.get('request') == wanted:
      return dict(done['summary'], reused=True, seconds=0.0)
  # Written beside `out_dir` and swapped in whole: an interrupted run or a
  # full disk leaves a hidden `.<name>.tmp-*` folder, cleared by the next
  # run, never a half corpus where a MARD directory is expected.
  with files_lib.whole_folder(out_dir) as tmp:
    summary = _generate_into(tmp, sizes, seed, num_workers, show_progress,
                             wanted, style)
    summary['mard_dir'] = out_dir
    with open(os.path.join(tmp, DONE_MARKER), 'w') as f:
      json.dump({'request': wanted, 'summary': summary}, f)
    os.remove(os.path.join(tmp, STARTED_MARKER))
  return dict(summary, reused=False, seconds=round(time.time() - start_time, 2))


def _generate_into(out_dir: str, sizes: SynthSizes, seed: int,
                   num_workers: int, show_progress: bool,
                   wanted: dict[str, Any], style: Style) -> dict[str, Any]:
  """Writes the corpus into the fresh folder `out_dir`; returns its summary."""
  with open(os.path.join(out_dir, STARTED_MARKER), 'w') as f:
    json.dump({'request': wanted}, f)  # First: the folder is ours.
  for sub in (mard_io.ORIGINAL_DESCRIPTOR_DIR,
              os.path.join(mard_io.EXPANDED_DESCRIPTOR_DIR, 'bulk'),
              os.path.join(mard_io.EXPANDED_DESCRIPTOR_DIR, 'by_album'),
              os.path.join(mard_io.EXPANDED_DESCRIPTOR_DIR, 'lowlevel')):
    os.makedirs(os.path.join(out_dir, sub), exist_ok=True)

  genres, n_reviews, n_tracks = _plan(sizes, seed, style)
  reviewer_pool = max(sizes.num_reviews // 3, int(n_reviews.max()) * 2)
  jobs = []
  for chunk_id, lo in enumerate(range(0, sizes.num_albums, _ALBUMS_PER_CHUNK)):
    hi = min(lo + _ALBUMS_PER_CHUNK, sizes.num_albums)
    jobs.append(_Chunk(seed, lo, genres[lo:hi], n_reviews[lo:hi],
                       n_tracks[lo:hi], out_dir, chunk_id, reviewer_pool,
                       style))

  totals = collections.Counter()
  meta_path = os.path.join(out_dir, mard_io.METADATA_FILE)
  reviews_path = os.path.join(out_dir, mard_io.REVIEWS_FILE)
  bar = progress.bar(total=sizes.num_albums, desc='synth albums', unit='album',
                     enabled=show_progress)
  with open(meta_path, 'wb') as meta, open(reviews_path, 'wb') as reviews:
    with progress.pool_map(num_workers) as pmap:
      for meta_bytes, review_bytes, counts in pmap(_generate_chunk, jobs):
        meta.write(meta_bytes)
        reviews.write(review_bytes)
        totals.update(counts)
        bar.update(counts['albums'])
  bar.close()
  summary = {
      'mard_dir': out_dir,
      'albums': totals['albums'],
      'reviews': totals['reviews'],
      'tracks': totals['tracks'],
      'original_descriptor_files': totals['original_descriptor_files'],
      'bulk_files': totals['bulk_files'],
      'max_reviews_per_album': int(n_reviews.max()),
      'max_tracks_per_album': int(n_tracks.max()),
      'seed': seed,
  }
  return summary
