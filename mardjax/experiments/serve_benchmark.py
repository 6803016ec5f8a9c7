"""`--mode=benchmark --config.benchmark.kind=serve`: the listening room's
speed over real HTTP.

Starts the server of `--mode=serve` on the workdir's trained model in a
process of its own (as a user runs it), then from this process, as a client:

  * uploads a synthesised 30-second recording (wav and mp3) and times each
    answer end to end: upload, decoding, Essentia's MusicExtractor, the
    embedding and the search (target: under 2 s);
  * sends text queries one at a time and times each (target: p50 under
    50 ms);
  * both of those without and with explanations (`explain=true`: targets,
    an explained text query's p50 under 50 ms and an explained upload
    under 10% slower end to end);
  * uploads `benchmark.serve_concurrent_uploads` recordings at once, for
    `benchmark.serve_rounds` rounds, while one client sends health checks
    and text queries: their p95 while the server analyses (target: under
    50 ms) and the server's memory, analysis workers included, after each
    round (it should stay flat);
  * runs a load generator, `benchmark.serve_concurrency` clients sending
    text queries back to back for `benchmark.serve_seconds`, and counts the
    answers per second. Client and server share the machine's cores.
"""

import asyncio
import json
import multiprocessing
import os
import socket
import tempfile
import time
from typing import Any

import numpy as np

from mardjax.errors import UserError
from mardjax.experiments import measuring
from mardjax.serve import export
from mardjax.train import checkpoints

UPLOAD_TARGET_S = 2.0
TEXT_P50_TARGET_MS = 50.0
# Explanations may add this fraction to an upload's end-to-end time; an
# explained text query keeps the text target.
EXPLAIN_UPLOAD_GROWTH = 0.10
# Health checks and text queries while recordings are analysed.
RESPONSIVE_P95_TARGET_MS = 50.0


def _serve_child(config, workdir: str, data_dir: str, mard_dir: str,
                 port: int) -> None:
  """The server process: `--mode=serve` without the per-request log."""
  import uvicorn  # pylint: disable=g-import-not-at-top
  from mardjax.serve import web  # pylint: disable=g-import-not-at-top
  room = web.Room(config, workdir, data_dir, mard_dir)
  room.explainer.warm_up()  # As serve_room does, in the background there.
  app = web.app_for(room, config)
  uvicorn.run(app, host='127.0.0.1', port=port, log_level='warning',
              access_log=False)


def synth_song(path: str, seconds: float, fmt: str, seed: int = 0) -> None:
  """A 44.1 kHz song-like signal: chords, a kick and hats; saved by Essentia."""
  import essentia.standard as es  # pylint: disable=g-import-not-at-top
  sr = 44100
  rng = np.random.default_rng(seed)
  t = np.arange(int(sr * seconds)) / sr
  x = np.zeros_like(t)
  roots = [220.0, 174.6, 261.6, 196.0]  # A, F, C, G: two seconds each.
  chord = np.array(roots)[(t // 2).astype(int) % 4]
  for ratio in (1.0, 1.26, 1.5, 2.0):
    for harmonic in (1, 2, 3):
      x += 0.05 / harmonic * np.sin(2 * np.pi * chord * ratio * harmonic * t)
  beat = t % 0.5  # 120 bpm.
  x += 0.5 * np.sin(2 * np.pi * 55 * beat) * np.exp(-beat * 18)
  hat = (t + 0.25) % 0.5
  x += 0.08 * rng.normal(size=t.shape) * np.exp(-hat * 60)
  x = 0.8 * x / np.abs(x).max()
  es.MonoWriter(filename=path, format=fmt, sampleRate=sr)(x.astype(np.float32))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _percentiles(seconds: list[float]) -> dict[str, float]:
  ms = np.asarray(seconds) * 1000
  return {'p50_ms': round(float(np.percentile(ms, 50)), 2),
          'p95_ms': round(float(np.percentile(ms, 95)), 2),
          'max_ms': round(float(ms.max()), 2)}


async def _load(url: str, texts: list[str], clients: int, seconds: float
                ) -> dict[str, Any]:
  """`clients` concurrent clients sending text queries until time is up."""
  import httpx  # pylint: disable=g-import-not-at-top
  done, errors, latencies = 0, 0, []
  deadline = time.perf_counter() + seconds
  limits = httpx.Limits(max_connections=clients)
  async with httpx.AsyncClient(base_url=url, limits=limits,
                               timeout=30) as client:

    async def worker(offset: int) -> None:
      nonlocal done, errors
      i = offset
      while time.perf_counter() < deadline:
        start = time.perf_counter()
        r = await client.post('/api/query/text',
                              json={'text': texts[i % len(texts)], 'k': 10})
        latencies.append(time.perf_counter() - start)
        i += clients
        if r.status_code == 200:
          done += 1
        else:
          errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in range(clients)))
    wall = time.perf_counter() - start
  return dict({'requests_per_s': round(done / wall, 1), 'requests': done,
               'errors': errors, 'clients': clients,
               'seconds': round(wall, 1)}, **_percentiles(latencies))


async def _under_uploads(url: str, data: bytes, texts: list[str],
                         uploads: int, rounds: int, server_pid: int
                         ) -> dict[str, Any]:
  """`rounds` rounds of `uploads` concurrent uploads of one recording, while
  one client sends health checks and text queries back to back: their
  latency while the server analyses, and the server's memory after each
  round."""
  import httpx  # pylint: disable=g-import-not-at-top
  import psutil  # pylint: disable=g-import-not-at-top
  health, text, round_s, rss = [], [], [], []
  async with httpx.AsyncClient(base_url=url, timeout=600) as client:

    async def upload():
      r = await client.post('/api/query/audio',
                            files={'file': ('song.wav', data)})
      if r.status_code != 200:
        raise UserError(f'upload answered {r.status_code}: {r.text}')

    for _ in range(rounds):
      start = time.perf_counter()
      pending = asyncio.gather(*(upload() for _ in range(uploads)))
      i = 0
      while not pending.done():
        t0 = time.perf_counter()
        await client.get('/healthz')
        health.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await client.post('/api/query/text',
                          json={'text': texts[i % len(texts)], 'k': 10})
        text.append(time.perf_counter() - t0)
        i += 1
      await pending
      round_s.append(round(time.perf_counter() - start, 2))
      rss.append(round(measuring.tree_rss(psutil.Process(server_pid)) /
                       2**20, 1))
  return {'concurrent_uploads': uploads, 'rounds': rounds,
          'round_s': round_s, 'healthz': _percentiles(health),
          'text_query': _percentiles(text), 'server_rss_mb': rss}


def _wait_until_up(url: str, server) -> tuple[dict[str, Any], float]:
  """(/healthz's answer, seconds until it came) of a starting server."""
  import httpx  # pylint: disable=g-import-not-at-top
  start = time.time()
  while True:
    if not server.is_alive():
      raise UserError('the server stopped while loading (its error is '
                      'above).')
    try:
      return httpx.get(f'{url}/healthz', timeout=2).json(), (
          time.time() - start)
    except httpx.HTTPError:
      if time.time() - start > 600:
        raise UserError('the server did not answer within 600 s') from None
      time.sleep(0.5)


def _one_at_a_time(url: str, b, texts: list[str], tmp: str
                   ) -> dict[str, Any]:
  """Upload latency of a synthesised song (wav, mp3) and text-query
  latency, one request at a time, each without and with explanations (the
  two alternate, so that both see the same machine)."""
  import httpx  # pylint: disable=g-import-not-at-top
  result = {}
  with httpx.Client(base_url=url, timeout=120) as client:

    def timed(send, **kw) -> tuple[float, dict[str, Any]]:
      t0 = time.perf_counter()
      r = send(**kw)
      if r.status_code != 200:
        raise UserError(f'{r.request.url.path} answered {r.status_code}: '
                        f'{r.text}')
      return time.perf_counter() - t0, r.json()

    for fmt in ('wav', 'mp3'):
      path = os.path.join(tmp, f'song.{fmt}')
      synth_song(path, b.serve_upload_seconds, fmt)
      with open(path, 'rb') as f:
        data = f.read()
      times, added, explain_ms = {False: [], True: []}, [], []
      for i in range(b.serve_uploads + 1):  # The first ones warm up.
        pair = {}
        for explain in (False, True):
          pair[explain], body = timed(
              client.post, url=f'/api/query/audio?explain={explain}',
              files={'file': (f'song.{fmt}', data)})
          if i:
            times[explain].append(pair[explain])
            if explain:
              explain_ms.append(body['explain_ms'])
        if i:
          added.append(pair[True] - pair[False])
      mb = round(len(data) / 2**20, 2)
      result[f'upload_{fmt}'] = dict(_percentiles(times[False]), mb=mb)
      result[f'upload_{fmt}_explained'] = dict(
          _percentiles(times[True]), mb=mb,
          # Each explained upload follows a plain one: the median of
          # the pairs' differences, less noisy than a difference of p50s
          # (the analysis itself varies by more than explaining costs).
          added_ms=round(1000 * float(np.median(added)), 1),
          server_explain_ms=round(float(np.median(explain_ms)), 1))
    times = {False: [], True: []}
    for i, text in enumerate(texts[:b.serve_text_queries + 5]):
      for explain in (False, True):
        t, _ = timed(client.post, url='/api/query/text',
                     json={'text': text, 'k': 10, 'explain': explain})
        if i >= 5:  # Warm-up.
          times[explain].append(t)
    result['text_query'] = _percentiles(times[False])
    result['text_query_explained'] = _percentiles(times[True])
  return result


def benchmark_room(config, workdir: str, data_dir: str, mard_dir: str
                   ) -> dict[str, Any]:
  """Starts the listening room's server on the run in `workdir`, measures
  it, stops it; returns the figures."""
  b = config.benchmark
  checkpoints.require_checkpoints(workdir,
                                  checkpoints.inference_source(workdir))
  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  # Spawned: a fresh interpreter, as `launch.py --mode=serve` would be. Not
  # a daemon: the server starts its own analysis processes.
  server = multiprocessing.get_context('spawn').Process(
      target=_serve_child, args=(config, workdir, data_dir, mard_dir, port))
  server.start()
  try:
    health, startup_s = _wait_until_up(url, server)
    with open(os.path.join(workdir, export.EXPORT_DIR, 'reviews.jsonl')) as f:
      texts = [' '.join((json.loads(line)['text'] or 'good album').split()[
          :20]) for line, _ in zip(f, range(500))]
    result = {'server_startup_s': round(startup_s, 1),
              'albums': health['albums'], 'reviews': health['reviews'],
              'index': health['index']}
    with tempfile.TemporaryDirectory(prefix='mardjax-bench-') as tmp:
      result.update(_one_at_a_time(url, b, texts, tmp))
      if b.serve_rounds:
        path = os.path.join(tmp, 'short.wav')
        synth_song(path, b.serve_round_upload_seconds, 'wav', seed=1)
        with open(path, 'rb') as f:
          data = f.read()
        result['during_uploads'] = asyncio.run(_under_uploads(
            url, data, texts, b.serve_concurrent_uploads, b.serve_rounds,
            server.pid))
    result['load'] = asyncio.run(_load(url, texts, b.serve_concurrency,
                                       b.serve_seconds))
  finally:
    server.terminate()  # uvicorn shuts down, and with it the analysis pool.
    server.join(10)
    if server.is_alive():
      server.kill()
  upload_s = max(result[f'upload_{f}']['p50_ms'] for f in ('wav', 'mp3')
                 ) / 1000
  # What explanations add to an upload's answer, end to end.
  explain_growth = max(
      result[f'upload_{f}_explained']['added_ms'] /
      result[f'upload_{f}']['p50_ms'] for f in ('wav', 'mp3'))
  return dict(result, benchmark='serve',
              upload_seconds_of_audio=b.serve_upload_seconds,
              meets_upload_target=upload_s < UPLOAD_TARGET_S,
              meets_text_target=result['text_query']['p50_ms'] <
              TEXT_P50_TARGET_MS,
              explained_upload_growth=round(explain_growth, 3),
              meets_explain_targets=(
                  explain_growth < EXPLAIN_UPLOAD_GROWTH and
                  result['text_query_explained']['p50_ms'] <
                  TEXT_P50_TARGET_MS),
              meets_responsive_target=(
                  'during_uploads' not in result or max(
                      result['during_uploads'][k]['p95_ms']
                      for k in ('healthz', 'text_query')) <
                  RESPONSIVE_P95_TARGET_MS),
              target_upload_s=UPLOAD_TARGET_S,
              target_text_p50_ms=TEXT_P50_TARGET_MS)
