"""HTTP transport of :class:`swarm_client.Client`: ``http.client`` over plain TCP or TLS.

Behaves like the ``swarm`` CLI's client (``cli/src/client.rs``):

* it takes one or more API base URLs of the same cluster (comma-separated). Any node
  answers any request (followers forward to the leader), so the transport only moves on
  to the next node when the request cannot have taken effect where it was sent: the node
  could not be reached at all, or it answered ``not_leader`` (the leader it names is
  tried next); reads (``GET``) also move on when a node answers ``unavailable`` or the
  answer is lost. A write that may have reached the cluster is never sent twice.
* ``https://`` APIs are verified against the cluster CA given (``ca``), and only
  against it: a swarm API's certificate is always signed by its cluster's CA, so an
  ``https://`` API without a CA is an error, as in the CLI. Verification is never
  turned off.

:meth:`Transport.open_stream` routes a ``GET`` the same way but hands back the answer
unread (a :class:`Stream`, read as it arrives), for the event streams.

Connections are kept alive and reused by the thread that made them, but only when idle
for less than :data:`REUSE_IDLE_SECS` and not closed by the server (the coordinator
closes idle keep-alive connections after its header timeout, 10 s by default).
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import SwarmConnectionError, SwarmError

__all__ = ["Base", "Stream", "Transport", "parse_bases", "REUSE_IDLE_SECS"]

#: A kept-alive connection idle longer than this is not reused (a new one is opened).
REUSE_IDLE_SECS = 2.0

#: Longest time to wait for a TCP connection (and TLS handshake) to one node.
CONNECT_TIMEOUT_SECS = 5.0

#: Most nodes tried for one request (as the CLI).
MAX_TRIES = 8

USER_AGENT = "swarm-client-python/0.1.0"

#: Methods that only read: safe to send to another node when the answer was lost.
_READS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True)
class Base:
    """One API base URL, split into its parts."""

    scheme: str
    host: str
    port: int
    prefix: str

    @property
    def url(self) -> str:
        """The base URL as text (``scheme://host:port/prefix``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.prefix}"


def _parse_base(text: str) -> Base:
    """Parse one ``http(s)://host[:port][/prefix]`` URL."""
    raw = text.strip().rstrip("/")
    parts = urllib.parse.urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the API must be an http:// or https:// URL, got {text!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"the API URL must not carry a query, fragment or credentials: {text!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Base(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


def parse_bases(api: str) -> List[Base]:
    """Parse comma-separated API base URLs (nodes of one cluster)."""
    bases = [_parse_base(b) for b in api.split(",") if b.strip()]
    if not bases:
        raise ValueError("the API address is empty")
    return bases


class _NotSent(Exception):
    """The request surely did not reach the node (it could not be connected to)."""

    def __init__(self, message: str, url: str) -> None:
        super().__init__(message)
        self.url = url


class _Lost(Exception):
    """The request was (maybe) sent but no answer came back."""

    def __init__(self, message: str, url: str) -> None:
        super().__init__(message)
        self.url = url


def _is_dropped(sock: Optional[socket.socket]) -> bool:
    """Whether an idle kept-alive socket was closed by the server (it is readable: EOF,
    or data nobody asked for; either way it must not be reused)."""
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _describe(e: BaseException) -> str:
    """A short human description of a connection-level error."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return (
            f"certificate verification failed ({e.verify_message or e}); "
            "is `ca` (SWARM_CA) the cluster's ca.pem?"
        )
    if isinstance(e, ssl.SSLError):
        return f"TLS error: {e}"
    if isinstance(e, socket.timeout):
        return "timed out"
    if isinstance(e, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(e, http.client.BadStatusLine):
        return "the answer is not HTTP (an https:// API asked over http://?)"
    return f"{type(e).__name__}: {e}"


def parse_error(status: int, data: bytes) -> SwarmError:
    """The :class:`SwarmError` for a non-2xx answer: the API's ``{"error": {"code",
    "message"}}`` body, or ``http_error`` with the text when it is not one."""
    text = data.decode("utf-8", errors="replace")
    try:
        body: Any = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        return SwarmError(
            status,
            str(err.get("code", "http_error")),
            str(err.get("message", "")),
            leader_api=err.get("leader_api"),
            body=body,
        )
    return SwarmError(status, "http_error", text.strip()[:2000] or f"HTTP {status}", body=text)


class Stream:
    """An answer being received (an event stream): :meth:`read` its body as it comes,
    :meth:`close` it when done. Owns its connection."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, url: str) -> None:
        self._conn = conn
        self._resp = resp
        #: The base URL of the node answering.
        self.url = url

    def read(self, timeout: float, size: int = 65536) -> bytes:
        """The next bytes of the body as soon as there are any (at most ``size``);
        ``b""`` at its end.

        Raises:
            OSError: nothing came for ``timeout`` seconds (``socket.timeout``), or the
                connection broke.
            http.client.HTTPException: the body is cut short or malformed.
        """
        sock = self._conn.sock
        if sock is not None:
            sock.settimeout(max(timeout, 0.001))
        return self._resp.read1(size)

    def close(self) -> None:
        """Close the answer and its connection."""
        try:
            self._resp.close()
        finally:
            self._conn.close()


class Transport:
    """Sends requests to the nodes of one cluster (see the module docs)."""

    def __init__(
        self,
        bases: Sequence[Base],
        token: Optional[str],
        ca: Optional[str],
        timeout: float,
    ) -> None:
        if not bases:
            raise ValueError("no API address")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if token is not None and any(c in token for c in "\r\n\0"):
            raise ValueError("the API token must not contain line breaks or NUL")
        self.bases: List[Base] = list(bases)
        self.token = token or None
        self.timeout = float(timeout)
        https = any(b.scheme == "https" for b in self.bases)
        self._ssl: Optional[ssl.SSLContext] = None
        if ca is not None:
            try:
                # With a CA file, only that CA is trusted (no system roots), hostnames are
                # checked, and verification stays on.
                self._ssl = ssl.create_default_context(cafile=ca)
            except (OSError, ssl.SSLError) as e:
                raise ValueError(f"cannot use the cluster CA {ca!r}: {e}") from e
        elif https:
            raise ValueError(
                "an https:// API is verified against the cluster CA: pass ca= (or set "
                "SWARM_CA) with its ca.pem"
            )
        self._current = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        # Every thread's pool, so close() can reach them all.
        self._pools: List[Dict[Base, Tuple[http.client.HTTPConnection, float]]] = []

    # -- connections -------------------------------------------------------------

    def _pool(self) -> Dict[Base, Tuple[http.client.HTTPConnection, float]]:
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = {}
            self._local.pool = pool
            with self._lock:
                self._pools.append(pool)
        return pool

    def _connect(self, base: Base, timeout: float) -> Tuple[http.client.HTTPConnection, bool]:
        """A connection to ``base`` (reused when fresh) and whether it was reused.

        Raises:
            _NotSent: no connection could be made.
        """
        pool = self._pool()
        entry = pool.pop(base, None)
        if entry is not None:
            old, last_used = entry
            sock = old.sock
            if (
                sock is not None
                and time.monotonic() - last_used < REUSE_IDLE_SECS
                and not _is_dropped(sock)
            ):
                sock.settimeout(timeout)
                return old, True
            old.close()
        connect_timeout = min(timeout, CONNECT_TIMEOUT_SECS)
        if base.scheme == "https":
            if self._ssl is None:
                raise _NotSent(
                    "an https:// API is verified against the cluster CA: pass ca= (or set SWARM_CA)",
                    base.url,
                )
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                base.host, base.port, timeout=connect_timeout, context=self._ssl
            )
        else:
            conn = http.client.HTTPConnection(base.host, base.port, timeout=connect_timeout)
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            if isinstance(e, ssl.SSLError):
                msg = f"the TLS handshake with the swarm API at {base.url} failed: {_describe(e)}"
            else:
                msg = f"cannot reach the swarm API at {base.url}: {_describe(e)}"
            raise _NotSent(msg, base.url) from e
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn, False

    def _once(
        self,
        base: Base,
        method: str,
        target: str,
        body: Optional[bytes],
        headers: Mapping[str, str],
        timeout: float,
    ) -> Tuple[int, bytes]:
        """One request to one node: its status and body.

        Raises:
            _NotSent: the node could not be reached.
            _Lost: the request may have been sent, but no complete answer came.
        """
        for _ in range(2):
            conn, reused = self._connect(base, timeout)
            try:
                conn.request(method, base.prefix + target, body=body, headers=dict(headers))
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                stale = isinstance(
                    e, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
                )
                # A kept-alive connection the server closed just as it was reused: a read
                # is simply sent again on a fresh connection.
                if reused and stale and method in _READS:
                    continue
                raise _Lost(
                    f"request to the swarm API at {base.url} failed: {_describe(e)}", base.url
                ) from e
            if resp.will_close:
                conn.close()
            else:
                self._pool()[base] = (conn, time.monotonic())
            return resp.status, data
        raise AssertionError("unreachable")  # pragma: no cover

    def _open_once(
        self,
        base: Base,
        method: str,
        target: str,
        body: Optional[bytes],
        headers: Mapping[str, str],
        timeout: float,
    ) -> Tuple[int, Any]:
        """Like :meth:`_once`, but a 2xx answer is returned unread, as a :class:`Stream`
        (its connection is then the stream's, never reused); any other answer is read
        (its body, bytes)."""
        for _ in range(2):
            conn, reused = self._connect(base, timeout)
            try:
                conn.request(method, base.prefix + target, body=body, headers=dict(headers))
                resp = conn.getresponse()
                data = b"" if 200 <= resp.status < 300 else resp.read()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                stale = isinstance(
                    e, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
                )
                if reused and stale and method in _READS:
                    continue
                raise _Lost(
                    f"request to the swarm API at {base.url} failed: {_describe(e)}", base.url
                ) from e
            if 200 <= resp.status < 300:
                kind = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
                if kind != "text/event-stream":
                    conn.close()
                    raise SwarmConnectionError(
                        f"the swarm API at {base.url} answered {target} with "
                        f"{kind or 'no content type'}, not an event stream",
                        url=base.url,
                    )
                return resp.status, Stream(conn, resp, base.url)
            if resp.will_close:
                conn.close()
            else:
                self._pool()[base] = (conn, time.monotonic())
            return resp.status, data
        raise AssertionError("unreachable")  # pragma: no cover

    # -- routing -----------------------------------------------------------------

    def _headers(self, accept: str, auth: bool) -> Dict[str, str]:
        headers = {"Accept": accept, "User-Agent": USER_AGENT}
        if auth and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    @staticmethod
    def _target(path: str, query: Optional[Mapping[str, Any]]) -> str:
        if query:
            q = {k: v for k, v in query.items() if v is not None}
            if q:
                return path + "?" + urllib.parse.urlencode(q)
        return path

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Optional[Mapping[str, Any]] = None,
        body: Optional[bytes] = None,
        content_type: str = "application/json",
        timeout: Optional[float] = None,
        auth: bool = True,
    ) -> Tuple[int, bytes]:
        """Send ``method path?query`` to the cluster; the 2xx status and body.

        Raises:
            SwarmError: the API answered with a status outside 2xx.
            SwarmConnectionError: no node gave an answer.
        """
        method = method.upper()
        headers = self._headers("application/json", auth)
        if body is not None:
            headers["Content-Type"] = content_type
        timeout = self.timeout if timeout is None else timeout
        status, data = self._route(
            method, self._target(path, query), body, headers, timeout, self._once
        )
        return status, data

    def open_stream(
        self,
        path: str,
        *,
        query: Optional[Mapping[str, Any]] = None,
        headers: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
    ) -> "Stream":
        """``GET path?query`` for a ``text/event-stream`` answer, left unread: the
        :class:`Stream` to read it from as it comes (close it when done). Routed as
        any read (a node that cannot be reached, or is not the leader and cannot say
        where it is, is skipped); ``timeout`` bounds the wait for the answer's head.

        Raises:
            SwarmError: the API answered with a status outside 2xx.
            SwarmConnectionError: no node gave an answer, or the answer is not an event
                stream.
        """
        all_headers = self._headers("text/event-stream", True)
        all_headers["Cache-Control"] = "no-cache"
        all_headers.update(headers or {})
        timeout = self.timeout if timeout is None else timeout
        _, stream = self._route(
            "GET", self._target(path, query), None, all_headers, timeout, self._open_once
        )
        return stream

    def _route(
        self,
        method: str,
        target: str,
        body: Optional[bytes],
        headers: Mapping[str, str],
        timeout: float,
        send: Callable[..., Tuple[int, Any]],
    ) -> Tuple[int, Any]:
        """Send one request with ``send`` (:meth:`_once` or :meth:`_open_once`) to the
        nodes in turn, as the module docs say; the first 2xx status and its result."""
        with self._lock:
            start = self._current % len(self.bases)
            bases = list(self.bases)
        order = [bases[(start + i) % len(bases)] for i in range(len(bases))]
        last: Optional[Exception] = None
        tried = 0
        while tried < len(order) and tried < MAX_TRIES:
            base = order[tried]
            tried += 1
            try:
                status, data = send(base, method, target, body, headers, timeout)
            except _NotSent as e:
                last = SwarmConnectionError(str(e), url=e.url, may_have_taken_effect=False)
                continue
            except _Lost as e:
                err = SwarmConnectionError(
                    str(e) if method in _READS else
                    f"{e}; the request may still have taken effect (retry a submit with the "
                    "same idempotency_key)",
                    url=e.url,
                    may_have_taken_effect=method not in _READS,
                )
                if method in _READS:
                    last = err
                    continue
                raise err from e
            if 200 <= status < 300:
                if base in bases:
                    with self._lock:
                        self._current = bases.index(base)
                return status, data
            api_err = parse_error(status, data)
            if api_err.code == "not_leader" or (method in _READS and api_err.code == "unavailable"):
                if api_err.leader_api:
                    try:
                        leader = _parse_base(f"{base.scheme}://{api_err.leader_api}{base.prefix}")
                    except ValueError:
                        leader = None
                    if leader is not None and leader not in order[:tried]:
                        order.insert(tried, leader)
                last = api_err
                continue
            raise api_err
        if last is None:  # pragma: no cover - there is always at least one base
            last = SwarmConnectionError("no API address to try")
        raise last

    def close(self) -> None:
        """Close every kept-alive connection (of every thread)."""
        with self._lock:
            pools = list(self._pools)
        for pool in pools:
            for conn, _ in list(pool.values()):
                conn.close()
            pool.clear()
