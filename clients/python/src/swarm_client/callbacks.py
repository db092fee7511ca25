"""Checking a task callback's signature on the receiving side.

The coordinator POSTs ``{"event": "task.finished", "task": ...}`` with the header
``Swarm-Signature: t=<unix ms>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>``.
"""

import hashlib
import hmac
import time
from typing import Optional, Union

#: How old a signature :func:`verify_callback` accepts by default (five minutes).
DEFAULT_TOLERANCE_MS = 5 * 60 * 1000


def verify_callback(
    secret: Union[str, bytes],
    signature: str,
    body: bytes,
    *,
    tolerance_ms: Optional[int] = DEFAULT_TOLERANCE_MS,
    now_ms: Optional[int] = None,
) -> bool:
    """Whether ``signature`` (the ``Swarm-Signature`` header) signs ``body`` (the raw
    request body, before any JSON parsing) with ``secret`` (the contents of the
    coordinators' ``--callback-secret-file``, surrounding whitespace stripped).

    A signature older than ``tolerance_ms`` (``None``: any age) is refused, so a
    captured request cannot be replayed later. Deliveries are at least once: dedupe by
    the ``Swarm-Task-Id`` header.
    """
    if isinstance(secret, str):
        secret = secret.strip().encode()
    parts = dict(p.split("=", 1) for p in signature.split(",") if "=" in p)
    t, v1 = parts.get("t"), parts.get("v1")
    if t is None or v1 is None or not t.isdigit():
        return False
    if tolerance_ms is not None:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        if abs(now - int(t)) > tolerance_ms:
            return False
    expected = hmac.new(secret, t.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, v1)
