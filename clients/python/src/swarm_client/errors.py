"""Exceptions raised by :class:`swarm_client.Client`.

Every exception the client raises on purpose derives from :class:`SwarmClientError`:

* :class:`SwarmError` — the API answered with a non-2xx status. ``status``, ``code`` and
  ``message`` come from the coordinator's error body
  ``{"error": {"code": "...", "message": "..."}}`` (codes such as ``bad_request``,
  ``invalid_json``, ``payload_too_large``, ``unauthorized``, ``forbidden``, ``not_found``,
  ``conflict``, ``queue_full``, ``not_leader``, ``unavailable``, ``internal``).
* :class:`SwarmConnectionError` — no usable answer: the API could not be reached, the TLS
  handshake failed, the connection broke or timed out, or the answer was not HTTP/JSON.
* :class:`WaitTimeout` — :meth:`swarm_client.Client.wait` ran out of time before the
  task reached a final state (also a :class:`TimeoutError`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # pragma: no cover - imported for annotations only
    from .models import Task

__all__ = [
    "SwarmClientError",
    "SwarmError",
    "SwarmConnectionError",
    "WaitTimeout",
]


class SwarmClientError(Exception):
    """Base class of every error raised by this package."""


class SwarmError(SwarmClientError):
    """The API refused a request (an HTTP status outside 2xx).

    Attributes:
        status: the HTTP status (e.g. ``400``, ``401``, ``404``, ``413``, ``429``).
        code: the API's stable machine-readable code (e.g. ``"bad_request"``); when the
            answer carried no API error body (e.g. a proxy's HTML page), ``"http_error"``.
        message: the API's human-readable message.
        leader_api: for ``not_leader`` errors, where the leader's API is (if known).
        body: the decoded error body (a dict), or the raw text when it was not JSON.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        leader_api: Optional[str] = None,
        body: Any = None,
    ) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message
        self.leader_api = leader_api
        self.body = body

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


class SwarmConnectionError(SwarmClientError):
    """No usable answer from the API.

    Attributes:
        url: the URL (or base URL) that was tried last.
        may_have_taken_effect: ``True`` when the request was sent but the answer was lost
            (e.g. a write timed out): it may still have been done, so retry a submit with
            the same ``idempotency_key``. ``False`` when it surely never reached the API
            (e.g. connection refused).
    """

    def __init__(self, message: str, *, url: str = "", may_have_taken_effect: bool = False) -> None:
        super().__init__(message)
        self.url = url
        self.may_have_taken_effect = may_have_taken_effect


class WaitTimeout(SwarmClientError, TimeoutError):
    """A wait for a task ended before the task was final.

    Attributes:
        task: the task as last seen (still ``queued`` or ``running``).
    """

    def __init__(self, message: str, task: "Task") -> None:
        super().__init__(message)
        self.task = task
