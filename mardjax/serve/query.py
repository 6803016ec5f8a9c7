"""`--mode=query`: one question to the listening room, without the server.

A typed text (`--text`), or a recording or AcousticBrainz document
(`--file`), answered as the room's JSON API answers it with explanations
(`web.Room`), and the same answer as readable text, so that a catalogue can
be searched from a script:

  python launch.py --config configs/best.py --workdir runs/demo \
      --mode=query --text "dreamy guitars and a soft voice"
"""

import os
from typing import Any

import ml_collections

from mardjax.data import descriptors as desc_lib
from mardjax.data import files as files_lib
from mardjax.errors import UserError
from mardjax.serve import audio_analysis
from mardjax.serve import guards
from mardjax.serve import web


def _document(path: str, config: ml_collections.ConfigDict) -> Any:
  """The low-level document of a recording or an AcousticBrainz file, with
  the room's limits (size, duration)."""
  try:
    return audio_analysis.read_file(
        path, files_lib.max_bytes(config.serve.max_upload_mb),
        config.serve.max_audio_seconds)
  except ValueError as e:  # BadAudio and TooLong among them.
    raise UserError(f'--file={path!r}: {e}') from None
  except ImportError:
    raise UserError(f'--file={path!r}: {audio_analysis.ESSENTIA_MISSING}'
                    ) from None


def answer(config: ml_collections.ConfigDict, workdir: str, data_dir: str,
           mard_dir: str, text: str | None, path: str | None, k: int
           ) -> dict[str, Any]:
  """The room's explained answer to `text` or to the file at `path`."""
  if bool(text) == bool(path):
    raise UserError('--mode=query answers one question: give --text '
                    '"words" or --file a recording or AcousticBrainz '
                    'document, not both.')
  if not 1 <= k <= web.MAX_K:
    raise UserError(f'--k must be in [1, {web.MAX_K}], got {k}.')
  if text is not None:
    try:
      text = guards.check_text(text)
    except ValueError as e:
      raise UserError(f'--text: {e}') from None
    if not text.strip():
      raise UserError('--text is empty.')
  else:
    doc = _document(path, config)  # Before the model loads.
  room = web.Room(config, workdir, data_dir, mard_dir)
  try:
    if text is not None:
      out = room.text_query(text, k, explain=True)
    else:
      out = room.descriptor_query(doc, k, explain=True)
  except desc_lib.DescriptorError as e:
    raise UserError(f'--file={path!r} is not an AcousticBrainz low-level '
                    f'document: {e}') from None
  except ValueError as e:  # No word of the text is known.
    raise UserError(f'--text: {e}') from None
  return dict(out, query={'text': text} if text is not None else
              {'file': os.path.abspath(path)}, step=room.step)


def _words(why: list[dict[str, Any]] | None, top: int = 5) -> str:
  if not why:
    return ''
  return ', '.join(f'{w["word"]} {w["weight"]:+.3f}' for w in why[:top])


def _groups(why: list[dict[str, Any]] | None, top: int = 3) -> str:
  if not why:
    return ''
  return '; '.join(f'{g["group"]} {g["weight"]:+.3f}' for g in why[:top])


def describe(out: dict[str, Any]) -> str:
  """The answer as text: each result with what pulled it (weights are the
  fall in cosine similarity when that part is taken out)."""
  lines = []
  if 'text' in out['query']:
    lines.append(f'"{out["query"]["text"]}": {out["known_words"]} of '
                 f'{out["words"]} words known'
                 + (f' (not known: {", ".join(out["unknown_words"])})'
                    if out.get('unknown_words') else ''))
  else:
    lines.append(f'{out["query"]["file"]} (extractor '
                 f'{out.get("extractor") or "unknown"})')
    lines += [f'  warning: {w}' for w in out.get('warnings', [])]
    lines.append('Closest reviews:')
    for i, r in enumerate(out['reviews'], 1):
      lines.append(f'{i:3}. {r["distance"]:.3f}  {r["artist"]} — '
                   f'{r["album"]}')
      lines.append(f'       {r["excerpt"][:160]}')
      why = _words(r.get('why')) or r.get('why_unavailable', '')
      lines.append(f'       why: {why}')
  lines.append('Closest albums:')
  for i, a in enumerate(out['albums'], 1):
    lines.append(f'{i:3}. {a["distance"]:.3f}  {a["artist"]} — {a["title"]}'
                 f' ({a.get("genre") or "?"})')
    why = _groups(a.get('why_audio')) or _words(a.get('why_words'))
    if why:
      lines.append(f'       why: {why}')
  if out.get('tracks'):
    lines.append('Closest tracks of your library:')
    for i, t in enumerate(out['tracks'], 1):
      lines.append(f'{i:3}. {t["distance"]:.3f}  {t["file"]}')
      why = _groups(t.get('why_audio')) or _words(t.get('why_words'))
      if why:
        lines.append(f'       why: {why}')
  lines.append('Weights: how much the cosine similarity falls when that '
               'word or descriptor group is taken out.')
  return '\n'.join(lines)
