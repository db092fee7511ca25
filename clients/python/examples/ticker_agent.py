#!/usr/bin/env python3
"""An exec agent whose output is worth following live: it prints a line, waits, prints
the next, ... then a last line on stderr.

The payload is a number of lines (default 5), or a JSON object
``{"lines": <n>, "interval": <seconds between lines, default 0.2>}``. Stdout gets
``tick <i>/<n> ✓`` lines (so the task's result is those lines); stderr gets
``ticker done`` at the end. Every line is flushed as it is written: a worker streams an
attempt's output to watchers as the agent writes it, and Python buffers stdout when it
is not a terminal, so a live agent flushes (``print(..., flush=True)``).

Register it like ``echo_agent.py``:

    [agents.py_ticker]
    command = "/usr/bin/python3"
    args = ["/path/to/clients/python/examples/ticker_agent.py"]
    env_set = { PYTHONPATH = "/path/to/clients/python/src" }

and follow a task with ``Client.follow(task_id)`` or ``swarm task logs -f ID``.
"""

import sys
import time

from swarm_client import agent


def main() -> None:
    """Read how many lines, print them one by one."""
    lines, interval = 5, 0.2
    text = agent.payload_text(errors="replace").strip()
    if text.startswith("{"):
        spec = agent.payload_json()
        lines = int(spec.get("lines", lines))
        interval = float(spec.get("interval", interval))
    elif text:
        lines = int(text)
    for i in range(1, lines + 1):
        # Bytes, so the text is UTF-8 whatever the (empty) environment's locale.
        sys.stdout.buffer.write(f"tick {i}/{lines} \u2713\n".encode("utf-8"))
        sys.stdout.buffer.flush()
        if i < lines:
            time.sleep(interval)
    print("ticker done", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
