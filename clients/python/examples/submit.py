#!/usr/bin/env python3
"""Submit tasks with swarm_client and print their results.

    SWARM_API=http://127.0.0.1:8080 SWARM_TOKEN_FILE=swarm-data/api-token \
        python3 examples/submit.py [AGENT] [PAYLOAD...]

With no arguments it runs the built-in ``echo`` agent on "hello from python". It
submits one task and waits for it, then a batch of three, then lists the last tasks.
``SWARM_CA`` names the cluster's ca.pem for an https:// API.
"""

import sys
from typing import List

from swarm_client import Client, SwarmClientError


def main(argv: List[str]) -> int:
    """Run the example; the exit status is 0 when every task succeeded."""
    agent = argv[1] if len(argv) > 1 else "echo"
    payload = " ".join(argv[2:]) if len(argv) > 2 else "hello from python"
    try:
        with Client() as client:
            task = client.submit(agent, payload, wait=60)
            print(f"task {task.id}: {task.state} -> {task.text!r}")
            if task.error:
                print(f"  error: {task.error}")

            batch = client.submit_batch(
                [{"agent": agent, "payload": f"{payload} #{i}"} for i in range(3)]
            )
            done = [client.wait(t.id, timeout=60) for t in batch]
            for t in done:
                print(f"batch task {t.id}: {t.state} -> {t.text!r}")

            counts = client.status()["queue"]
            print("queue:", ", ".join(f"{k}={v}" for k, v in counts.items()))
            ok = task.succeeded and all(t.succeeded for t in done)
            return 0 if ok else 1
    except SwarmClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
