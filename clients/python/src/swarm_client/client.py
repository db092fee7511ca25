"""The client of the swarm coordinator's HTTP API (``/v1/*``).

>>> from swarm_client import Client
>>> c = Client("http://127.0.0.1:8080", token="...")        # doctest: +SKIP
>>> t = c.submit("echo", "hello", wait=30)                    # doctest: +SKIP
>>> t.state, t.text                                           # doctest: +SKIP
('succeeded', 'hello')
"""

from __future__ import annotations

import codecs
import http.client
import io
import json
import os
import sys
import time
from urllib.parse import quote
from typing import IO, Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

from ._http import Transport, parse_bases
from .errors import SwarmClientError, SwarmConnectionError, SwarmError, WaitTimeout
from .events import Event, SseParser
from .models import STATES, Payload, SubmitSpec, Task, TaskPage, spec_to_json

__all__ = [
    "Client",
    "DEFAULT_API",
    "MAX_SERVER_WAIT_SECS",
    "WAIT_CHUNK_SECS",
    "RESUME_FOR_SECS",
    "STREAM_IDLE_SECS",
]

#: The API address when neither ``api`` nor ``SWARM_API`` gives one (as the CLI).
DEFAULT_API = "http://127.0.0.1:8080"

#: The longest ``?wait=`` a coordinator accepts (its ``max_wait``).
MAX_SERVER_WAIT_SECS = 300.0

#: Longer waits are made of server-side waits of at most this long each, so no single
#: request stays open for minutes (through proxies, or past a leader change).
WAIT_CHUNK_SECS = 60.0

#: How long :meth:`Client.events` keeps trying to resume a broken event stream (as the
#: CLI's ``swarm task logs -f``).
RESUME_FOR_SECS = 60.0

#: An event stream silent this long is taken as broken, and resumed (the coordinator
#: sends a keep-alive comment every 10 s).
STREAM_IDLE_SECS = 35.0

#: The first pause before resuming a broken stream (it doubles, up to 2 s).
_RESUME_DELAY_SECS = 0.3

#: The token file the CLI reads when none is named (``swarm up`` writes it).
_DEFAULT_TOKEN_FILE = os.path.join("swarm-data", "api-token")


def _read_token_file(path: str) -> str:
    """The token in a token file, trimmed (an empty file is an error, as in the CLI)."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise ValueError(f"cannot read the token file {path!r}: {e}") from e
    if not token:
        raise ValueError(f"token file {path!r} is empty")
    return token


def _ms(seconds: float) -> str:
    """A duration for ``?wait=``: whole milliseconds, e.g. ``"1500ms"``."""
    return f"{max(0, int(seconds * 1000))}ms"


def _task_id(task_id: Union[int, str, Task]) -> int:
    """A task id from an int, a decimal string or a :class:`Task`."""
    if isinstance(task_id, Task):
        return task_id.id
    if isinstance(task_id, bool):
        raise TypeError("a task id is an int, not a bool")
    if isinstance(task_id, int):
        return task_id
    if isinstance(task_id, str) and task_id.strip().isdigit():
        return int(task_id.strip())
    raise TypeError(f"a task id is a non-negative int, got {task_id!r}")


class Client:
    """Talks to a swarm cluster through its coordinators' HTTP API.

    Args:
        api: base URL of a coordinator's API (``http://…`` or ``https://…``); several
            nodes of one cluster may be given comma-separated, and are tried in turn
            when one cannot be reached. Default: ``SWARM_API``, else
            ``http://127.0.0.1:8080``.
        token: the API bearer token. Default: ``SWARM_TOKEN``, else the file named by
            ``token_file`` or ``SWARM_TOKEN_FILE``, else ``./swarm-data/api-token`` when
            it exists (as the CLI). Pass ``""`` to send no token.
        ca: the cluster CA certificate (``ca.pem``) an ``https://`` API is verified
            against. Default: ``SWARM_CA``. Required for ``https://``.
        timeout: seconds a request may take (server-side waits add their own length).
        token_file: a file holding the token, used when ``token`` and ``SWARM_TOKEN``
            are unset.

    A client is safe to share between threads; each thread keeps its own connections.
    Use it as a context manager, or call :meth:`close`, to close them.
    """

    def __init__(
        self,
        api: Optional[str] = None,
        token: Optional[str] = None,
        ca: Optional[str] = None,
        timeout: float = 30.0,
        *,
        token_file: Optional[str] = None,
    ) -> None:
        api = api if api is not None else os.environ.get("SWARM_API") or DEFAULT_API
        if token is None:
            token = os.environ.get("SWARM_TOKEN") or None
        if token is None:
            path = token_file or os.environ.get("SWARM_TOKEN_FILE") or None
            if path is not None:
                token = _read_token_file(path)
            elif os.path.exists(_DEFAULT_TOKEN_FILE):
                token = _read_token_file(_DEFAULT_TOKEN_FILE)
        if ca is None:
            ca = os.environ.get("SWARM_CA") or None
        self.api = api
        self.ca = ca
        self.timeout = float(timeout)
        self._http = Transport(parse_bases(api), token, ca, self.timeout)

    def __repr__(self) -> str:
        return f"Client(api={self.api!r})"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the kept-alive connections (the client can still be used after)."""
        self._http.close()

    def __del__(self) -> None:
        # Do not leave sockets open until the interpreter exits.
        http = getattr(self, "_http", None)
        if http is not None:
            try:
                http.close()
            except Exception:  # pragma: no cover - best effort at teardown
                pass

    # -- generic -----------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Optional[Mapping[str, Any]] = None,
        timeout: Optional[float] = None,
    ) -> Any:
        """Call any JSON route of the API (e.g. ``GET /v1/patterns``,
        ``POST /v1/swarms``) and return its decoded JSON answer (``None`` for an empty
        one). ``body`` is JSON-encoded; ``query`` values that are ``None`` are left out.

        Raises:
            SwarmError: the API refused the request.
            SwarmConnectionError: no answer.
        """
        data = None if body is None else json.dumps(body).encode("utf-8")
        _, raw = self._http.request(method, path, query=query, body=data, timeout=timeout)
        return self._decode(raw)

    @staticmethod
    def _decode(raw: bytes) -> Any:
        if not raw.strip():
            return None
        try:
            return json.loads(raw.decode("utf-8"))
        except ValueError as e:
            snippet = raw[:200].decode("utf-8", errors="replace")
            raise SwarmConnectionError(f"the API answered something that is not JSON: {snippet!r}") from e

    # -- tasks -------------------------------------------------------------------

    def submit(
        self,
        agent: Optional[str],
        payload: Payload = None,
        *,
        priority: Optional[int] = None,
        timeout_ms: Optional[int] = None,
        max_attempts: Optional[int] = None,
        labels: Optional[Mapping[str, str]] = None,
        swarm: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        patterns: Optional[int] = None,
        retain_ms: Optional[int] = None,
        depends_on: Optional[List[int]] = None,
        concurrency_key: Optional[str] = None,
        rate_limit: Optional[str] = None,
        requires_approval: bool = False,
        approval_timeout_ms: Optional[int] = None,
        callback_url: Optional[str] = None,
        wait: Optional[float] = None,
    ) -> Task:
        """Submit one task (``POST /v1/tasks``) and return it.

        Args:
            agent: the agent to run (``echo``, ``sleep``, or one of a worker's agents
                file); ``None`` for a ring swarm, whose stages name the agents.
            payload: the agent's stdin: ``bytes``/``str`` as they are, any other
                JSON-serialisable value as its compact JSON text, ``None`` empty.
            priority: higher runs first (default 0).
            timeout_ms: per-attempt timeout (default: the coordinator's).
            max_attempts: attempts before the task is given up (default: the
                coordinator's).
            labels: labels a worker must carry to run the task.
            swarm: the swarm to run in (default ``default``).
            idempotency_key: submitting twice with the same key yields one task.
            patterns: hand the agent this many ReasoningBank patterns.
            retain_ms: how long the finished task stays readable.
            depends_on: tasks to run after; the task is ``waiting`` until they all
                succeeded, and is cancelled (``dependency_failed``) if one does not.
            concurrency_key: tasks with the same key share the key's limit on running
                tasks (see :meth:`set_limit`), and dispatch takes keys in turns.
            rate_limit: the named rate limit (:meth:`set_limit` with ``rate``) each
                start of the task draws a token from.
            requires_approval: hold the task in ``awaiting_approval`` (after its
                parents) until :meth:`approve` queues it or :meth:`reject` cancels it.
            approval_timeout_ms: fail the task (``approval_timeout``) if no decision
                came this long after it began awaiting approval (implies
                ``requires_approval``).
            callback_url: POST the finished task's view here, signed (see
                :func:`verify_callback`), retried until a 2xx answer.
            wait: seconds to wait for the task to be final; the task is returned as it
                is when the wait ends (final or not). ``None``: return at once.

        The task comes back in the submit's own answer (the API's ``?wait=``), so a
        submit is one request. ``task.raw["duplicate"]`` is not set; use
        :meth:`submit_raw` to see whether an idempotency key named an existing task.

        Raises:
            SwarmError: the API refused the task (e.g. ``400 bad_request``,
                ``413 payload_too_large``, ``429 queue_full``).
            SwarmConnectionError: no answer (``may_have_taken_effect`` says whether
                the task may exist).
        """
        spec = SubmitSpec(
            agent=agent,
            payload=payload,
            priority=priority,
            timeout_ms=timeout_ms,
            max_attempts=max_attempts,
            labels=labels,
            swarm=swarm,
            idempotency_key=idempotency_key,
            patterns=patterns,
            retain_ms=retain_ms,
            depends_on=depends_on,
            concurrency_key=concurrency_key,
            rate_limit=rate_limit,
            requires_approval=requires_approval,
            approval_timeout_ms=approval_timeout_ms,
            callback_url=callback_url,
        )
        return self.submit_spec(spec, wait=wait)

    def submit_graph(
        self, steps: Iterable[Tuple[str, Iterable[str], Union[SubmitSpec, Mapping[str, Any]]]]
    ) -> Dict[str, int]:
        """Submit a task graph in one commit (``POST /v1/graphs``): every step, or none.

        ``steps`` are ``(name, after, task)``: a unique step name, the names of the
        steps it runs after, and the task as for :meth:`submit_spec`. A step waits until
        its parents succeeded; its agent receives
        ``{"payload": ..., "parents": {"<step>": <output>, ...}}``. A cycle, an unknown
        step name or a bad task is refused with ``400`` before anything is submitted.

        Returns:
            each step's task id, by name.
        """
        body = {
            "steps": [
                {"name": name, "after": list(after), "task": spec_to_json(task)}
                for name, after, task in steps
            ]
        }
        answer = self.request("POST", "/v1/graphs", body)
        if not isinstance(answer, dict) or not isinstance(answer.get("steps"), dict):
            raise SwarmConnectionError(f"unexpected graph answer: {answer!r}")
        return {str(k): int(v) for k, v in answer["steps"].items()}

    def submit_spec(
        self, spec: Union[SubmitSpec, Mapping[str, Any]], *, wait: Optional[float] = None
    ) -> Task:
        """:meth:`submit` from a :class:`SubmitSpec` or a mapping of the API's fields."""
        answer = self.submit_raw(spec, wait=wait)
        view = answer.get("task")
        if not isinstance(view, dict):
            # An API without the task in its answer: read it.
            return self.get(int(answer["id"]))
        task = Task.from_json(view)
        # A wait longer than the API's longest goes on client-side.
        beyond = 0.0 if wait is None else wait - MAX_SERVER_WAIT_SECS
        if beyond > 0 and not task.is_final:
            task = self.wait(task.id, timeout=beyond, raise_on_timeout=False)
        return task

    def submit_raw(
        self, spec: Union[SubmitSpec, Mapping[str, Any]], *, wait: Optional[float] = None
    ) -> Dict[str, Any]:
        """``POST /v1/tasks`` with the API's answer as it is:
        ``{"id", "duplicate", "task"}`` (``task`` is always present: the submit asks
        the API to wait ``wait`` seconds, or 0)."""
        body = spec_to_json(spec)
        server_wait = 0.0 if wait is None else max(0.0, min(wait, MAX_SERVER_WAIT_SECS))
        answer = self.request(
            "POST",
            "/v1/tasks",
            body,
            query={"wait": _ms(server_wait)},
            timeout=self.timeout + server_wait,
        )
        if not isinstance(answer, dict) or "id" not in answer:
            raise SwarmConnectionError(f"unexpected submit answer: {answer!r}")
        return answer

    def submit_batch(self, tasks: Iterable[Union[SubmitSpec, Mapping[str, Any]]]) -> List[Task]:
        """Submit several tasks in one request and one commit (``POST /v1/tasks/batch``).

        ``tasks`` are :class:`SubmitSpec` objects or mappings of the API's submit fields
        (``{"agent": "echo", "payload": ...}``; a non-string ``payload`` is encoded as
        in :meth:`submit`, other fields are passed on and checked by the API).

        The batch is refused whole when the queue has no room for all of it (``429
        queue_full``) or any task is invalid (``400``, naming ``tasks[i]``). The
        coordinator takes at most 10,000 tasks per batch by default.

        Returns:
            the tasks, in request order, as read right after the commit (an
            idempotency key that named an existing task gives that task).
        """
        bodies = [spec_to_json(t) for t in tasks]
        if not bodies:
            return []
        answer = self.request("POST", "/v1/tasks/batch", {"tasks": bodies})
        if not isinstance(answer, dict) or not isinstance(answer.get("tasks"), list):
            raise SwarmConnectionError(f"unexpected batch answer: {answer!r}")
        ids = [int(t["id"]) for t in answer["tasks"]]
        found = self._fetch_many(ids)
        return [found[i] for i in ids]

    def _fetch_many(self, ids: List[int]) -> Dict[int, Task]:
        """Tasks by id: runs of close ids are read a page at a time through
        ``GET /v1/tasks?after=``, the rest one by one."""
        want = sorted(set(ids))
        found: Dict[int, Task] = {}
        runs: List[List[int]] = []
        for i in want:
            if runs and i - runs[-1][-1] <= 64:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            if len(run) < 3:
                continue
            first, last = run[0], run[-1]
            wanted = set(run)
            after = first - 1
            while after < last:
                page = self.list_page(after=after, limit=min(1000, last - after))
                for t in page.tasks:
                    if t.id in wanted:
                        found[t.id] = t
                if page.next_after is None or not page.tasks:
                    break
                after = page.next_after
        for i in want:
            if i not in found:
                found[i] = self.get(i)
        return found

    def get(self, task_id: Union[int, str, Task]) -> Task:
        """One task, with its attempts and output (``GET /v1/tasks/{id}``).

        Raises:
            SwarmError: ``404 not_found`` for an unknown (or purged) task.
        """
        tid = _task_id(task_id)
        return Task.from_json(self.request("GET", f"/v1/tasks/{tid}"))

    def wait(
        self,
        task_id: Union[int, str, Task],
        timeout: float = 60.0,
        *,
        raise_on_timeout: bool = True,
    ) -> Task:
        """Wait, at most ``timeout`` seconds, for a task to be final, and return it.

        Uses the API's server-side wait (``GET /v1/tasks/{id}?wait=…``, answered as soon
        as the task is final), in requests of at most :data:`WAIT_CHUNK_SECS`; should an
        answer come back early with the task unfinished, the next request is delayed
        with a growing backoff (50 ms to 1 s), so the loop never spins.

        Raises:
            WaitTimeout: the task was not final in time (``raise_on_timeout``; else
                the unfinished task is returned). Its ``task`` is the last view.
        """
        tid = _task_id(task_id)
        deadline = time.monotonic() + max(0.0, timeout)
        backoff = 0.05
        while True:
            left = deadline - time.monotonic()
            chunk = max(0.0, min(left, WAIT_CHUNK_SECS))
            asked = time.monotonic()
            view = self.request(
                "GET",
                f"/v1/tasks/{tid}",
                query={"wait": _ms(chunk)},
                timeout=self.timeout + chunk,
            )
            task = Task.from_json(view)
            if task.is_final:
                return task
            left = deadline - time.monotonic()
            if left <= 0:
                if raise_on_timeout:
                    raise WaitTimeout(
                        f"task {tid} is still {task.state} after {timeout:g}s", task
                    )
                return task
            if time.monotonic() - asked < chunk / 2:
                time.sleep(min(backoff, left))
                backoff = min(backoff * 2, 1.0)

    def cancel(self, task_id: Union[int, str, Task]) -> Task:
        """Cancel a task (``POST /v1/tasks/{id}/cancel``; idempotent: a final task stays
        as it is) and return it. A running attempt's process group is killed."""
        tid = _task_id(task_id)
        return Task.from_json(self.request("POST", f"/v1/tasks/{tid}/cancel"))

    def approve(self, task_id: Union[int, str, Task], comment: Optional[str] = None) -> Task:
        """Approve a task awaiting approval (``POST /v1/tasks/{id}/approve``): it is
        queued. The token's name, the time and ``comment`` are recorded
        (:attr:`Task.approval`). Needs the ``operate`` scope.

        Raises:
            SwarmError: ``409 not_awaiting_approval`` for a task in another state
                (already decided, cancelled, expired), ``404`` for an unknown one.
        """
        return self._decide(task_id, "approve", comment)

    def reject(self, task_id: Union[int, str, Task], comment: Optional[str] = None) -> Task:
        """Reject a task awaiting approval (``POST /v1/tasks/{id}/reject``): it is
        cancelled, its error naming the rejection and ``comment``, and its graph
        dependants are cancelled (``dependency_failed``). Refusals as :meth:`approve`."""
        return self._decide(task_id, "reject", comment)

    def _decide(self, task_id: Union[int, str, Task], verb: str, comment: Optional[str]) -> Task:
        tid = _task_id(task_id)
        body = {} if comment is None else {"comment": comment}
        return Task.from_json(self.request("POST", f"/v1/tasks/{tid}/{verb}", body))

    def list_page(
        self,
        *,
        state: Optional[str] = None,
        after: Optional[int] = None,
        limit: int = 100,
        order: str = "asc",
        agent: Optional[str] = None,
        swarm: Optional[str] = None,
        labels: Optional[Mapping[str, str]] = None,
        text: Optional[str] = None,
    ) -> TaskPage:
        """One page of tasks by id (``GET /v1/tasks``), filtered by the API.

        Args:
            state: only tasks in this state (one of :data:`swarm_client.STATES`).
            after: the previous page's ``next_after``: ids above it (``order="asc"``)
                or below it (``order="desc"``; ``None``: from the newest).
            limit: tasks per page, 1 to 1000 (the API clamps it).
            order: ``"asc"`` (oldest first) or ``"desc"`` (newest first).
            agent: only tasks of this agent (a ring task: any of its stages' agents).
            swarm: only tasks of this swarm.
            labels: only tasks carrying every one of these labels.
            text: only tasks whose payload holds this text (ASCII case-insensitive,
                UTF-8 payloads only, at most 256 bytes).

        With filters, one request examines a bounded number of tasks: a page may be
        short, or even empty, and still have a ``next_after`` (where the scan stopped);
        ``next_after`` is ``None`` only at the end of the listing.
        """
        if state is not None and state not in STATES:
            # The API refuses it too (400); say so before asking.
            raise ValueError(f"unknown state {state!r}; one of {', '.join(STATES)}")
        if order not in ("asc", "desc"):
            raise ValueError(f"unknown order {order!r}; one of asc, desc")
        label = None
        if labels:
            for k, v in labels.items():
                if not k or "=" in k or "," in k or "," in v:
                    raise ValueError(f"label filter {k!r}={v!r}: no empty key, no ',' or '=' in the key")
            label = ",".join(f"{k}={v}" for k, v in labels.items())
        answer = self.request(
            "GET",
            "/v1/tasks",
            query={
                "state": state,
                "after": after,
                "limit": int(limit),
                "order": None if order == "asc" else order,
                "agent": agent,
                "swarm": swarm,
                "label": label,
                "text": text,
            },
        )
        tasks = [Task.from_json(t) for t in answer.get("tasks", [])]
        next_after = answer.get("next_after")
        return TaskPage(tasks=tasks, next_after=int(next_after) if next_after is not None else None)

    def pages(
        self,
        *,
        state: Optional[str] = None,
        after: Optional[int] = None,
        page_size: int = 100,
        order: str = "asc",
        agent: Optional[str] = None,
        swarm: Optional[str] = None,
        labels: Optional[Mapping[str, str]] = None,
        text: Optional[str] = None,
    ) -> Iterator[TaskPage]:
        """Every page of tasks from ``after`` on, following ``next_after`` (a filtered
        page may be empty before the end)."""
        cursor = after
        while True:
            page = self.list_page(
                state=state,
                after=cursor,
                limit=page_size,
                order=order,
                agent=agent,
                swarm=swarm,
                labels=labels,
                text=text,
            )
            yield page
            if page.next_after is None:
                return
            cursor = page.next_after

    def list(
        self,
        state: Optional[str] = None,
        agent: Optional[str] = None,
        swarm: Optional[str] = None,
        *,
        after: Optional[int] = None,
        limit: Optional[int] = None,
        page_size: int = 100,
        order: str = "asc",
        labels: Optional[Mapping[str, str]] = None,
        text: Optional[str] = None,
    ) -> Iterator[Task]:
        """Iterate over tasks by id (oldest first, or newest with ``order="desc"``),
        fetching pages as needed. Every filter is the API's (see :meth:`list_page`).

        Args:
            state: only tasks in this state.
            agent: only tasks of this agent (a ring task: any of its stages' agents).
            swarm: only tasks of this swarm.
            after: start after this task id (in the listing's order).
            limit: yield at most this many tasks (``None``: all).
            page_size: tasks per request (1 to 1000).
            order: ``"asc"`` or ``"desc"``.
            labels: only tasks carrying every one of these labels.
            text: only tasks whose payload holds this text (ASCII case-insensitive).
        """
        if limit is not None and limit <= 0:
            return
        yielded = 0
        for page in self.pages(
            state=state,
            after=after,
            page_size=page_size,
            order=order,
            agent=agent,
            swarm=swarm,
            labels=labels,
            text=text,
        ):
            for t in page.tasks:
                yield t
                yielded += 1
                if limit is not None and yielded >= limit:
                    return

    # -- live output -------------------------------------------------------------

    def events(
        self,
        task_id: Union[int, str, Task],
        last_event_id: Optional[str] = None,
        *,
        timeout: Optional[float] = None,
        resume_for: float = RESUME_FOR_SECS,
    ) -> Iterator[Event]:
        """A task's live events (``GET /v1/tasks/{id}/events``, Server-Sent Events), as
        they come, until its ``end`` event (the last one yielded; its ``.task`` is the
        final task). For a task that is already final the stream replays what is
        stored and ends at once.

        Events are :class:`swarm_client.Event` objects (``event``, ``id``, ``data``
        parsed JSON): ``state``, ``attempt``, ``output`` (``.stream``, ``.output``
        bytes, ``.text``), ``gap`` and ``end``. The body is read as it arrives (a
        generator: nothing is asked until the first ``next()``; stopping early closes
        the connection).

        A stream that ends without ``end`` (its node lost the leadership or restarted,
        the connection broke, or it was silent for :data:`STREAM_IDLE_SECS`) is resumed
        with the last event's id as ``Last-Event-ID``, so no output is seen twice; a
        stream that stays broken for ``resume_for`` seconds raises the last error. With
        several API addresses the resumed stream may come from another node.

        Args:
            task_id: the task.
            last_event_id: start after this event's id (``<attempt>:<offset>``, an
                earlier :attr:`Event.id`) instead of from the beginning.
            timeout: the longest to follow the task, in seconds (``None``: until it
                ends).
            resume_for: how long a broken stream is retried.

        Raises:
            SwarmError: the API refused (``404 not_found`` for an unknown task, ``400
                bad_request`` for a malformed ``last_event_id``): not retried.
            SwarmConnectionError: the stream stayed broken for ``resume_for`` seconds.
            WaitTimeout: ``timeout`` passed before the task ended (``.task`` is the
                task as it is then).
        """
        tid = _task_id(task_id)
        path = f"/v1/tasks/{tid}/events"
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        last_id = last_event_id
        broken_since: Optional[float] = None
        #: The pause the stream asked for (``retry:``), if it did.
        retry: Optional[float] = None
        delay = _RESUME_DELAY_SECS

        def left() -> float:
            return float("inf") if deadline is None else deadline - time.monotonic()

        def timed_out() -> WaitTimeout:
            task = self.get(tid)
            return WaitTimeout(f"task {tid} is still {task.state} after {timeout:g}s", task)

        while True:
            if left() <= 0:
                raise timed_out()
            got_any = False
            error: SwarmClientError
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                stream = self._http.open_stream(
                    path, headers=headers, timeout=min(self.timeout, max(left(), 0.001))
                )
            except SwarmError as e:
                # A refusal (no such task, a bad id, a token that may not read it) is
                # final; a node that cannot answer now is not.
                if e.status < 500:
                    raise
                error = e
            except SwarmConnectionError as e:
                error = e
            else:
                parser = SseParser()
                try:
                    while True:
                        wait = min(STREAM_IDLE_SECS, left())
                        if wait <= 0:
                            raise timed_out()
                        try:
                            chunk = stream.read(wait)
                        except (OSError, http.client.HTTPException) as e:
                            if left() <= 0:
                                raise timed_out() from None
                            error = SwarmConnectionError(
                                f"the event stream of task {tid} from {stream.url} broke: "
                                f"{type(e).__name__}: {e}",
                                url=stream.url,
                            )
                            break
                        if not chunk:
                            error = SwarmConnectionError(
                                f"the event stream of task {tid} from {stream.url} ended "
                                "before the task did",
                                url=stream.url,
                            )
                            break
                        for ev in parser.feed(chunk):
                            got_any = True
                            if ev.id:
                                last_id = ev.id
                            yield ev
                            if ev.event == "end":
                                return
                finally:
                    stream.close()
                if parser.retry_ms is not None:
                    retry = parser.retry_ms / 1000.0
            # Broken: resume after a pause, unless it has been broken for too long.
            now = time.monotonic()
            if got_any:
                # This connection got somewhere: a new break starts now.
                broken_since = now
                delay = _RESUME_DELAY_SECS if retry is None else retry
            elif broken_since is None:
                broken_since = now
            elif now - broken_since > resume_for:
                raise error
            time.sleep(max(0.0, min(delay, left())))
            delay = min(max(delay, 0.05) * 2, 2.0)

    def follow(
        self,
        task_id: Union[int, str, Task],
        out: Optional[IO[Any]] = None,
        err: Optional[IO[Any]] = None,
        *,
        last_event_id: Optional[str] = None,
        timeout: Optional[float] = None,
        notes: bool = False,
    ) -> Task:
        """Show a task's output live (from :meth:`events`) until it ends, and return the
        final task.

        ``stderr`` output goes to ``err`` (default ``sys.stderr``); ``stdout``, an
        ``llm`` agent's ``tokens`` and an ``http`` agent's ``body`` to ``out`` (default
        ``sys.stdout``), each flushed as it comes. Text streams get the output decoded
        as UTF-8 (a character split between two pieces is put together; bytes that are
        not UTF-8 are replaced), binary streams (``sys.stdout.buffer``, ``BytesIO``)
        the bytes. With ``notes``, a line about each retry, failed attempt and gap goes
        to ``err``, as ``swarm task logs -f`` writes them.

        Raises:
            As :meth:`events`.
        """
        out = sys.stdout if out is None else out
        err = sys.stderr if err is None else err
        writers: Dict[int, _Writer] = {}

        def writer(target: IO[Any]) -> "_Writer":
            w = writers.get(id(target))
            if w is None:
                w = writers[id(target)] = _Writer(target)
            return w

        def flush_all() -> None:
            for w in writers.values():
                w.finish()

        for ev in self.events(task_id, last_event_id, timeout=timeout):
            data = ev.data if isinstance(ev.data, dict) else {}
            if ev.event == "output":
                target = err if ev.stream == "stderr" else out
                writer(target).write(ev.output or b"")
            elif ev.event == "attempt":
                flush_all()  # a new attempt's output does not continue the last one's
                if notes and data.get("event") == "started" and (ev.attempt or 0) > 1:
                    writer(err).note(f"== attempt {ev.attempt} on {data.get('worker', '?')}\n")
                elif notes and data.get("event") == "ended" and data.get("outcome") != "succeeded":
                    why = f": {data['error']}" if data.get("error") else ""
                    writer(err).note(
                        f"== attempt {ev.attempt} {data.get('outcome') or 'ended'}{why}\n"
                    )
            elif ev.event == "gap" and notes:
                lo, hi = data.get("from"), data.get("to")
                size = str(hi - lo) if isinstance(lo, int) and isinstance(hi, int) else "some"
                writer(err).note(
                    f"== {size} bytes of output not shown ({data.get('reason') or 'gap'})\n"
                )
            elif ev.event == "end":
                flush_all()
                task = ev.task
                if task is not None:
                    return task
        # events() only stops after `end`.
        raise SwarmConnectionError(f"the event stream of task {_task_id(task_id)} ended without its end")

    def logs(self, task_id: Union[int, str, Task]) -> Dict[str, Any]:
        """The log tails stored with a task's attempts (``GET /v1/tasks/{id}/logs``):
        ``{"id", "state", "attempts": [{"attempt", "stage", "worker", "running",
        "offset", "output_bytes", "pieces": [{"stream", "text"}]}]}``. ``offset`` is
        where the kept tail starts in the attempt's output (the bytes before it were not
        kept); a running attempt's tail is empty until it ends (follow it with
        :meth:`events`).

        Raises:
            SwarmError: ``404 not_found`` for an unknown (or purged) task.
        """
        tid = _task_id(task_id)
        answer = self.request("GET", f"/v1/tasks/{tid}/logs")
        if not isinstance(answer, dict):
            raise SwarmConnectionError(f"unexpected logs answer: {answer!r}")
        return answer

    # -- schedules ---------------------------------------------------------------

    def create_schedule(
        self,
        name: str,
        task: Union[SubmitSpec, Mapping[str, Any]],
        *,
        every: Optional[str] = None,
        cron: Optional[str] = None,
        catch_up: Optional[str] = None,
        max_catch_up: Optional[int] = None,
        paused: bool = False,
    ) -> Dict[str, Any]:
        """Define a schedule (``POST /v1/schedules``): ``task`` is submitted on every
        tick of ``every`` (e.g. ``"2s"``) or ``cron`` (e.g. ``"*/5 * * * *"``, UTC),
        exactly once per tick, under the idempotency key ``schedule:<name>:<tick_ms>``.
        ``catch_up``: ``"skip"`` (default: only the latest missed tick) or ``"all"`` (up
        to ``max_catch_up``). Returns the schedule's view."""
        body: Dict[str, Any] = {"name": name, "task": spec_to_json(task), "paused": paused}
        for key, value in (
            ("every", every),
            ("cron", cron),
            ("catch_up", catch_up),
            ("max_catch_up", max_catch_up),
        ):
            if value is not None:
                body[key] = value
        return self.request("POST", "/v1/schedules", body)

    def schedules(self) -> List[Dict[str, Any]]:
        """Every schedule: cadence, ``next_tick_ms``, ``fired``, ``skipped``,
        ``refused``, ``last_task``."""
        return list(self.request("GET", "/v1/schedules").get("schedules", []))

    def schedule(self, name: str) -> Dict[str, Any]:
        """One schedule's view."""
        return self.request("GET", f"/v1/schedules/{quote(name, safe='')}")

    def pause_schedule(self, name: str, paused: bool = True) -> Dict[str, Any]:
        """Pause a schedule, or resume it (``paused=False``) from its next tick after
        now."""
        verb = "pause" if paused else "resume"
        return self.request("POST", f"/v1/schedules/{quote(name, safe='')}/{verb}")

    def delete_schedule(self, name: str) -> None:
        """Delete a schedule; the tasks it submitted stay."""
        self.request("DELETE", f"/v1/schedules/{quote(name, safe='')}")

    # -- limits ------------------------------------------------------------------

    def set_limit(
        self,
        name: str,
        *,
        concurrency: Optional[int] = None,
        rate: Optional[str] = None,
        burst: Optional[int] = None,
    ) -> Dict[str, Any]:
        """Create or replace limit ``name`` (``PUT /v1/limits/{name}``).

        ``concurrency``: most running tasks per concurrency key ``name`` or
        ``name:...`` (a key's own limit overrides its class's). ``rate``: ``"N/s"``,
        ``"N/min"``, ``"N/h"``, the starts of tasks whose ``rate_limit`` is ``name``,
        with at most ``burst`` at once (default 1). Returns the limit's view.
        """
        body: Dict[str, Any] = {}
        if concurrency is not None:
            body["concurrency"] = concurrency
        if rate is not None:
            body["rate"] = rate
        if burst is not None:
            body["burst"] = burst
        return self.request("PUT", f"/v1/limits/{quote(name, safe='')}", body)

    def limits(self) -> List[Dict[str, Any]]:
        """Every limit, with the keys running under it and the tasks queued on it."""
        return list(self.request("GET", "/v1/limits").get("limits", []))

    def delete_limit(self, name: str) -> None:
        """Delete limit ``name``: tasks naming it run unlimited from then on."""
        self.request("DELETE", f"/v1/limits/{quote(name, safe='')}")

    # -- cluster -----------------------------------------------------------------

    def status(self) -> Dict[str, Any]:
        """``GET /v1/status``: every node's Raft state and health, the workers, queue
        counts by state, the queue limit, throughput and swarms."""
        answer = self.request("GET", "/v1/status")
        if not isinstance(answer, dict):
            raise SwarmConnectionError(f"unexpected status answer: {answer!r}")
        return answer

    def workers(self) -> List[Dict[str, Any]]:
        """``GET /v1/workers``: the connected workers (slots, running, labels, agents,
        draining)."""
        answer = self.request("GET", "/v1/workers")
        return list(answer.get("workers", [])) if isinstance(answer, dict) else []

    def ready(self) -> bool:
        """``GET /ready``: whether a leader exists and the node answering has applied its
        log (no token needed). ``False`` when it answers ``503``."""
        try:
            self._http.request("GET", "/ready", auth=False)
        except SwarmError as e:
            if e.status == 503:
                return False
            raise
        return True

    def health(self) -> bool:
        """``GET /health``: whether the node answering is up and its data dir takes a
        durable write. ``False`` when it answers ``503``."""
        try:
            self._http.request("GET", "/health", auth=False)
        except SwarmError as e:
            if e.status == 503:
                return False
            raise
        return True

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll :meth:`ready` (every 100 ms) until it holds, at most ``timeout`` seconds.

        Raises:
            SwarmClientError: not ready in time (with the last reason).
        """
        deadline = time.monotonic() + timeout
        last: Optional[BaseException] = None
        while time.monotonic() < deadline:
            try:
                if self.ready():
                    return
            except SwarmClientError as e:
                last = e
            time.sleep(0.1)
        raise SwarmClientError(f"the API at {self.api} was not ready within {timeout:g}s: {last}")



class _Writer:
    """Writes one output's pieces to a text stream (decoding UTF-8 across pieces) or a
    binary one, flushing each."""

    def __init__(self, target: IO[Any]) -> None:
        self.target = target
        self.binary = isinstance(target, (io.RawIOBase, io.BufferedIOBase))
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, data: bytes) -> None:
        if self.binary:
            self.target.write(data)
        else:
            text = self.decoder.decode(data)
            if text:
                self.target.write(text)
        self._flush()

    def note(self, line: str) -> None:
        self.finish()
        if self.binary:
            self.target.write(line.encode("utf-8"))
        else:
            self.target.write(line)
        self._flush()

    def finish(self) -> None:
        """Write out a character left incomplete (replaced)."""
        if not self.binary:
            text = self.decoder.decode(b"", final=True)
            if text:
                self.target.write(text)
                self._flush()

    def _flush(self) -> None:
        flush = getattr(self.target, "flush", None)
        if flush is not None:
            flush()
