"""The listening room's page in a real headless browser (Debian's chromium,
driven by selenium through Debian's chromedriver).

Skipped when chromium is not installed, except where MARDJAX_REQUIRE_BROWSER
is set (.ci/run sets it after installing chromium, so CI never skips it).
"""

import contextlib
import os
import shutil
import socket
import threading
import time

import pytest

from mardjax.serve import web
from tests.conftest import write_tone

CHROMIUM = shutil.which('chromium') or '/usr/bin/chromium'
CHROMEDRIVER = shutil.which('chromedriver') or '/usr/bin/chromedriver'
# Chromium on a machine with no network: no background connections, no
# sandbox (CI runs as root), a fresh profile per run.
_FLAGS = ('--headless=new', '--no-sandbox', '--disable-gpu',
          '--disable-dev-shm-usage', '--disable-quic', '--no-first-run',
          '--disable-background-networking', '--disable-component-update',
          '--disable-sync', '--window-size=1280,1600')


@pytest.fixture(scope='module')
def browser(tmp_path_factory):
  if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    message = ('chromium and chromedriver are not installed (apt-get install '
               'chromium chromium-driver)')
    if os.environ.get('MARDJAX_REQUIRE_BROWSER'):
      pytest.fail(message)
    pytest.skip(message)
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome import service  # pylint: disable=g-import-not-at-top
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in _FLAGS:
    options.add_argument(flag)
  options.add_argument(
      f'--user-data-dir={tmp_path_factory.mktemp("chromium-profile")}')
  driver = webdriver.Chrome(service=service.Service(CHROMEDRIVER),
                            options=options)
  yield driver
  driver.quit()


@contextlib.contextmanager
def _serving(app):
  """Runs `app` with uvicorn on a free loopback port; yields its URL."""
  import uvicorn  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=port,
                                         log_level='warning'))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.time() + 30
  while not server.started:
    if time.time() > deadline or not thread.is_alive():
      raise RuntimeError('uvicorn did not start')
    time.sleep(0.05)
  try:
    yield f'http://127.0.0.1:{port}'
  finally:
    server.should_exit = True
    thread.join(10)


def _wait(driver, condition, seconds=60):
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  return WebDriverWait(driver, seconds, poll_frequency=0.05).until(condition)


# Records every text the upload status shows, so the test can check that
# progress was displayed while the server worked.
_RECORD_STATUS = '''
window.statuses = [];
new MutationObserver(() => window.statuses.push(
    document.getElementById('upload-status').textContent)).observe(
    document.getElementById('upload-status'),
    {childList: true, characterData: true, subtree: true});
'''


@pytest.mark.slow
def test_upload_a_song_and_search_by_text_in_the_page(browser, trained_room,
                                                      tmp_path):
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  room = trained_room[2]
  app = web.create_app(room, max_upload_bytes=5_000_000)
  song = tmp_path / 'my song.wav'
  write_tone(song, 4.0, 'wav', freq=330.0)
  bad = tmp_path / 'broken.ogg'
  bad.write_bytes(b'OggS but nothing else')
  find = browser.find_element
  with _serving(app) as url:
    browser.get(url)
    _wait(browser, lambda d: 'step' in find(By.ID, 'model-status').text)
    assert f'{room.bank["reviews"].shape[0]} reviews' in find(
        By.ID, 'model-status').text.replace(',', '')

    # Upload a recording through the file input and read the results.
    browser.execute_script(_RECORD_STATUS)
    find(By.ID, 'file-input').send_keys(str(song))
    assert 'my song.wav' in find(By.ID, 'file-label').text
    find(By.ID, 'upload-button').click()
    _wait(browser, lambda d: find(By.ID, 'upload-status').text.startswith(
        'Done'))
    reviews = browser.find_elements(By.CSS_SELECTOR, '#reviews > li')
    albums = browser.find_elements(By.CSS_SELECTOR, '#albums > li')
    assert len(reviews) == 10 and len(albums) == 10
    excerpt = reviews[0].find_element(By.CLASS_NAME, 'excerpt').text
    assert excerpt and excerpt != '(no text)'
    distances = [float(r.find_element(By.CLASS_NAME, 'distance').text)
                 for r in reviews]
    assert distances == sorted(distances) and 0 <= distances[0] <= 2
    # The page shows what the API answers for the same file, explained.
    expected = room.descriptor_query(
        web.audio_analysis.analyse_bytes(song.read_bytes(), '.wav'), 10,
        explain=True)
    assert excerpt == expected['reviews'][0]['excerpt'].strip()
    # The words that pulled each review are marked in its excerpt, and
    # each album has a bar per descriptor group.
    for review, want in zip(reviews, expected['reviews']):
      marks = [m.text for m in review.find_elements(By.TAG_NAME, 'mark')]
      assert marks == [want['excerpt'][a:b] for a, b in want['highlights']]
    assert sum(len(r['highlights']) for r in expected['reviews']) > 0
    for album in albums:
      assert len(album.find_elements(By.CSS_SELECTOR, '.why-audio tr')) == 4
      assert album.find_elements(By.CSS_SELECTOR, '.bar-value')[
          0].value_of_css_property('width') != '0px'
    assert 'similarity falls' in find(By.ID, 'audio-why-note').text
    assert find(By.ID, 'descriptor-count').text == '369'
    statuses = browser.execute_script('return window.statuses')
    assert any(s.startswith('Computing audio features') for s in statuses), (
        statuses)
    assert not find(By.ID, 'error').is_displayed()
    browser.save_screenshot(str(tmp_path / 'upload.png'))

    # A file that is not audio: the server's reason, shown on the page.
    find(By.ID, 'file-input').send_keys(str(bad))
    find(By.ID, 'upload-button').click()
    _wait(browser, lambda d: find(By.ID, 'error').is_displayed())
    assert 'not a readable recording' in find(By.ID, 'error').text
    assert not find(By.ID, 'audio-results').is_displayed()

    # Text search.
    find(By.ID, 'text-input').send_keys('great guitar album')
    find(By.ID, 'text-button').click()
    _wait(browser, lambda d: len(d.find_elements(
        By.CSS_SELECTOR, '#text-albums > li')) == 10)
    assert 'words known' in find(By.ID, 'text-status').text
    first = browser.find_elements(By.CSS_SELECTOR, '#text-albums > li')[0].text
    top = room.text_query('great guitar album', 1, explain=True)['albums'][0]
    assert top['artist'] in first and top['title'] in first
    chips = browser.find_elements(By.CSS_SELECTOR,
                                  '#text-albums li .why-words li')
    assert chips and chips[0].text.split()[0] == top['why_words'][0]['word']

