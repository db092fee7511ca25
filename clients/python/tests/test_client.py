"""Tests of swarm_client against a real, running swarm cluster.

Configured by the environment (every test here is skipped, saying why, without it):

* ``SWARM_TEST_API`` — the API base URL of a running coordinator with at least one
  worker connected (e.g. ``http://127.0.0.1:8080``);
* ``SWARM_TEST_TOKEN`` — an ``admin`` (or ``operate``) token of that cluster;
* ``SWARM_TEST_AGENTS_DIR`` — the directory holding the ``agents.toml`` that worker
  runs, registering ``examples/echo_agent.py`` and ``examples/ticker_agent.py`` as
  ``exec`` agents (their names are read from the file). Without it the Python-agent and
  live-output tests are skipped.
* ``SWARM_TEST_TLS_API``, ``SWARM_TEST_TLS_CA``, ``SWARM_TEST_OTHER_CA`` — optional: an
  ``https://`` API (same token, a worker connected), its cluster's ``ca.pem``, and
  another cluster's ``ca.pem``, for the TLS tests.

``cli/tests/e2e/python_client.rs`` starts such clusters and runs this file.
"""

from __future__ import annotations

import io
import os
import re
import socket
import tempfile
import time
import unittest
import uuid
from typing import Any, Dict, List, Optional, Union
from unittest import mock

from swarm_client import (
    Client,
    Event,
    SubmitSpec,
    SwarmConnectionError,
    SwarmError,
    Task,
    WaitTimeout,
)

API = os.environ.get("SWARM_TEST_API", "")
TOKEN = os.environ.get("SWARM_TEST_TOKEN", "")
AGENTS_DIR = os.environ.get("SWARM_TEST_AGENTS_DIR", "")
TLS_API = os.environ.get("SWARM_TEST_TLS_API", "")
TLS_CA = os.environ.get("SWARM_TEST_TLS_CA", "")
OTHER_CA = os.environ.get("SWARM_TEST_OTHER_CA", "")

NEEDS_CLUSTER = "set SWARM_TEST_API and SWARM_TEST_TOKEN to a running swarm cluster to run these tests"

#: Longest any wait here may take (CI machines are slow; nothing asserts on speed).
WAIT = 90.0


def _closed_port() -> int:
    """A local TCP port nothing listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def python_agent_name(agents_dir: str, script: str = "echo_agent.py") -> Optional[str]:
    """The name under which ``agents.toml`` in ``agents_dir`` registers
    ``examples/<script>``, or ``None``."""
    path = os.path.join(agents_dir, "agents.toml")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for m in re.finditer(r"^\[agents\.([A-Za-z0-9_.-]+)\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S):
        if script in m.group(2):
            return m.group(1)
    return None


@unittest.skipUnless(API and TOKEN, NEEDS_CLUSTER)
class LiveTest(unittest.TestCase):
    """Tasks through a real coordinator and worker."""

    client: Client

    @classmethod
    def setUpClass(cls) -> None:
        cls.client = Client(API, token=TOKEN, timeout=30)
        cls.client.wait_ready(WAIT)
        deadline = time.monotonic() + WAIT
        while not cls.client.workers():
            if time.monotonic() > deadline:
                raise AssertionError("no worker connected to the test cluster")
            time.sleep(0.1)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.client.close()

    # -- submit and wait ---------------------------------------------------------

    def test_submit_echo_and_wait(self) -> None:
        t = self.client.submit("echo", "hello from python")
        self.assertIsInstance(t, Task)
        self.assertEqual(t.agent, "echo")
        self.assertEqual(t.payload, b"hello from python")
        self.assertIn(t.state, ("queued", "running", "succeeded"))
        done = self.client.wait(t.id, timeout=WAIT)
        self.assertEqual(done.state, "succeeded", done)
        self.assertTrue(done.is_final and done.succeeded)
        self.assertEqual(done.output, b"hello from python")
        self.assertEqual(done.text, "hello from python")
        self.assertEqual(done.swarm, "default")
        self.assertGreaterEqual(len(done.attempts), 1)
        self.assertEqual(done.attempts[-1].outcome, "succeeded")
        self.assertEqual(done.raw["id"], t.id)

        # submit(wait=...) answers with the finished task in one call.
        t2 = self.client.submit("echo", "waited", wait=WAIT)
        self.assertEqual((t2.state, t2.text), ("succeeded", "waited"))

    def test_a_graph_and_a_dependant_run_after_their_parents(self) -> None:
        ids = self.client.submit_graph(
            [
                ("a", [], {"agent": "echo", "payload": "A"}),
                ("b", ["a"], SubmitSpec(agent="echo", payload={"n": 2})),
            ]
        )
        self.assertEqual(sorted(ids), ["a", "b"])
        b = self.client.wait(ids["b"], timeout=30)
        self.assertEqual(b.state, "succeeded")
        self.assertEqual(b.parents, [ids["a"]])
        self.assertEqual(b.step, "b")
        self.assertEqual(b.json(), {"payload": {"n": 2}, "parents": {"a": "A"}})
        after = self.client.submit("echo", "z", depends_on=[ids["b"]], wait=30)
        self.assertEqual(after.json()["parents"]["b"]["parents"]["a"], "A")
        self.assertIn(after.id, self.client.get(ids["b"]).children)

    def test_limits_keys_and_buckets(self) -> None:
        view = self.client.set_limit("pytenant", concurrency=1)
        self.assertEqual(view["concurrency"], 1)
        self.client.set_limit("pyrate", rate="20/s", burst=2)
        names = [l["name"] for l in self.client.limits()]
        self.assertIn("pytenant", names)
        self.assertIn("pyrate", names)
        tasks = [
            self.client.submit("sleep", {"ms": 20}, concurrency_key="pytenant:a", rate_limit="pyrate")
            for _ in range(6)
        ]
        spans = []
        for t in tasks:
            done = self.client.wait(t.id, timeout=30)
            self.assertEqual(done.state, "succeeded")
            self.assertEqual(done.concurrency_key, "pytenant:a")
            self.assertEqual(done.rate_limit, "pyrate")
            spans.extend((a.started_at_ms, a.finished_at_ms) for a in done.attempts)
        # One at a time: no two attempts of the key overlap.
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:]):
            self.assertLessEqual(end, start)
        with self.assertRaises(SwarmError) as e:
            self.client.submit("echo", "x", rate_limit="no-such-limit")
        self.assertEqual(e.exception.status, 404)
        self.assertEqual(e.exception.code, "unknown_limit")
        self.client.delete_limit("pyrate")
        self.client.delete_limit("pytenant")
        self.assertNotIn("pyrate", [l["name"] for l in self.client.limits()])

    def test_a_schedule_ticks_pauses_and_is_deleted(self) -> None:
        name = f"py-{uuid.uuid4().hex[:8]}"
        view = self.client.create_schedule(name, {"agent": "echo", "payload": "tick"}, every="1s")
        self.assertEqual(view["every_ms"], 1000)
        deadline = time.monotonic() + 30
        while self.client.schedule(name)["fired"] < 2:
            self.assertLess(time.monotonic(), deadline, "the schedule did not tick twice")
            time.sleep(0.2)
        view = self.client.pause_schedule(name)
        self.assertTrue(view["paused"])
        task = self.client.wait(view["last_task"], timeout=30)
        self.assertEqual(task.output, b"tick")
        self.assertTrue(task.idempotency_key.startswith(f"schedule:{name}:"))
        self.assertIn(name, [s["name"] for s in self.client.schedules()])
        self.assertFalse(self.client.pause_schedule(name, paused=False)["paused"])
        self.client.delete_schedule(name)
        with self.assertRaises(SwarmError) as e:
            self.client.schedule(name)
        self.assertEqual(e.exception.code, "unknown_schedule")

    def test_approve_and_reject_tasks_awaiting_approval(self) -> None:
        t = self.client.submit("echo", "gated", requires_approval=True)
        self.assertEqual(t.state, "awaiting_approval")
        self.assertEqual(t.approval, {})
        self.assertFalse(t.is_final)
        approved = self.client.approve(t, comment="fine by me")
        self.assertEqual(approved.state, "queued")
        done = self.client.wait(t.id, timeout=WAIT)
        self.assertEqual((done.state, done.text), ("succeeded", "gated"))
        decision = done.approval["decision"]
        self.assertEqual((decision["approved"], decision["comment"]), (True, "fine by me"))
        self.assertTrue(decision["by"])
        # Deciding again is refused, naming the state.
        e = self.assertRefused(409, "not_awaiting_approval", self.client.approve, t.id)
        self.assertIn("succeeded", e.message)
        self.assertRefused(404, "not_found", self.client.reject, 987654321)

        spec = SubmitSpec(agent="echo", payload="no", requires_approval=True, approval_timeout_ms=600_000)
        r = self.client.submit_spec(spec)
        self.assertEqual(r.approval["timeout_ms"], 600_000)
        self.assertIsInstance(r.approval["deadline_ms"], int)
        rejected = self.client.reject(r.id, "not this one")
        self.assertEqual(rejected.state, "cancelled")
        self.assertIn("not this one", rejected.error)
        self.assertIs(rejected.approval["decision"]["approved"], False)

    def test_payload_encodings_round_trip(self) -> None:
        binary = bytes(range(256))
        t = self.client.submit("echo", binary, wait=WAIT)
        self.assertEqual(t.state, "succeeded")
        self.assertEqual(t.payload, binary)
        self.assertEqual(t.output, binary)  # came back as output_base64
        self.assertIn("output_base64", t.raw)
        with self.assertRaises(UnicodeDecodeError):
            _ = t.text

        doc = {"b": 1, "a": [1, 2, {"é": None}]}
        t = self.client.submit("echo", doc, wait=WAIT)
        self.assertEqual(t.text, '{"b":1,"a":[1,2,{"é":null}]}')
        self.assertEqual(t.json(), doc)

        t = self.client.submit("echo", None, wait=WAIT)
        self.assertEqual((t.state, t.output), ("succeeded", b""))

    def test_batch_of_100_all_succeed(self) -> None:
        specs: List[Union[SubmitSpec, Dict[str, Any]]] = []
        for i in range(100):
            if i % 2:
                specs.append(SubmitSpec(agent="echo", payload=f"batch {i}", priority=i % 3))
            else:
                specs.append({"agent": "echo", "payload": {"i": i}})
        tasks = self.client.submit_batch(specs)
        self.assertEqual(len(tasks), 100)
        self.assertEqual(len({t.id for t in tasks}), 100)
        for i, t in enumerate(tasks):
            want = f"batch {i}" if i % 2 else f'{{"i":{i}}}'
            self.assertEqual(t.payload_text, want)
        done = [self.client.wait(t, timeout=WAIT) for t in tasks]
        self.assertEqual([t.state for t in done], ["succeeded"] * 100)
        for i, t in enumerate(done):
            self.assertEqual(t.output, tasks[i].payload)
        self.assertEqual(self.client.submit_batch([]), [])

    # -- read and list -----------------------------------------------------------

    def test_get_list_and_filters(self) -> None:
        key = f"py-{uuid.uuid4()}"
        first = self.client.submit("echo", "one", idempotency_key=key, wait=WAIT)
        again = self.client.submit_raw({"agent": "echo", "payload": "one", "idempotency_key": key})
        self.assertEqual((again["id"], again["duplicate"]), (first.id, True))
        self.assertEqual(self.client.get(first.id).idempotency_key, key)
        self.assertEqual(self.client.get(str(first.id)).id, first.id)

        ids = [first.id] + [self.client.submit("echo", f"n{i}", wait=WAIT).id for i in range(4)]
        after = first.id - 1

        mine = [t.id for t in self.client.list(after=after, page_size=2) if t.id in ids]
        self.assertEqual(mine, ids)  # ascending ids, across pages of 2
        page = self.client.list_page(after=after, limit=2)
        self.assertEqual(len(page.tasks), 2)
        self.assertEqual(page.next_after, page.tasks[-1].id)
        self.assertEqual(len(list(self.client.list(after=after, limit=3))), 3)

        ok = {t.id for t in self.client.list(state="succeeded", agent="echo", swarm="default", after=after)}
        self.assertTrue(set(ids) <= ok)
        self.assertEqual(
            [t for t in self.client.list(state="failed", after=after) if t.id in ids], []
        )
        self.assertEqual(
            [t for t in self.client.list(agent="no-such-agent", after=after)], []
        )
        self.assertEqual([t for t in self.client.list(swarm="nope", after=after)], [])

        with self.assertRaises(ValueError):
            self.client.list_page(state="sleeping")
        # The API refuses it too, with its own code.
        with self.assertRaises(SwarmError) as cm:
            self.client.request("GET", "/v1/tasks", query={"state": "sleeping"})
        self.assertEqual((cm.exception.status, cm.exception.code), (400, "bad_request"))

        with self.assertRaises(SwarmError) as cm:
            self.client.get(10**15)
        self.assertEqual((cm.exception.status, cm.exception.code), (404, "not_found"))

    def test_status_workers_ready_health(self) -> None:
        st = self.client.status()
        for key in ("cluster", "workers", "queue", "queue_limit", "throughput"):
            self.assertIn(key, st)
        self.assertEqual(st["cluster"]["role"], "leader")
        self.assertTrue(self.client.workers())
        self.assertTrue(self.client.ready())
        self.assertTrue(self.client.health())

    # -- cancel ------------------------------------------------------------------

    def test_cancel_a_sleeping_task(self) -> None:
        t = self.client.submit("sleep", "30000", timeout_ms=120_000, max_attempts=1)
        deadline = time.monotonic() + WAIT
        while self.client.get(t).state != "running":
            self.assertLess(time.monotonic(), deadline, "the sleep task never started")
            time.sleep(0.05)
        # A wait that ends first says so, with the task as last seen.
        with self.assertRaises(WaitTimeout) as cm:
            self.client.wait(t, timeout=0.5)
        self.assertEqual(cm.exception.task.state, "running")
        self.assertIsInstance(cm.exception, TimeoutError)
        self.assertEqual(self.client.wait(t, timeout=0.2, raise_on_timeout=False).state, "running")

        started = time.monotonic()
        cancelled = self.client.cancel(t.id)
        self.assertEqual(cancelled.state, "cancelled")
        done = self.client.wait(t, timeout=WAIT)
        self.assertEqual(done.state, "cancelled")
        self.assertLess(time.monotonic() - started, 25, "cancel did not stop the sleep")
        # Idempotent.
        self.assertEqual(self.client.cancel(t.id).state, "cancelled")

    # -- refusals ----------------------------------------------------------------

    def assertRefused(self, status: int, code: str, fn, *args, **kwargs) -> SwarmError:  # noqa: N802
        with self.assertRaises(SwarmError) as cm:
            fn(*args, **kwargs)
        e = cm.exception
        self.assertEqual((e.status, e.code), (status, code), str(e))
        self.assertTrue(e.message)
        return e

    def test_bad_input_gets_the_apis_codes(self) -> None:
        self.assertRefused(400, "bad_request", self.client.submit, "echo", "x", max_attempts=0)
        self.assertRefused(400, "bad_request", self.client.submit, "echo", "x", timeout_ms=0)
        self.assertRefused(400, "bad_request", self.client.submit, "", "x")
        # priority is a 32-bit integer.
        self.assertRefused(400, "invalid_json", self.client.submit, "echo", "x", priority=2**40)
        e = self.assertRefused(
            400, "invalid_json", self.client.submit_spec, {"agent": "echo", "priorty": 3}
        )
        self.assertIn("priorty", e.message)
        e = self.assertRefused(
            400,
            "bad_request",
            self.client.submit_batch,
            [{"agent": "echo"}, {"agent": "echo", "max_attempts": 0}],
        )
        self.assertIn("tasks[1]", e.message)
        # The coordinator's default payload limit is 1 MiB.
        self.assertRefused(413, "payload_too_large", self.client.submit, "echo", b"x" * ((1 << 20) + 1))
        self.assertRefused(400, "bad_request", self.client.request, "GET", "/v1/tasks/abc")
        self.assertRefused(404, "not_found", self.client.request, "GET", "/v1/nothing")

    def test_wrong_or_missing_token_is_401(self) -> None:
        for token in ("wrong-token", ""):
            with Client(API, token=token) as c:
                with self.assertRaises(SwarmError) as cm:
                    c.status()
                self.assertEqual((cm.exception.status, cm.exception.code), (401, "unauthorized"))
                with self.assertRaises(SwarmError):
                    c.submit("echo", "x")
                self.assertTrue(c.ready())  # /ready needs no token

    # -- connections and configuration ---------------------------------------------

    def test_unreachable_api_and_failover(self) -> None:
        dead = f"http://127.0.0.1:{_closed_port()}"
        with Client(dead, token=TOKEN, timeout=5) as c:
            with self.assertRaises(SwarmConnectionError) as cm:
                c.status()
        self.assertIn("cannot reach", str(cm.exception))
        self.assertFalse(cm.exception.may_have_taken_effect)
        # Several nodes: the one that cannot be reached is skipped, for writes too.
        with Client(f"{dead},{API}", token=TOKEN) as c:
            self.assertIn("queue", c.status())
            self.assertEqual(c.submit("echo", "via failover", wait=WAIT).text, "via failover")

    def test_defaults_come_from_the_environment(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "token")
            with open(path, "w", encoding="utf-8") as f:
                f.write(TOKEN + "\n")
            env: Dict[str, str] = {"SWARM_API": API, "SWARM_TOKEN_FILE": path}
            with mock.patch.dict(os.environ, env):
                os.environ.pop("SWARM_TOKEN", None)
                os.environ.pop("SWARM_CA", None)
                with Client() as c:
                    self.assertIn("queue", c.status())
            with mock.patch.dict(os.environ, {"SWARM_API": API, "SWARM_TOKEN": TOKEN}):
                with Client() as c:
                    self.assertIn("queue", c.status())

    def test_kept_alive_connections_survive_the_servers_idle_timeout(self) -> None:
        c = Client(API, token=TOKEN)
        pool = c._http._pool()  # this thread's kept-alive connections
        self.assertIn("queue", c.status())
        (conn,) = [conn for conn, _ in pool.values()]
        self.assertIn("queue", c.status())
        self.assertEqual([conn2 for conn2, _ in pool.values()], [conn])  # reused
        time.sleep(2.5)  # past the reuse window: a new connection
        self.assertEqual(c.submit("echo", "after idle", wait=WAIT).text, "after idle")
        self.assertNotIn(conn, [conn2 for conn2, _ in pool.values()])
        c.close()
        self.assertEqual(pool, {})
        self.assertIn("queue", c.status())  # usable after close()
        c.close()


@unittest.skipUnless(API and TOKEN, NEEDS_CLUSTER)
@unittest.skipUnless(
    AGENTS_DIR, "set SWARM_TEST_AGENTS_DIR to the directory of the worker's agents.toml"
)
class PythonAgentTest(unittest.TestCase):
    """examples/echo_agent.py run by a real worker as an exec agent."""

    client: Client
    agent: str

    @classmethod
    def setUpClass(cls) -> None:
        name = python_agent_name(AGENTS_DIR)
        if name is None:
            raise AssertionError(f"{AGENTS_DIR}/agents.toml registers no echo_agent.py")
        cls.agent = name
        cls.client = Client(API, token=TOKEN)
        cls.client.wait_ready(WAIT)
        deadline = time.monotonic() + WAIT
        while not any(name in w.get("agents", []) for w in cls.client.workers()):
            if time.monotonic() > deadline:
                raise AssertionError(f"no connected worker offers the agent {name!r}")
            time.sleep(0.1)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.client.close()

    def test_the_agent_answers_with_the_helpers(self) -> None:
        t = self.client.submit(self.agent, "hello agent", wait=WAIT)
        self.assertEqual(t.state, "succeeded", t.error)
        out = t.json()
        self.assertEqual(out["upper"], "HELLO AGENT")
        self.assertEqual(out["patterns"], 0)  # no SWARM_PATTERNS_FILE: the empty list
        self.assertEqual(out["pattern_titles"], [])
        self.assertEqual(out["task_id"], t.id)
        self.assertEqual(out["attempt"], t.attempts[-1].attempt)
        self.assertNotIn("memory_items", out)

    def test_fail_fails_the_attempt_with_the_message(self) -> None:
        t = self.client.submit(self.agent, "fail:the agent gave up", max_attempts=1, wait=WAIT)
        self.assertEqual(t.state, "failed")
        self.assertIn("the agent gave up", t.error or "")
        self.assertIsNone(t.output)

    def test_memory_items_teach_the_bank_and_patterns_reach_the_agent(self) -> None:
        title = f"Python lesson {uuid.uuid4().hex[:8]}"
        taught = self.client.submit(self.agent, f"learn:{title}", wait=WAIT)
        self.assertEqual(taught.state, "succeeded", taught.error)
        self.assertEqual(taught.json()["memory_items"][0]["title"], title)

        # The coordinator distils the result's memory_items into a pattern (async).
        deadline = time.monotonic() + WAIT
        while True:
            bank = self.client.request("GET", "/v1/patterns")["patterns"]
            mine = [p for p in bank if p["title"] == title]
            if mine:
                break
            self.assertLess(time.monotonic(), deadline, f"{title!r} never reached the bank: {bank}")
            time.sleep(0.1)
        self.assertEqual(mine[0]["source_task"], taught.id)
        self.assertEqual(str(mine[0]["outcome"]).lower(), "success")

        # A task asking for patterns gets them in SWARM_PATTERNS_FILE.
        t = self.client.submit(self.agent, title, patterns=3, wait=WAIT)
        self.assertEqual(t.state, "succeeded", t.error)
        self.assertEqual(t.patterns, 3)
        out = t.json()
        self.assertEqual(out["patterns"], min(3, len(bank)))
        self.assertEqual(len(out["pattern_titles"]), out["patterns"])
        self.assertIn(title, out["pattern_titles"])


def ticks(n: int) -> bytes:
    """What ``examples/ticker_agent.py`` prints on stdout for ``n`` lines."""
    return "".join(f"tick {i}/{n} \u2713\n" for i in range(1, n + 1)).encode("utf-8")


@unittest.skipUnless(API and TOKEN, NEEDS_CLUSTER)
@unittest.skipUnless(
    AGENTS_DIR, "set SWARM_TEST_AGENTS_DIR to the directory of the worker's agents.toml"
)
class LiveOutputTest(unittest.TestCase):
    """A task's output followed live (``events``, ``follow``) and read back (``logs``),
    with examples/ticker_agent.py printing lines a little apart."""

    client: Client
    agent: str

    @classmethod
    def setUpClass(cls) -> None:
        name = python_agent_name(AGENTS_DIR, "ticker_agent.py")
        if name is None:
            raise AssertionError(f"{AGENTS_DIR}/agents.toml registers no ticker_agent.py")
        cls.agent = name
        cls.client = Client(API, token=TOKEN)
        cls.client.wait_ready(WAIT)
        deadline = time.monotonic() + WAIT
        while not any(name in w.get("agents", []) for w in cls.client.workers()):
            if time.monotonic() > deadline:
                raise AssertionError(f"no connected worker offers the agent {name!r}")
            time.sleep(0.1)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.client.close()

    def test_events_show_the_output_live_then_end_and_logs_keep_it(self) -> None:
        n = 8
        t = self.client.submit(self.agent, {"lines": n, "interval": 0.25}, max_attempts=1)
        events: List[Event] = []
        first_output_ms: Optional[float] = None
        for ev in self.client.events(t.id, timeout=WAIT):
            if ev.event == "output" and first_output_ms is None:
                first_output_ms = time.time() * 1000
            events.append(ev)
        names = [e.event for e in events]
        self.assertEqual(names[-1], "end", names)
        self.assertEqual(names.count("end"), 1, names)
        self.assertNotIn("gap", names)
        outputs = [e for e in events if e.event == "output"]
        self.assertGreater(len(outputs), 0, names)

        # Exactly what the agent wrote, each stream apart; the offsets follow each other.
        stdout = b"".join(e.output or b"" for e in outputs if e.stream == "stdout")
        stderr = b"".join(e.output or b"" for e in outputs if e.stream == "stderr")
        self.assertEqual(stdout, ticks(n))
        self.assertEqual(stderr, b"ticker done\n")
        offset = 0
        for e in outputs:
            self.assertEqual((e.attempt, e.data["offset"]), (1, offset), e)
            self.assertEqual(e.data["len"], len(e.output or b""))
            offset += e.data["len"]
            self.assertEqual(e.id, f"1:{offset}")
        total = len(stdout) + len(stderr)
        self.assertEqual(offset, total)

        # The attempt's start and end, and the task's state, came as events too.
        attempts = [e.data for e in events if e.event == "attempt"]
        self.assertEqual([a["event"] for a in attempts], ["started", "ended"])
        self.assertTrue(attempts[0]["worker"])
        self.assertEqual((attempts[1]["outcome"], attempts[1]["output_bytes"]), ("succeeded", total))
        self.assertIn("running", [e.data["state"] for e in events if e.event == "state"])

        # `end` carries the final task.
        task = events[-1].task
        assert task is not None
        self.assertEqual((task.id, task.state), (t.id, "succeeded"))
        self.assertEqual(task.output, ticks(n))
        self.assertEqual(task.attempts[-1].output_bytes, total)
        # Live: the first line arrived while the task still ran (it runs ~2 s).
        assert first_output_ms is not None and task.finished_at_ms is not None
        self.assertLess(first_output_ms, task.finished_at_ms, "the output came only at the end")

        # The log tail stored with the attempt.
        logs = self.client.logs(t.id)
        self.assertEqual((logs["id"], logs["state"]), (t.id, "succeeded"))
        (a,) = logs["attempts"]
        self.assertEqual((a["attempt"], a["running"], a["offset"], a["output_bytes"]), (1, False, 0, total))
        self.assertEqual(a["worker"], attempts[0]["worker"])
        kept = {"stdout": "", "stderr": ""}
        for piece in a["pieces"]:
            kept[piece["stream"]] += piece["text"]
        self.assertEqual(kept, {"stdout": ticks(n).decode("utf-8"), "stderr": "ticker done\n"})

        # Resuming after an event's id gives the rest of the output, none of it twice.
        all_bytes = b"".join(e.output or b"" for e in outputs)
        middle = outputs[len(outputs) // 2]
        assert middle.id is not None
        after = int(middle.id.split(":")[1])
        rest = list(self.client.events(t.id, last_event_id=middle.id, timeout=WAIT))
        self.assertEqual(rest[-1].event, "end")
        self.assertEqual(b"".join(e.output or b"" for e in rest if e.event == "output"), all_bytes[after:])

    def test_follow_writes_the_output_and_returns_the_task(self) -> None:
        t = self.client.submit(self.agent, {"lines": 4, "interval": 0.1}, max_attempts=1)
        out, err = io.StringIO(), io.StringIO()
        dead = f"http://127.0.0.1:{_closed_port()}"
        # Through a client whose first address is down: the stream comes from the next.
        with Client(f"{dead},{API}", token=TOKEN) as c:
            done = c.follow(t, out, err, timeout=WAIT)
        self.assertEqual((done.id, done.state), (t.id, "succeeded"))
        self.assertEqual(out.getvalue(), ticks(4).decode("utf-8"))
        self.assertEqual(err.getvalue(), "ticker done\n")
        self.assertEqual(done.output, ticks(4))
        # A final task's stream replays it and ends at once.
        out2 = io.StringIO()
        self.assertEqual(self.client.follow(t.id, out2, io.StringIO(), timeout=WAIT).state, "succeeded")
        self.assertEqual(out2.getvalue(), out.getvalue())

    def test_event_refusals(self) -> None:
        with self.assertRaises(SwarmError) as cm:
            next(self.client.events(10**15))
        self.assertEqual((cm.exception.status, cm.exception.code), (404, "not_found"))
        with self.assertRaises(SwarmError) as cm:
            self.client.logs(10**15)
        self.assertEqual(cm.exception.status, 404)
        t = self.client.submit("echo", "x", wait=WAIT)
        with self.assertRaises(SwarmError) as cm:
            list(self.client.events(t.id, last_event_id="nonsense"))
        self.assertEqual((cm.exception.status, cm.exception.code), (400, "bad_request"))
        self.assertIn("Last-Event-ID", cm.exception.message)


@unittest.skipUnless(TLS_API and TLS_CA and TOKEN, "set SWARM_TEST_TLS_API and SWARM_TEST_TLS_CA for the HTTPS tests")
class TlsTest(unittest.TestCase):
    """The API over HTTPS, verified against the cluster CA."""

    def test_https_verified_against_the_cluster_ca(self) -> None:
        c = Client(TLS_API, token=TOKEN, ca=TLS_CA)
        c.wait_ready(WAIT)
        self.assertEqual(c.status()["cluster"]["role"], "leader")
        deadline = time.monotonic() + WAIT
        while not c.workers():
            self.assertLess(time.monotonic(), deadline, "no worker on the TLS cluster")
            time.sleep(0.1)
        t = c.submit("echo", "over tls", wait=WAIT)
        self.assertEqual((t.state, t.text), ("succeeded", "over tls"))
        # The event stream over TLS too.
        evs = list(c.events(t.id, timeout=WAIT))
        self.assertEqual(evs[-1].event, "end")
        end = evs[-1].task
        assert end is not None
        self.assertEqual((end.state, end.text), ("succeeded", "over tls"))
        c.close()
        with mock.patch.dict(os.environ, {"SWARM_CA": TLS_CA, "SWARM_TOKEN": TOKEN}):
            with Client(TLS_API) as c:
                self.assertIn("queue", c.status())

    def test_https_without_a_ca_is_refused(self) -> None:
        with mock.patch.dict(os.environ, {}, clear=False):
            os.environ.pop("SWARM_CA", None)
            with self.assertRaises(ValueError) as cm:
                Client(TLS_API, token=TOKEN)
        self.assertIn("SWARM_CA", str(cm.exception))

    @unittest.skipUnless(OTHER_CA, "set SWARM_TEST_OTHER_CA to another cluster's ca.pem")
    def test_another_clusters_ca_does_not_verify(self) -> None:
        with Client(TLS_API, token=TOKEN, ca=OTHER_CA, timeout=10) as c:
            with self.assertRaises(SwarmConnectionError) as cm:
                c.status()
        self.assertIn("certificate", str(cm.exception).lower())
        self.assertFalse(cm.exception.may_have_taken_effect)


if __name__ == "__main__":
    unittest.main()
