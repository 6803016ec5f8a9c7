"""The repository speaks of the software: no narration of how it was made
(who measured what, when, in which session) and no named machines outside
the benchmark records.

Machine names and dates belong in `docs/results/` (the records) and in
`docs/performance.md` (rendered from them); everywhere else a figure goes
stale the day the machine changes, and a history of how the code was
reached is no help to its reader. A default that rests on a measurement
names the benchmark that supports it and points to `docs/performance.md`.

In Python files only comments and string literals are read, so that
identifiers (`tf.compat.v1.Session`, `requests.Session()`) never count.
"""

import io
import os
import re
import tokenize

from tests.conftest import ROOT

# Narration of how the code was made, and named machines. Case-insensitive.
PATTERNS = (
    # Who did what, when.
    r'(?<!\.)\bsessions?\b(?!\s*\()',
    r'\bdesign card\b',
    r'\bthe design (?:asks|says|requires|wants)\b',
    r'\bthe issues?\b',
    r'\btargets from the issues\b',
    r'\bright after\b',
    r'\blast measured\b',
    r'\bin the last run\b',
    # ('measured on the dev split' is what an evaluation reads, not a machine.)
    r'\bmeasured on\b(?!\s+(?:the\s+)?\S+\s+(?:split|set|corpus)\b)',
    r'\b(?:was|were|we) measured\b',
    r'\bthe code before\b',
    r'\bbefore this change\b',
    # A measurement told as an event: 'took 0.4 s', 'measured 45 ms'.
    r'\b(?:took|measured)\s+(?:about\s+)?\d[\d.,\-]*\s?(?:µs|us|ms|s|seconds|minutes)\b',
    r'\b20\d\d-[01]\d-[0-3]\d\b',
    # Named machines.
    r'\bAMD\b',
    r'\bEPYC\b',
    r'\bIntel\b',
    r'\bXeon\b',
    r'\bRyzen\b',
    r'\b\d+-core\b',
    r'\b[HA]100\b',
    r'\bH200\b',
    r'\bV100\b',
)
_NARRATION = re.compile('|'.join(f'(?:{p})' for p in PATTERNS), re.IGNORECASE)

# Folders and files searched, relative to the repository root.
PY_ROOTS = ('mardjax', 'configs', 'launch.py')
TEXT_FILES = ('README.md', 'requirements.txt')
DOCS = 'docs'
# Rendered from the benchmark records, and the records themselves: the one
# place where machines and dates are named.
DOCS_EXCLUDED = ('docs/performance.md', 'docs/results')
# A markdown page may hold a table rendered from the records too (the
# README's results table names machine and date): its rows ('|' lines)
# between these two lines are not searched.
RECORDS_BEGIN = '<!-- results:begin -->'
RECORDS_END = '<!-- results:end -->'

# Hits that are the software's own vocabulary, not narration:
# (path, a regex of the line). Keep each with its reason.
ALLOWED = (
    # Synthetic reviews' wording (recording sessions), not a comment.
    ('mardjax/data/synth.py', r"the \{rare2\} sessions\."),
)


def _py_text_lines(path: str) -> dict[int, str]:
  """Line number -> line, for every line a comment or string literal
  (docstrings, messages, f-string text) touches."""
  with open(path, encoding='utf-8') as f:
    source = f.read()
  lines = source.splitlines()
  kinds = {tokenize.COMMENT, tokenize.STRING}
  kinds |= {getattr(tokenize, 'FSTRING_MIDDLE', tokenize.STRING)}
  numbers = set()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type in kinds:
      numbers.update(range(tok.start[0], tok.end[0] + 1))
  return {n: lines[n - 1] for n in sorted(numbers)}


def _plain_lines(path: str) -> dict[int, str]:
  with open(path, encoding='utf-8') as f:
    return dict(enumerate(f.read().splitlines(), 1))


def _markdown_lines(path: str) -> dict[int, str]:
  """Every line but the table rows of a block rendered from the records."""
  lines, inside = {}, False
  for number, text in _plain_lines(path).items():
    marker = text.strip()
    if marker in (RECORDS_BEGIN, RECORDS_END):
      inside = marker == RECORDS_BEGIN
    elif not (inside and marker.startswith('|')):
      lines[number] = text
  return lines


def _files(root: str):
  """(repository-relative path, reader) of every file searched."""
  found = []
  for top in PY_ROOTS:
    full = os.path.join(root, top)
    if os.path.isfile(full):
      found.append((top, _py_text_lines))
    for folder, dirs, files in os.walk(full):
      dirs.sort()
      for name in sorted(files):
        if name.endswith('.py'):
          rel = os.path.relpath(os.path.join(folder, name), root)
          found.append((rel, _py_text_lines))
  for name in TEXT_FILES:
    if os.path.isfile(os.path.join(root, name)):
      found.append((name, _markdown_lines if name.endswith('.md')
                    else _plain_lines))
  for folder, dirs, files in os.walk(os.path.join(root, DOCS)):
    dirs.sort()
    for name in sorted(files):
      rel = os.path.relpath(os.path.join(folder, name), root)
      rel = rel.replace(os.sep, '/')
      if name.endswith('.md') and not any(
          rel == x or rel.startswith(x + '/') for x in DOCS_EXCLUDED):
        found.append((rel, _markdown_lines))
  return [(rel.replace(os.sep, '/'), read) for rel, read in found]


def _allowed(rel: str, text: str) -> bool:
  return any(rel == path and re.search(line, text) for path, line in ALLOWED)


def narration(root: str = ROOT, only: tuple[str, ...] = ()) -> list[str]:
  """'path:line: text' of every line under `root` that narrates how the
  code was made or names a machine. `only`: path prefixes to keep (e.g.
  ('mardjax/',)); empty: every file searched."""
  hits = []
  for rel, read in _files(root):
    if only and not rel.startswith(only):
      continue
    for number, text in read(os.path.join(root, rel)).items():
      if _NARRATION.search(text) and not _allowed(rel, text):
        hits.append(f'{rel}:{number}: {text.strip()}')
  return hits


def test_package_has_no_narration():
  hits = narration(only=PY_ROOTS + ('requirements.txt',))
  assert not hits, 'Narration or named machines:\n' + '\n'.join(hits)


def test_readme_and_docs_have_no_narration():
  hits = narration(only=('README.md', DOCS + '/'))
  assert not hits, 'Narration or named machines:\n' + '\n'.join(hits)


def test_checker_names_path_and_line(tmp_path):
  (tmp_path / 'mardjax').mkdir()
  (tmp_path / 'mardjax' / 'mod.py').write_text(
      '"""A module."""\n'
      'import tensorflow as tf\n'
      'S = tf.compat.v1.Session()  # An identifier: not narration.\n'
      'X = 1  # 30 steps took 0.4 s on a 2-core machine.\n'
      "Y = 'reviews of the recording sessions'\n")
  (tmp_path / 'docs' / 'results').mkdir(parents=True)
  (tmp_path / 'docs' / 'training.md').write_text(
      '# Training\n\nThe step is fast.\nAs the design card says.\n')
  (tmp_path / 'docs' / 'performance.md').write_text('On one H200, 2025-01-02.\n')
  (tmp_path / 'docs' / 'results' / 'train.md').write_text('AMD EPYC\n')
  (tmp_path / 'README.md').write_text(
      'Measured on 2024-03-05.\n'
      f'{RECORDS_BEGIN}\n'
      '| benchmark | machine | date |\n'
      '| train | one H200 | 2025-01-02 |\n'
      f'{RECORDS_END}\n'
      '| after the block | one H200 |\n')
  assert narration(str(tmp_path)) == [
      'mardjax/mod.py:4: X = 1  # 30 steps took 0.4 s on a 2-core machine.',
      "mardjax/mod.py:5: Y = 'reviews of the recording sessions'",
      'README.md:1: Measured on 2024-03-05.',
      'README.md:6: | after the block | one H200 |',
      'docs/training.md:4: As the design card says.',
  ]


def test_every_pattern_finds_its_example(tmp_path):
  examples = ('as in the last session', 'the design card',
              'as the design asks', 'see the issue',
              'targets from the issues', 'timed right after', 'last measured',
              'in the last run', 'measured on this CPU', 'was measured',
              'the code before it', 'before this change',
              'the save took 0.1-0.5 s', 'on 2025-11-30',
              'an AMD chip', 'AMD EPYC 7B13', 'Intel Xeon', 'Xeon', 'Ryzen 9',
              'a 2-core machine', 'one H100', 'an A100', 'one H200',
              'a V100')
  path = tmp_path / 'README.md'
  path.write_text('\n'.join(examples) + '\n')
  hits = narration(str(tmp_path))
  assert len(hits) == len(examples), [e for e in examples if not any(
      h.endswith(': ' + e) for h in hits)]
  # Every pattern has an example of its own kind above.
  for pattern in PATTERNS:
    assert any(re.search(pattern, e, re.IGNORECASE) for e in examples), pattern


def test_software_vocabulary_is_not_narration(tmp_path):
  path = tmp_path / 'README.md'
  path.write_text('requests.Session() keeps the connection.\n'
                  'tf_session and Session(config) are code.\n'
                  'The training issues one step per dispatch.\n'
                  'Batches of 128; 30 steps; 65,566 albums; 2 cores.\n'
                  'Recall measured on the dev split; a 30-second upload.\n'
                  'The design of the step; it takes a few seconds.\n')
  assert narration(str(tmp_path)) == []
