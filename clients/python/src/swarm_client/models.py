"""Data types of the swarm API: tasks as the API shows them, submit specs, patterns.

The JSON shapes follow ``proto/src/api.rs`` in the swarm repository:

* a task's input and result are bytes; in JSON they appear as ``payload``/``output``
  when they are valid UTF-8 and as ``payload_base64``/``output_base64`` otherwise;
* on submit, a JSON string ``payload`` is delivered to the agent as its UTF-8 text, and
  binary input goes in ``payload_base64``.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

__all__ = [
    "STATES",
    "FINAL_STATES",
    "Payload",
    "Attempt",
    "Task",
    "TaskPage",
    "SubmitSpec",
    "Pattern",
    "MemoryItem",
    "encode_payload",
]

#: Every task state, in lifecycle order.
STATES: Tuple[str, ...] = (
    "waiting",
    "awaiting_approval",
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "dead_lettered",
)

#: States a task never leaves.
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "dead_lettered"})

#: What may be given as a task's payload: bytes and ``str`` are sent as they are; any
#: other JSON-serialisable value is sent as its compact JSON text; ``None`` is empty.
Payload = Any


def encode_payload(payload: Payload) -> Dict[str, str]:
    """The submit-body fields carrying ``payload`` so the agent receives exactly:

    * ``bytes``/``bytearray``/``memoryview``: those bytes (as ``payload`` text when they
      are UTF-8, else as ``payload_base64``);
    * ``str``: its UTF-8 encoding;
    * ``None``: no payload (the agent reads an empty stdin);
    * anything else: ``json.dumps(value, separators=(",", ":"), ensure_ascii=False)``,
      serialised here (not by the coordinator) so the agent gets exactly this text, key
      order included.

    Raises:
        TypeError: the value is not JSON-serialisable.
    """
    if payload is None:
        return {}
    if isinstance(payload, (bytes, bytearray, memoryview)):
        raw = bytes(payload)
        try:
            return {"payload": raw.decode("utf-8")}
        except UnicodeDecodeError:
            return {"payload_base64": base64.b64encode(raw).decode("ascii")}
    if isinstance(payload, str):
        return {"payload": payload}
    return {"payload": json.dumps(payload, separators=(",", ":"), ensure_ascii=False)}


def _bytes_field(d: Mapping[str, Any], text_key: str, b64_key: str) -> Optional[bytes]:
    """Bytes shown as ``text_key`` (UTF-8 text) or ``b64_key`` (base64), or ``None``."""
    text = d.get(text_key)
    if isinstance(text, str):
        return text.encode("utf-8")
    b64 = d.get(b64_key)
    if isinstance(b64, str):
        return base64.b64decode(b64, validate=True)
    return None


def _opt_int(v: Any) -> Optional[int]:
    return int(v) if v is not None else None


@dataclass
class Attempt:
    """One attempt at running a task, as recorded by the coordinator."""

    attempt: int
    worker: str
    started_at_ms: int
    stage: int = 0
    finished_at_ms: Optional[int] = None
    #: ``succeeded``, ``failed``, ``lost``, ``cancelled`` or ``released``; ``None`` while running.
    outcome: Optional[str] = None
    error: Optional[str] = None
    #: Bytes of output the attempt produced (all streams), as reported at its end (0
    #: while it runs); its last bytes are kept (``Client.logs``).
    output_bytes: int = 0
    #: Tokens an ``llm`` attempt used: ``{"model", "prompt_tokens",
    #: "completion_tokens"}``; ``None`` for other agents.
    usage: Optional[Dict[str, Any]] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Attempt":
        """Parse one entry of a task view's ``attempts``."""
        return cls(
            attempt=int(d.get("attempt", 0)),
            worker=str(d.get("worker", "")),
            started_at_ms=int(d.get("started_at_ms", 0)),
            stage=int(d.get("stage", 0)),
            finished_at_ms=_opt_int(d.get("finished_at_ms")),
            outcome=d.get("outcome"),
            error=d.get("error"),
            output_bytes=int(d.get("output_bytes") or 0),
            usage=dict(d["usage"]) if isinstance(d.get("usage"), dict) else None,
            raw=dict(d),
        )


_TASK_KEYS = frozenset(
    {
        "id",
        "agent",
        "state",
        "priority",
        "timeout_ms",
        "max_attempts",
        "idempotency_key",
        "labels",
        "patterns",
        "payload",
        "payload_base64",
        "attempts",
        "output",
        "output_base64",
        "error",
        "created_at_ms",
        "finished_at_ms",
        "expires_at_ms",
        "swarm",
        "stages",
        "stage",
        "stage_outputs",
        "moves",
        "approval",
        "callback",
    }
)


@dataclass
class Task:
    """A task as the API shows it (``GET /v1/tasks/{id}``).

    ``payload`` and ``output`` are bytes; :attr:`text`, :meth:`json` and
    :attr:`payload_text` decode them. The whole JSON object the API answered is kept in
    :attr:`raw`, so fields this version does not know are not lost (:attr:`extra` lists
    them).
    """

    id: int
    agent: str
    #: One of :data:`STATES` (kept as the API's string, so a newer state is not an error).
    state: str
    priority: int = 0
    timeout_ms: int = 0
    max_attempts: int = 0
    idempotency_key: Optional[str] = None
    labels: Dict[str, str] = field(default_factory=dict)
    #: ReasoningBank patterns handed to the agent.
    patterns: int = 0
    payload: bytes = b""
    attempts: List[Attempt] = field(default_factory=list)
    #: The agent's result (stdout for exec agents); ``None`` until it has one.
    output: Optional[bytes] = None
    error: Optional[str] = None
    created_at_ms: int = 0
    finished_at_ms: Optional[int] = None
    #: When the finished task is purged (its retention ends).
    expires_at_ms: Optional[int] = None
    swarm: str = "default"
    #: A ring task's stages, in order; empty otherwise.
    stages: List[str] = field(default_factory=list)
    stage: int = 0
    stage_outputs: List[str] = field(default_factory=list)
    moves: int = 0
    #: Tasks this one runs after (graph parents), and tasks that run after it.
    parents: List[int] = field(default_factory=list)
    children: List[int] = field(default_factory=list)
    #: Parents that have not succeeded yet (a ``waiting`` task).
    waiting_on: int = 0
    #: The task's step name in its graph.
    step: Optional[str] = None
    #: Its concurrency key and the rate limit it draws from, if any.
    concurrency_key: Optional[str] = None
    rate_limit: Optional[str] = None
    #: A task that requires approval: ``{"timeout_ms", "deadline_ms", "decision":
    #: {"approved", "by", "at_ms", "comment"}}`` (keys absent when unset); ``None``
    #: otherwise.
    approval: Optional[Dict[str, Any]] = None
    #: A task with a callback: ``{"url", "state": "pending" | "delivered" | "failed",
    #: "attempts", "status", "error", "at_ms"}`` (keys absent when unset); ``None``
    #: otherwise.
    callback: Optional[Dict[str, Any]] = None
    #: The API's JSON object, unchanged.
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Task":
        """Parse a task view (a JSON object as the API returns it)."""
        payload = _bytes_field(d, "payload", "payload_base64")
        return cls(
            id=int(d["id"]),
            agent=str(d.get("agent", "")),
            state=str(d.get("state", "")),
            priority=int(d.get("priority", 0)),
            timeout_ms=int(d.get("timeout_ms", 0)),
            max_attempts=int(d.get("max_attempts", 0)),
            idempotency_key=d.get("idempotency_key"),
            labels=dict(d.get("labels") or {}),
            patterns=int(d.get("patterns", 0)),
            payload=payload if payload is not None else b"",
            attempts=[Attempt.from_json(a) for a in d.get("attempts") or []],
            output=_bytes_field(d, "output", "output_base64"),
            error=d.get("error"),
            created_at_ms=int(d.get("created_at_ms", 0)),
            finished_at_ms=_opt_int(d.get("finished_at_ms")),
            expires_at_ms=_opt_int(d.get("expires_at_ms")),
            swarm=str(d.get("swarm", "default")),
            stages=list(d.get("stages") or []),
            stage=int(d.get("stage", 0)),
            stage_outputs=list(d.get("stage_outputs") or []),
            moves=int(d.get("moves", 0)),
            parents=[int(p) for p in d.get("parents") or []],
            children=[int(c) for c in d.get("children") or []],
            waiting_on=int(d.get("waiting_on", 0)),
            step=d.get("step"),
            concurrency_key=d.get("concurrency_key"),
            rate_limit=d.get("rate_limit"),
            approval=dict(d["approval"]) if isinstance(d.get("approval"), dict) else None,
            callback=dict(d["callback"]) if isinstance(d.get("callback"), dict) else None,
            raw=dict(d),
        )

    @property
    def is_final(self) -> bool:
        """Whether the task is in a state it never leaves."""
        return self.state in FINAL_STATES

    @property
    def succeeded(self) -> bool:
        """Whether the task succeeded."""
        return self.state == "succeeded"

    @property
    def text(self) -> Optional[str]:
        """The output as UTF-8 text (``None`` when there is no output yet).

        Raises:
            UnicodeDecodeError: the output is binary.
        """
        return None if self.output is None else self.output.decode("utf-8")

    def json(self) -> Any:
        """The output parsed as JSON.

        Raises:
            ValueError: there is no output, or it is not JSON.
        """
        if self.output is None:
            raise ValueError(f"task {self.id} has no output (state {self.state})")
        return json.loads(self.output.decode("utf-8"))

    @property
    def payload_text(self) -> str:
        """The payload as UTF-8 text.

        Raises:
            UnicodeDecodeError: the payload is binary.
        """
        return self.payload.decode("utf-8")

    @property
    def extra(self) -> Dict[str, Any]:
        """Fields of :attr:`raw` this version of the client does not know."""
        return {k: v for k, v in self.raw.items() if k not in _TASK_KEYS}


@dataclass
class TaskPage:
    """One page of ``GET /v1/tasks``: the tasks, and the cursor of the next page."""

    tasks: List[Task]
    #: Pass as ``after`` to get the next page; ``None`` on the last page.
    next_after: Optional[int] = None


@dataclass
class SubmitSpec:
    """One task to submit (the body of ``POST /v1/tasks``, one entry of a batch).

    ``payload`` follows :func:`encode_payload`. Fields left ``None`` take the
    coordinator's defaults.
    """

    agent: Optional[str] = None
    payload: Payload = None
    priority: Optional[int] = None
    timeout_ms: Optional[int] = None
    max_attempts: Optional[int] = None
    labels: Optional[Mapping[str, str]] = None
    swarm: Optional[str] = None
    idempotency_key: Optional[str] = None
    patterns: Optional[int] = None
    retain_ms: Optional[int] = None
    #: Tasks this one runs after: it waits until all succeeded, and its agent receives
    #: ``{"payload": ..., "parents": {"<step or id>": <output>}}``.
    depends_on: Optional[List[int]] = None
    #: Tasks with the same key share the key's limit on running tasks.
    concurrency_key: Optional[str] = None
    #: The named rate limit each start of the task draws from.
    rate_limit: Optional[str] = None
    #: Hold the task in ``awaiting_approval`` until :meth:`Client.approve` queues it
    #: or :meth:`Client.reject` cancels it.
    requires_approval: bool = False
    #: With ``requires_approval``: fail the task (``approval_timeout``) if no decision
    #: came this long after it began awaiting approval.
    approval_timeout_ms: Optional[int] = None
    #: POST the finished task's view to this http(s) URL, signed with the cluster's
    #: callback secret (``Swarm-Signature``) and retried until it answers 2xx.
    callback_url: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        """The JSON body the API takes (only the fields that are set)."""
        body: Dict[str, Any] = {}
        if self.agent:
            body["agent"] = self.agent
        body.update(encode_payload(self.payload))
        for key in (
            "priority",
            "timeout_ms",
            "max_attempts",
            "swarm",
            "idempotency_key",
            "patterns",
            "retain_ms",
            "concurrency_key",
            "rate_limit",
            "approval_timeout_ms",
            "callback_url",
        ):
            value = getattr(self, key)
            if value is not None:
                body[key] = value
        if self.depends_on:
            body["depends_on"] = [int(p) for p in self.depends_on]
        if self.requires_approval or self.approval_timeout_ms is not None:
            body["requires_approval"] = True
        if self.labels:
            body["labels"] = dict(self.labels)
        return body


def spec_to_json(spec: Union[SubmitSpec, Mapping[str, Any]]) -> Dict[str, Any]:
    """A submit body from a :class:`SubmitSpec`, or from a mapping of the API's fields.

    A mapping is passed on as it is (the coordinator refuses unknown fields with ``400
    invalid_json``), except that a ``payload`` that is not a string is encoded with
    :func:`encode_payload`.
    """
    if isinstance(spec, SubmitSpec):
        return spec.to_json()
    if not isinstance(spec, Mapping):
        raise TypeError(f"a task to submit is a SubmitSpec or a mapping, not {type(spec).__name__}")
    body = dict(spec)
    if "payload" in body and not isinstance(body["payload"], str):
        value = body.pop("payload")
        body.update(encode_payload(value))
    return body


@dataclass
class Pattern:
    """A ReasoningBank pattern handed to an exec agent (``SWARM_PATTERNS_FILE``)."""

    id: str
    title: str
    description: str = ""
    content: str = ""
    #: ``success`` or ``failure``: what the pattern was learnt from.
    outcome: str = ""
    #: Posterior mean of the pattern working, 0..1.
    confidence: float = 0.0
    #: Retrieval score (similarity, recency and confidence combined).
    score: float = 0.0
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Pattern":
        """Parse one entry of the patterns file."""
        return cls(
            id=str(d.get("id", "")),
            title=str(d.get("title", "")),
            description=str(d.get("description", "")),
            content=str(d.get("content", "")),
            outcome=str(d.get("outcome", "")),
            confidence=float(d.get("confidence", 0.0)),
            score=float(d.get("score", 0.0)),
            raw=dict(d),
        )


@dataclass
class MemoryItem:
    """A lesson an agent teaches the ReasoningBank (one entry of ``memory_items``).

    ``title`` and ``content`` must not be empty; ``outcome`` is ``"success"``,
    ``"failure"`` or ``None`` (the task's own outcome).
    """

    title: str
    content: str
    description: str = ""
    outcome: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        """The JSON object the coordinator reads (``AgentMemoryItem``)."""
        d: Dict[str, Any] = {
            "title": self.title,
            "description": self.description,
            "content": self.content,
        }
        if self.outcome is not None:
            d["outcome"] = self.outcome
        return d
