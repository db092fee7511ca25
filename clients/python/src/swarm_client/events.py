"""A task's live events (``GET /v1/tasks/{id}/events``, Server-Sent Events).

:class:`SseParser` splits the bytes of a ``text/event-stream`` body, as they arrive in
pieces of any size, into :class:`Event` objects, following the format of the HTML
standard: ``field: value`` lines ending in LF, CRLF or CR; an event ends at a blank
line; lines starting with ``:`` are comments (the coordinator's keep-alives); several
``data:`` lines are joined with ``\\n``; ``id:`` sets the id of this event and the ones
after it; ``retry:`` sets the reconnection delay.

The coordinator's events (one JSON ``data:`` line each, ``id: <attempt>:<offset>``):

* ``state`` — ``{"task", "state", "attempt", "worker"}``;
* ``attempt`` — ``{"task", "attempt", "event": "started", "stage", "worker"}`` or
  ``{"task", "attempt", "event": "ended", "outcome", "error", "output_bytes"}``;
* ``output`` — ``{"task", "attempt", "stream", "offset", "len", "text"}`` (``"data"``
  in base64 with ``"encoding": "base64"`` when the piece is not UTF-8); ``stream`` is
  ``stdout``, ``stderr``, ``tokens`` (an ``llm`` agent) or ``body`` (an ``http`` agent);
* ``gap`` — ``{"task", "attempt", "from", "to", "reason"}``: output not shown;
* ``end`` — the final task view (as ``GET /v1/tasks/{id}``); the stream closes after it.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional

from .models import Task

__all__ = ["Event", "SseParser"]

_BOM = b"\xef\xbb\xbf"

#: A line end: CRLF, LF or CR.
_EOL = re.compile(rb"\r\n|\r|\n")


@dataclass
class Event:
    """One Server-Sent Event of a task's stream.

    Attributes:
        event: the event's name (``state``, ``attempt``, ``output``, ``gap``, ``end``;
            ``message`` when the stream named none).
        id: the event's id (``<attempt>:<offset>``), what resumes the stream after it;
            ``None`` when the stream gave none yet.
        data: the ``data:`` text parsed as JSON (the text itself when it is not JSON).
        raw: the ``data:`` text.
    """

    event: str
    id: Optional[str]
    data: Any
    raw: str = field(default="", repr=False, compare=False)

    @classmethod
    def parse(cls, event: str, id: Optional[str], raw: str) -> "Event":
        """An event from its fields, with ``raw`` parsed as JSON when it is JSON."""
        try:
            data: Any = json.loads(raw)
        except ValueError:
            data = raw
        return cls(event=event, id=id, data=data, raw=raw)

    def _get(self, key: str) -> Any:
        return self.data.get(key) if isinstance(self.data, dict) else None

    @property
    def attempt(self) -> Optional[int]:
        """The attempt an event is about (``None`` when it names none)."""
        n = self._get("attempt")
        return int(n) if isinstance(n, int) else None

    @property
    def stream(self) -> Optional[str]:
        """An ``output`` event's stream (``stdout``, ``stderr``, ``tokens``, ``body``)."""
        return self._get("stream") if self.event == "output" else None

    @property
    def output(self) -> Optional[bytes]:
        """An ``output`` event's bytes (its ``text``, or its base64 ``data``); ``None``
        for other events."""
        if self.event != "output":
            return None
        text = self._get("text")
        if isinstance(text, str):
            return text.encode("utf-8")
        b64 = self._get("data")
        if isinstance(b64, str):
            return base64.b64decode(b64)
        return b""

    @property
    def text(self) -> Optional[str]:
        """An ``output`` event's text (bytes that are not UTF-8 replaced); ``None`` for
        other events. A character split between two pieces comes out replaced here:
        decode :attr:`output` with an incremental decoder (as ``Client.follow`` does)
        to get every character."""
        out = self.output
        return None if out is None else out.decode("utf-8", errors="replace")

    @property
    def task(self) -> Optional[Task]:
        """The final task carried by the ``end`` event; ``None`` for other events."""
        if self.event != "end" or not isinstance(self.data, dict):
            return None
        return Task.from_json(self.data)


class SseParser:
    """Splits a ``text/event-stream`` body into :class:`Event` objects.

    Feed it the bytes as they come (:meth:`feed` returns the events they complete); an
    event is complete at the blank line after it, so one cut short by the end of the
    stream is dropped, as the standard says.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        #: A CR ended the last line: an LF right after it belongs to that line end.
        self._after_cr = False
        self._started = False
        self._event = ""
        self._data: List[str] = []
        self._has_data = False
        #: The id given last (it carries over to the events after it).
        self.last_event_id: Optional[str] = None
        #: The reconnection delay the stream asked for (``retry:``), in milliseconds.
        self.retry_ms: Optional[int] = None

    def feed(self, chunk: bytes) -> List[Event]:
        """Take the next bytes of the stream; the events they complete, in order."""
        if not chunk:
            return []
        buf = self._buf
        buf += chunk
        if not self._started:
            if len(buf) < len(_BOM) and _BOM.startswith(bytes(buf)):
                return []  # maybe a byte-order mark, cut
            if buf.startswith(_BOM):
                del buf[: len(_BOM)]
            self._started = True
        if self._after_cr and buf[:1] == b"\n":
            del buf[:1]  # the LF of a CRLF whose CR ended the last piece
        self._after_cr = False
        out: List[Event] = []
        pos = 0
        for m in _EOL.finditer(buf):
            self._line(bytes(buf[pos : m.start()]), out)
            pos = m.end()
        # A CR at the very end may be the first half of a CRLF.
        self._after_cr = pos > 0 and pos == len(buf) and buf[pos - 1] == 0x0D
        del buf[:pos]
        return out

    def _line(self, raw: bytes, out: List[Event]) -> None:
        line = raw.decode("utf-8", errors="replace")
        if not line:
            self._dispatch(out)
            return
        if line.startswith(":"):
            return  # a comment (keep-alive)
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry":
            if value.isdigit():
                self.retry_ms = int(value)
        # Other fields are ignored.

    def _dispatch(self, out: List[Event]) -> None:
        if self._has_data:
            out.append(
                Event.parse(self._event or "message", self.last_event_id, "\n".join(self._data))
            )
        self._event = ""
        self._data = []
        self._has_data = False
