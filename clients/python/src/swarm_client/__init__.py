"""Python client for the swarm coordinator's HTTP API, and helpers for exec agents.

* :class:`Client` — submit, batch-submit, read, wait for, cancel and list tasks; follow
  their live output (:meth:`Client.events`, :meth:`Client.follow`) and read their stored
  logs; cluster status; any other JSON route through :meth:`Client.request`.
* :mod:`swarm_client.agent` — for ``exec`` agents written in Python: read the payload
  and the ReasoningBank patterns, answer (teaching the bank with ``memory_items``), fail.

Standard library only; Python 3.9 or later.
"""

from .callbacks import verify_callback
from .client import DEFAULT_API, Client
from .errors import SwarmClientError, SwarmConnectionError, SwarmError, WaitTimeout
from .events import Event
from .models import (
    FINAL_STATES,
    STATES,
    Attempt,
    MemoryItem,
    Pattern,
    SubmitSpec,
    Task,
    TaskPage,
    encode_payload,
)

__version__ = "0.1.0"

__all__ = [
    "verify_callback",
    "Client",
    "DEFAULT_API",
    "SwarmClientError",
    "SwarmError",
    "SwarmConnectionError",
    "WaitTimeout",
    "Task",
    "Attempt",
    "Event",
    "TaskPage",
    "SubmitSpec",
    "Pattern",
    "MemoryItem",
    "STATES",
    "FINAL_STATES",
    "encode_payload",
    "__version__",
]
