"""Helpers for ``exec`` agents written in Python.

A swarm worker runs an ``exec`` agent once per attempt: the task's payload on stdin,
the result on stdout, exit status 0 for success (anything else fails the attempt, with
the tail of stderr as the error). The agent starts from an empty environment plus:

* ``SWARM_TASK_ID``, ``SWARM_ATTEMPT``, ``SWARM_EXECUTION_ID``, ``SWARM_AGENT``, and
  ``SWARM_IDEMPOTENCY_KEY`` when the task has one;
* ``SWARM_PATTERNS_FILE`` when the task asked for ReasoningBank patterns: a JSON file
  ``{"patterns": [{"id", "title", "description", "content", "outcome", "confidence",
  "score"}]}``;
* ``HOME`` and ``TMPDIR`` set to the attempt's private directory (removed afterwards);
* ``PATH``, and whatever the agents file passes on (``env``) or sets (``env_set``) —
  e.g. ``PYTHONPATH`` so the agent finds this package.

A minimal agent::

    from swarm_client import agent

    text = agent.payload_text()
    agent.respond({"upper": text.upper(), "patterns": len(agent.patterns())})

An agent teaches the ReasoningBank by returning ``memory_items`` in a JSON object
result; :func:`respond` writes that shape (see its docs).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Mapping, NoReturn, Optional, Sequence, Union

from .models import MemoryItem, Pattern

__all__ = [
    "payload",
    "payload_text",
    "payload_json",
    "patterns",
    "task_id",
    "attempt",
    "execution_id",
    "agent_name",
    "idempotency_key",
    "encode_result",
    "respond",
    "fail",
    "MAX_MEMORY_ITEMS",
]

#: The coordinator takes at most this many ``memory_items`` from one result.
MAX_MEMORY_ITEMS = 16

_payload: Optional[bytes] = None


def payload() -> bytes:
    """The task's payload: all of stdin, as bytes (read once, then kept)."""
    global _payload
    if _payload is None:
        stream = getattr(sys.stdin, "buffer", None)
        _payload = stream.read() if stream is not None else b""
    return _payload


def payload_text(errors: str = "strict") -> str:
    """The payload as UTF-8 text (``errors`` as in :meth:`bytes.decode`)."""
    return payload().decode("utf-8", errors=errors)


def payload_json() -> Any:
    """The payload parsed as JSON.

    Raises:
        ValueError: the payload is not JSON.
    """
    return json.loads(payload_text())


def patterns() -> List[Pattern]:
    """The ReasoningBank patterns handed to this attempt: the file named by
    ``SWARM_PATTERNS_FILE``, or ``[]`` when the task asked for none.

    Raises:
        ValueError: the file is not the JSON the worker writes.
        OSError: the file named cannot be read.
    """
    path = os.environ.get("SWARM_PATTERNS_FILE")
    if not path:
        return []
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    items = doc.get("patterns") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected {{\"patterns\": [...]}}")
    return [Pattern.from_json(p) for p in items if isinstance(p, dict)]


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    try:
        return int(value)
    except ValueError:
        return None


def task_id() -> Optional[int]:
    """The task's id (``SWARM_TASK_ID``); ``None`` outside a worker."""
    return _env_int("SWARM_TASK_ID")


def attempt() -> Optional[int]:
    """This attempt's number (``SWARM_ATTEMPT``); ``None`` outside a worker."""
    return _env_int("SWARM_ATTEMPT")


def execution_id() -> Optional[str]:
    """This execution's id (``SWARM_EXECUTION_ID``); ``None`` outside a worker."""
    return os.environ.get("SWARM_EXECUTION_ID")


def agent_name() -> Optional[str]:
    """The agent's name as the task named it (``SWARM_AGENT``)."""
    return os.environ.get("SWARM_AGENT")


def idempotency_key() -> Optional[str]:
    """The task's idempotency key (``SWARM_IDEMPOTENCY_KEY``), if it has one."""
    return os.environ.get("SWARM_IDEMPOTENCY_KEY")


MemoryItemLike = Union[MemoryItem, Mapping[str, Any]]


def _memory_item(i: int, item: MemoryItemLike) -> Dict[str, Any]:
    """One ``memory_items`` entry, checked as the coordinator checks it (it drops the
    whole list when one entry is bad, so a mistake is better caught here)."""
    if isinstance(item, MemoryItem):
        d = item.to_json()
    elif isinstance(item, Mapping):
        d = dict(item)
    else:
        raise TypeError(f"memory_items[{i}] is a MemoryItem or a mapping, not {type(item).__name__}")
    for key in ("title", "content"):
        if not isinstance(d.get(key), str) or not d[key].strip():
            raise ValueError(f"memory_items[{i}]: `{key}` must be a non-empty string")
    if "description" in d and not isinstance(d["description"], str):
        raise ValueError(f"memory_items[{i}]: `description` must be a string")
    outcome = d.get("outcome")
    if outcome is None:
        d.pop("outcome", None)
    elif outcome not in ("success", "failure"):
        raise ValueError(f"memory_items[{i}]: outcome {outcome!r} is not success/failure")
    return d


def encode_result(result: Any, memory_items: Optional[Sequence[MemoryItemLike]] = None) -> bytes:
    """The bytes :func:`respond` writes to stdout.

    Without ``memory_items``: ``bytes`` as they are, ``str`` as UTF-8, anything else as
    compact JSON.

    With ``memory_items`` (at most :data:`MAX_MEMORY_ITEMS`; each ``{"title",
    "content", "description"?, "outcome"?}`` or a :class:`MemoryItem`) the result must
    be a JSON object for the coordinator to read them, so:

    * a mapping result gets a ``"memory_items"`` key added:
      ``{...result, "memory_items": [...]}``;
    * any other result is wrapped: ``{"result": <result>, "memory_items": [...]}``
      (``bytes`` must then be UTF-8; they are put in as text).

    Raises:
        ValueError: a memory item is malformed, there are too many, or a mapping result
            already has a ``memory_items`` key.
        TypeError: the result is not JSON-serialisable.
    """
    if memory_items is None:
        if isinstance(result, (bytes, bytearray, memoryview)):
            return bytes(result)
        if isinstance(result, str):
            return result.encode("utf-8")
        return json.dumps(result, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    items = list(memory_items)
    if len(items) > MAX_MEMORY_ITEMS:
        raise ValueError(
            f"at most {MAX_MEMORY_ITEMS} memory_items are taken from one result, got {len(items)}"
        )
    checked = [_memory_item(i, it) for i, it in enumerate(items)]
    if isinstance(result, Mapping):
        if "memory_items" in result:
            raise ValueError("the result already has a `memory_items` key; pass them in one place")
        doc: Dict[str, Any] = dict(result)
    else:
        if isinstance(result, (bytes, bytearray, memoryview)):
            result = bytes(result).decode("utf-8")
        doc = {"result": result}
    doc["memory_items"] = checked
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def respond(result: Any, memory_items: Optional[Sequence[MemoryItemLike]] = None) -> NoReturn:
    """Write the result to stdout (see :func:`encode_result` for its shape) and exit 0:
    the attempt succeeds with it as the task's output."""
    data = encode_result(result, memory_items)
    out = sys.stdout
    out.flush()
    stream = getattr(out, "buffer", None)
    if stream is not None:
        stream.write(data)
        stream.flush()
    else:
        out.write(data.decode("utf-8"))
        out.flush()
    sys.exit(0)


def fail(message: str, code: int = 1) -> NoReturn:
    """Write ``message`` to stderr and exit with ``code`` (non-zero): the attempt fails,
    and the task's error ends with the message (retried up to its ``max_attempts``).

    Raises:
        ValueError: ``code`` is 0, or outside 1..255.
    """
    if not 1 <= int(code) <= 255:
        raise ValueError(f"an exit code that fails the attempt is 1..255, got {code}")
    sys.stdout.flush()
    sys.stderr.write(message if message.endswith("\n") else message + "\n")
    sys.stderr.flush()
    sys.exit(int(code))
