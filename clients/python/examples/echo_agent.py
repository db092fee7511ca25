#!/usr/bin/env python3
"""An exec agent written with swarm_client.agent: upper-cases its payload.

Register it in a worker's agents file (the agent starts from an empty environment, so
tell Python where the package is unless it is installed for that interpreter):

    [agents.py_echo]
    command = "/usr/bin/python3"
    args = ["/path/to/clients/python/examples/echo_agent.py"]
    env_set = { PYTHONPATH = "/path/to/clients/python/src" }

It answers with a JSON object:

    {"upper": "<PAYLOAD IN UPPER CASE>", "patterns": <how many patterns it was handed>,
     "pattern_titles": [...], "task_id": <SWARM_TASK_ID>, "attempt": <SWARM_ATTEMPT>}

Two payload prefixes show the other helpers:

* ``learn:<title>`` also teaches the ReasoningBank a lesson titled <title> (the result
  then carries ``memory_items``);
* ``fail:<message>`` fails the attempt with <message> on stderr (exit status 1).
"""

from swarm_client import agent


def main() -> None:
    """Read the payload and patterns, answer."""
    text = agent.payload_text(errors="replace")
    if text.startswith("fail:"):
        agent.fail(text[len("fail:"):])
    handed = agent.patterns()
    result = {
        "upper": text.upper(),
        "patterns": len(handed),
        "pattern_titles": [p.title for p in handed],
        "task_id": agent.task_id(),
        "attempt": agent.attempt(),
    }
    if text.startswith("learn:"):
        title = text[len("learn:"):].strip() or "echo lesson"
        agent.respond(
            result,
            memory_items=[
                {
                    "title": title,
                    "description": "taught by the Python echo agent",
                    "content": f"the payload {text!r} was upper-cased",
                    "outcome": "success",
                }
            ],
        )
    agent.respond(result)


if __name__ == "__main__":
    main()
