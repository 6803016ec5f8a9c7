"""What stands between the network and the listening room's routes.

* `SameOrigin`: ASGI middleware refusing requests that change or cost
  something (POST) when a browser says they come from another site, and,
  when the server knows its own names, any request whose `Host` header is
  not one of them. A page on any site a user visits can otherwise post to a
  room on `localhost` (a multipart form is a "simple" request a browser sends
  without asking), and a DNS name rebound to 127.0.0.1 reaches it as if it
  were the site.
* `install_error_handlers`: every refusal is JSON `{"detail": "..."}` with a
  finite, serialisable detail; a request body holding `NaN`, `Infinity` or a
  number too large for a float gets a 422 that names the field without
  echoing the value (which JSON cannot carry), and an unexpected exception a
  500 that names no server path.
"""

import json
import logging
import math
from typing import Any, Iterable
from urllib import parse

LOOPBACK_NAMES = ('localhost', '127.0.0.1', '::1')
# Methods a page must not be able to send from another site.
_GUARDED_METHODS = frozenset({'POST', 'PUT', 'PATCH', 'DELETE'})


def host_names(bound_host: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
  """The names a server bound to `bound_host` answers to, or () for any.

  A server bound to a loopback address is reached by its loopback names
  only; one bound to every interface ('0.0.0.0', '::') or to a LAN address
  is reached by names it cannot know, so its Host is checked only against
  `extra` when given.

  Args:
    bound_host: the address given to the server (--host).
    extra: further names (serve.allowed_hosts).
  """
  extra = tuple(h.strip().lower() for h in extra if h.strip())
  host = bound_host.strip('[]').lower()
  if host in LOOPBACK_NAMES or host.startswith('127.'):
    return tuple(dict.fromkeys((host,) + LOOPBACK_NAMES + extra))
  if extra:
    return tuple(dict.fromkeys((host,) + extra))
  return ()


def _split_host(value: str) -> str:
  """'name:port' or '[v6]:port' -> the lower-case name without brackets."""
  value = value.strip().lower()
  if value.startswith('['):
    return value[1:].split(']', 1)[0]
  return value.rsplit(':', 1)[0] if value.count(':') == 1 else value


class SameOrigin:
  """ASGI middleware: refuses cross-site POSTs (403) and unknown Hosts (421).

  A POST is cross-site when its `Origin` header (sent by browsers with every
  cross-origin request and every POST) names another host and port than its
  `Host` header, is the opaque origin 'null' (sandboxed frames, files), or
  when `Sec-Fetch-Site` says 'cross-site'. Clients that are not browsers
  (curl, scripts) send no Origin and are served.

  Args:
    app: the ASGI app inside.
    hosts: the names the server answers to (`host_names`); () checks no
      Host, only that a POST's Origin matches it.
    origins: further origins allowed to POST ('scheme://host:port').
  """

  def __init__(self, app, hosts: tuple[str, ...] = (),
               origins: Iterable[str] = ()):
    self.app, self.hosts = app, tuple(hosts)
    self.origins = frozenset(o.strip().rstrip('/').lower() for o in origins
                             if o.strip())

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)
    headers = {k.decode('latin-1').lower(): v.decode('latin-1')
               for k, v in scope.get('headers') or []}
    host = headers.get('host', '')
    if self.hosts and _split_host(host) not in self.hosts:
      return await _refuse(send, 421, f'this server does not answer to host '
                           f'{host[:100]!r}; set serve.allowed_hosts to '
                           'allow a name')
    if scope.get('method') in _GUARDED_METHODS:
      why = self._cross_site(headers, host)
      if why:
        return await _refuse(send, 403, f'cross-site request refused: {why}; '
                             'use the page this server serves, or set '
                             'serve.allowed_origins')
    return await self.app(scope, receive, send)

  def _cross_site(self, headers: dict[str, str], host: str) -> str | None:
    origin = headers.get('origin')
    if origin is not None:
      origin = origin.strip().rstrip('/').lower()
      if origin in self.origins:
        return None
      if origin == 'null':
        return 'the request comes from an opaque origin (null)'
      netloc = parse.urlsplit(origin).netloc
      if netloc != host.strip().lower():
        return f'Origin {origin[:100]!r} is not this server ({host[:100]!r})'
      return None
    if headers.get('sec-fetch-site') == 'cross-site':
      return 'the browser marks it cross-site'
    return None


async def _refuse(send, status: int, detail: str) -> None:
  body = json.dumps({'detail': detail}).encode()
  await send({'type': 'http.response.start', 'status': status,
              'headers': [(b'content-type', b'application/json'),
                          (b'content-length', str(len(body)).encode())]})
  await send({'type': 'http.response.body', 'body': body})


def _finite(value: Any) -> bool:
  return not (isinstance(value, float) and not math.isfinite(value))


def _describe(error: dict[str, Any]) -> str:
  """One pydantic/FastAPI validation error -> 'where: what', never the
  value itself (it may be NaN, huge, or not valid Unicode)."""
  where = '.'.join(str(p) for p in error.get('loc', ()) if p != 'body')
  what = str(error.get('msg', 'invalid')).removeprefix('Value error, ')
  if not _finite(error.get('input')):
    what = 'a non-finite number (NaN, Infinity, or too large) is not accepted'
  elif error.get('type') == 'json_invalid':
    what = 'the body is not valid JSON'
  return f'{where or "body"}: {what}'


def install_error_handlers(app) -> None:
  """JSON refusals with finite details for invalid requests, and a 500 that
  says only that the request failed for anything unexpected (logged with
  its traceback on the server)."""
  from fastapi import exceptions  # pylint: disable=g-import-not-at-top
  from fastapi import responses  # pylint: disable=g-import-not-at-top

  @app.exception_handler(exceptions.RequestValidationError)
  async def invalid(_, exc):
    details = [_describe(e) for e in exc.errors()]
    return responses.JSONResponse({'detail': '; '.join(details)[:1000]},
                                  status_code=422)

  @app.exception_handler(Exception)
  async def unexpected(request, exc):
    logging.getLogger('mardjax.serve').error(
        'request %s %s failed', request.method, request.url.path,
        exc_info=exc)
    return responses.JSONResponse(
        {'detail': 'the server failed on this request; it keeps serving, '
                   'and the error is in its log'}, status_code=500)


def check_text(text: str) -> str:
  """`text` if every character can be written as UTF-8, else ValueError.

  JSON's \\uD800-style escapes decode to lone surrogates, which no encoder
  writes; refusing them where the text enters keeps them out of the
  tokenizer and out of the answer.
  """
  try:
    text.encode('utf-8')
  except UnicodeEncodeError as e:
    raise ValueError(f'the text is not valid Unicode (a lone surrogate at '
                     f'character {e.start})') from None
  return text
