// The listening room page: uploads with progress, text search, results.
// Everything the server sends is inserted as text, never as HTML.
'use strict';

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  Object.entries(attrs || {}).forEach(([k, v]) => {
    if (k === 'class') node.className = v; else node.setAttribute(k, v);
  });
  children.forEach((c) => node.append(c));
  return node;
}

// FastAPI errors: {"detail": "text"} or {"detail": [{"msg": ...}, ...]}.
function errorText(status, body) {
  const detail = body && body.detail;
  if (typeof detail === 'string') return detail;
  if (Array.isArray(detail)) return detail.map((d) => d.msg).join('; ');
  return `the server answered ${status}`;
}

function showError(message) {
  $('error').textContent = message;
  $('error').hidden = !message;
}

function showWarnings(warnings) {
  const list = $('warnings');
  list.replaceChildren(...warnings.map((w) => el('li', {}, w)));
  list.hidden = warnings.length === 0;
}

function distance(d) {
  return el('span', {class: 'distance', title: 'distance (0 to 2)'},
            d.toFixed(3));
}

// One line under each result list says what the weights mean.
const WHY_NOTE = 'Why: how much the similarity falls when a word (or a ' +
    'group of descriptors) is taken out; positive pulled the match closer.';

function weightList(why, cls) {
  return el('ul', {class: cls}, ...why.map((w) => el(
      'li', {class: w.weight > 0 ? 'pull' : 'push'},
      w.word, el('small', {}, ` ${w.weight > 0 ? '+' : ''}${w.weight.toFixed(3)}`))));
}

// Descriptor groups as horizontal bars, scaled to the largest weight.
function groupChart(groups) {
  const most = Math.max(1e-9, ...groups.map((g) => Math.abs(g.weight)));
  return el('table', {class: 'why-audio'}, ...groups.map((g) => {
    const bar = el('div', {class: `bar-value ${g.weight > 0 ? 'pull' : 'push'}`});
    bar.style.width = `${Math.round(100 * Math.abs(g.weight) / most)}%`;
    const values = g.values.map((v) => `${v.name} ${Number(v.value)
        .toPrecision(3)} (${v.sd > 0 ? '+' : ''}${v.sd.toFixed(1)} sd)`).join(', ');
    return el('tr', {title: values}, el('td', {}, g.group),
              el('td', {class: 'bar-cell'}, bar),
              el('td', {}, `${g.weight > 0 ? '+' : ''}${g.weight.toFixed(3)}`));
  }));
}

function albumItem(a) {
  const who = el('span', {class: 'who'}, el('b', {}, a.artist || '?'),
                 ' — ', a.title || '(untitled)');
  if (a.genre) who.append(el('span', {class: 'genre'}, a.genre));
  const item = el('li', {class: 'album'}, who, distance(a.distance));
  if (a.why_audio) item.append(groupChart(a.why_audio));
  if (a.why_words && a.why_words.length) {
    item.append(weightList(a.why_words, 'why-words'));
  }
  return item;
}

// The excerpt with the words that pulled the match marked; the text goes
// in as text nodes, the marks as <mark> elements.
function excerpt(r) {
  const p = el('p', {class: 'excerpt'});
  const text = r.excerpt || '(no text)';
  let at = 0;
  for (const [a, b] of r.highlights || []) {
    if (a < at) continue;
    p.append(text.slice(at, a), el('mark', {}, text.slice(a, b)));
    at = b;
  }
  p.append(text.slice(at));
  return p;
}

function reviewItem(r) {
  const who = el('span', {class: 'who'}, 'on ', el('b', {}, r.album || '?'),
                 ' by ', r.artist || '?');
  if (r.genre) who.append(el('span', {class: 'genre'}, r.genre));
  const item = el('li', {class: 'review'}, who, distance(r.distance),
                  excerpt(r));
  if (r.why && r.why.length) item.append(weightList(r.why, 'why-words'));
  else if (r.why_unavailable) {
    item.append(el('p', {class: 'muted'}, `No word weights: ${r.why_unavailable}`));
  }
  return item;
}

function showDescriptors(descriptors, extractor) {
  const names = Object.keys(descriptors);
  $('descriptor-count').textContent = names.length;
  $('extractor').textContent = extractor || 'unknown';
  $('descriptors').tBodies[0].replaceChildren(...names.map((n) => el(
      'tr', {}, el('td', {}, n),
      el('td', {}, Number(descriptors[n]).toPrecision(5)))));
  filterDescriptors();
}

function filterDescriptors() {
  const q = $('descriptor-filter').value.trim().toLowerCase();
  for (const row of $('descriptors').tBodies[0].rows) {
    row.hidden = q !== '' && !row.cells[0].textContent.includes(q);
  }
}

function setProgress(fraction, message, busy) {
  $('progress').hidden = false;
  $('progress').classList.toggle('busy', !!busy);
  $('progress-fill').style.width = `${Math.round(100 * fraction)}%`;
  $('upload-status').textContent = message;
}

function upload(event) {
  event.preventDefault();
  const file = $('file-input').files[0];
  if (!file) return;
  showError('');
  showWarnings([]);
  $('audio-results').hidden = true;
  $('upload-button').disabled = true;
  const started = performance.now();
  const isAudio = !/\.json$/i.test(file.name);
  let timer = null;
  const done = () => { clearInterval(timer); $('upload-button').disabled = false; };

  const xhr = new XMLHttpRequest();
  xhr.open('POST', `/api/query/audio?k=${$('k-select').value}&explain=true`);
  xhr.responseType = 'json';
  xhr.upload.onprogress = (e) => {
    if (e.lengthComputable) {
      setProgress(e.loaded / e.total,
                  `Uploading ${file.name}: ${Math.round(100 * e.loaded / e.total)}%`);
    }
  };
  xhr.upload.onload = () => {
    // The bytes are there; the server now computes the descriptors.
    const what = isAudio ? 'Computing audio features with Essentia'
                         : 'Reading the AcousticBrainz document';
    const tick = () => setProgress(1, `${what}… ${((performance.now() - started)
                                   / 1000).toFixed(1)} s`, true);
    tick();
    timer = setInterval(tick, 100);
  };
  xhr.onload = () => {
    done();
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const body = xhr.response;
    if (xhr.status !== 200 || !body) {
      setProgress(0, `Failed after ${seconds} s`);
      showError(`${file.name}: ${errorText(xhr.status, body)}`);
      return;
    }
    setProgress(1, `Done: ${file.name} in ${seconds} s` + (
        body.explain_ms !== undefined ? ` (explanations ${body.explain_ms} ms)` : ''));
    showWarnings(body.warnings || []);
    $('reviews').replaceChildren(...body.reviews.map(reviewItem));
    $('albums').replaceChildren(...body.albums.map(albumItem));
    $('audio-why-note').textContent = WHY_NOTE;
    showDescriptors(body.descriptors || {}, body.extractor);
    $('audio-results').hidden = false;
  };
  xhr.onerror = () => {
    done();
    setProgress(0, 'Failed');
    showError('The server could not be reached. Is --mode=serve still running?');
  };
  const form = new FormData();
  form.append('file', file, file.name);
  setProgress(0, `Uploading ${file.name}…`);
  xhr.send(form);
}

async function searchText(event) {
  event.preventDefault();
  const text = $('text-input').value;
  if (!text.trim()) return;
  showError('');
  $('text-button').disabled = true;
  $('text-status').textContent = 'Searching…';
  try {
    const r = await fetch('/api/query/text', {
      method: 'POST', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({text, k: Number($('k-select').value),
                            explain: true})});
    const body = await r.json().catch(() => null);
    if (!r.ok) {
      $('text-status').textContent = '';
      showError(errorText(r.status, body));
      return;
    }
    $('text-status').textContent =
        `${body.known_words} of ${body.words} words known to the model` + (
            body.unknown_words && body.unknown_words.length
                ? ` (not known: ${body.unknown_words.join(', ')})` : '');
    $('text-albums').replaceChildren(...body.albums.map(albumItem));
    $('text-why-note').textContent = WHY_NOTE;
    $('text-results').hidden = false;
  } catch (e) {
    $('text-status').textContent = '';
    showError('The server could not be reached. Is --mode=serve still running?');
  } finally {
    $('text-button').disabled = false;
  }
}

function chooseFile() {
  const file = $('file-input').files[0];
  $('file-label').textContent = file ? `${file.name} (${(file.size / 1e6)
      .toFixed(2)} MB)` : 'Choose a file or drop it here';
  $('upload-button').disabled = !file;
}

async function loadStatus() {
  try {
    const r = await fetch('/healthz');
    const h = await r.json();
    $('model-status').textContent = `Model at step ${h.step} · ` +
        `${h.albums.toLocaleString()} albums · ` +
        `${h.reviews.toLocaleString()} reviews · ${h.index} search` +
        // 503 'degraded': the analysis workers cannot run; documents and
        // text searches still can.
        (h.status === 'ok' ? '' : ' · recordings cannot be analysed now ' +
         '(AcousticBrainz documents and text search still work)');
  } catch (e) {
    $('model-status').textContent = 'The server is not answering.';
  }
}

document.addEventListener('DOMContentLoaded', () => {
  $('upload-form').addEventListener('submit', upload);
  $('text-form').addEventListener('submit', searchText);
  $('file-input').addEventListener('change', chooseFile);
  $('descriptor-filter').addEventListener('input', filterDescriptors);
  $('text-input').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey) searchText(e);
  });
  const zone = $('drop-zone');
  zone.addEventListener('dragover', (e) => {
    e.preventDefault(); zone.classList.add('over');
  });
  zone.addEventListener('dragleave', () => zone.classList.remove('over'));
  zone.addEventListener('drop', (e) => {
    e.preventDefault(); zone.classList.remove('over');
    if (e.dataTransfer.files.length) {
      $('file-input').files = e.dataTransfer.files;
      chooseFile();
    }
  });
  chooseFile();
  loadStatus();
});
