"""Tests of swarm_client that need no cluster: encodings, parsing, configuration, and
the exec-agent helpers (run as a real subprocess, the way a worker runs an agent)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
import unittest
from typing import Dict, Optional, Tuple
from unittest import mock

from swarm_client import Client, MemoryItem, SubmitSpec, SwarmError, Task, encode_payload
from swarm_client._http import parse_bases, parse_error
from swarm_client.agent import encode_result
from swarm_client.models import spec_to_json

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SRC = os.path.join(ROOT, "src")
ECHO_AGENT = os.path.join(ROOT, "examples", "echo_agent.py")


def run_agent(
    payload: bytes, env: Optional[Dict[str, str]] = None, script: Optional[str] = None
) -> Tuple[int, bytes, bytes]:
    """Run an agent as a worker would: payload on stdin, a cleared environment."""
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": SRC}
    full_env.update(env or {})
    args = [sys.executable, ECHO_AGENT] if script is None else [sys.executable, "-c", script]
    p = subprocess.run(args, input=payload, env=full_env, capture_output=True, timeout=60)
    return p.returncode, p.stdout, p.stderr


class PayloadTest(unittest.TestCase):
    def test_payloads_are_encoded_so_the_agent_gets_exact_bytes(self) -> None:
        self.assertEqual(encode_payload(None), {})
        self.assertEqual(encode_payload("héllo"), {"payload": "héllo"})
        self.assertEqual(encode_payload(b"plain"), {"payload": "plain"})
        self.assertEqual(
            encode_payload(b"\xff\x00"), {"payload_base64": base64.b64encode(b"\xff\x00").decode()}
        )
        self.assertEqual(encode_payload(bytearray(b"ab")), {"payload": "ab"})
        self.assertEqual(encode_payload({"b": 1, "a": [True, None]}), {"payload": '{"b":1,"a":[true,null]}'})
        self.assertEqual(encode_payload(30000), {"payload": "30000"})
        with self.assertRaises(TypeError):
            encode_payload(object())

    def test_submit_specs_send_only_what_is_set(self) -> None:
        self.assertEqual(SubmitSpec(agent="echo").to_json(), {"agent": "echo"})
        body = SubmitSpec(
            agent="echo",
            payload={"x": 1},
            priority=0,
            labels={"gpu": "yes"},
            patterns=2,
            idempotency_key="k",
        ).to_json()
        self.assertEqual(
            body,
            {
                "agent": "echo",
                "payload": '{"x":1}',
                "priority": 0,
                "labels": {"gpu": "yes"},
                "patterns": 2,
                "idempotency_key": "k",
            },
        )
        # A ring swarm's task names no agent.
        self.assertEqual(SubmitSpec(swarm="ring", payload="p").to_json(), {"swarm": "ring", "payload": "p"})
        # Mappings are passed on (the API checks them), with the payload encoded.
        self.assertEqual(
            spec_to_json({"agent": "echo", "payload": b"\x80", "priorty": 1}),
            {"agent": "echo", "payload_base64": "gA==", "priorty": 1},
        )
        self.assertEqual(spec_to_json({"agent": "echo", "payload": None}), {"agent": "echo"})
        with self.assertRaises(TypeError):
            spec_to_json(["echo"])  # type: ignore[arg-type]


class TaskTest(unittest.TestCase):
    VIEW = {
        "id": 7,
        "agent": "echo",
        "state": "succeeded",
        "priority": 2,
        "timeout_ms": 60000,
        "max_attempts": 3,
        "payload_base64": base64.b64encode(b"\x00\x01").decode(),
        "attempts": [
            {"attempt": 1, "worker": "w1", "started_at_ms": 10, "finished_at_ms": 20, "outcome": "succeeded"}
        ],
        "output": '{"ok": true}',
        "created_at_ms": 5,
        "finished_at_ms": 20,
        "swarm": "default",
        "something_new": {"x": 1},
    }

    def test_views_parse_with_bytes_helpers_and_unknown_fields_kept(self) -> None:
        t = Task.from_json(self.VIEW)
        self.assertEqual((t.id, t.agent, t.state, t.priority), (7, "echo", "succeeded", 2))
        self.assertEqual(t.payload, b"\x00\x01")
        self.assertEqual(t.output, b'{"ok": true}')
        self.assertEqual(t.text, '{"ok": true}')
        self.assertEqual(t.json(), {"ok": True})
        self.assertTrue(t.is_final and t.succeeded)
        self.assertEqual(t.attempts[0].worker, "w1")
        self.assertEqual(t.attempts[0].outcome, "succeeded")
        self.assertEqual(t.extra, {"something_new": {"x": 1}})
        self.assertEqual(t.raw["something_new"], {"x": 1})

    def test_a_task_without_output(self) -> None:
        t = Task.from_json({"id": 1, "agent": "sleep", "state": "running", "payload": "5", "attempts": []})
        self.assertIsNone(t.output)
        self.assertIsNone(t.text)
        self.assertFalse(t.is_final)
        self.assertEqual(t.payload_text, "5")
        with self.assertRaises(ValueError):
            t.json()


class ConfigTest(unittest.TestCase):
    def test_api_urls(self) -> None:
        (b,) = parse_bases("http://127.0.0.1:8080/")
        self.assertEqual((b.scheme, b.host, b.port, b.prefix), ("http", "127.0.0.1", 8080, ""))
        a, b = parse_bases("https://c1:9443/swarm, http://[::1]")
        self.assertEqual((a.port, a.prefix, b.host, b.port), (9443, "/swarm", "::1", 80))
        self.assertEqual(b.url, "http://[::1]:80")
        for bad in ("", "127.0.0.1:8080", "ftp://x", "http://x/?a=1", "http://u:p@x"):
            with self.assertRaises(ValueError, msg=bad):
                parse_bases(bad)

    def test_https_needs_the_cluster_ca_and_a_bad_ca_is_refused(self) -> None:
        with self.assertRaises(ValueError) as cm:
            Client("https://127.0.0.1:1", token="t", ca=None)
        self.assertIn("SWARM_CA", str(cm.exception))
        with self.assertRaises(ValueError):
            Client("https://127.0.0.1:1", token="t", ca="/nonexistent/ca.pem")
        with self.assertRaises(ValueError):
            Client("http://127.0.0.1:1", token="a\nb")

    def test_token_file(self) -> None:
        with tempfile.TemporaryDirectory() as d, mock.patch.dict(os.environ):
            os.environ.pop("SWARM_TOKEN", None)
            path = os.path.join(d, "t")
            with open(path, "w", encoding="utf-8") as f:
                f.write("  secret\n")
            c = Client("http://127.0.0.1:1", token_file=path)
            self.assertEqual(c._http.token, "secret")
            open(path, "w").close()
            with self.assertRaises(ValueError):
                Client("http://127.0.0.1:1", token_file=path)

    def test_error_bodies(self) -> None:
        e = parse_error(400, b'{"error": {"code": "bad_request", "message": "no"}}')
        self.assertEqual((e.status, e.code, e.message), (400, "bad_request", "no"))
        self.assertEqual(str(e), "400 bad_request: no")
        e = parse_error(503, b'{"error": {"code": "not_leader", "message": "m", "leader_api": "h:1"}}')
        self.assertEqual(e.leader_api, "h:1")
        e = parse_error(502, b"<html>bad gateway</html>")
        self.assertIsInstance(e, SwarmError)
        self.assertEqual((e.status, e.code), (502, "http_error"))
        self.assertIn("bad gateway", e.message)


class AgentTest(unittest.TestCase):
    def test_results_and_memory_items_take_the_shape_the_coordinator_reads(self) -> None:
        self.assertEqual(encode_result(b"\xff"), b"\xff")
        self.assertEqual(encode_result("é"), "é".encode())
        self.assertEqual(encode_result({"a": 1}), b'{"a":1}')
        item = {"title": "T", "content": "C"}
        self.assertEqual(
            json.loads(encode_result({"a": 1}, [item])), {"a": 1, "memory_items": [item]}
        )
        self.assertEqual(
            json.loads(encode_result("text", [MemoryItem("T", "C", outcome="failure")])),
            {"result": "text", "memory_items": [{"title": "T", "description": "", "content": "C", "outcome": "failure"}]},
        )
        self.assertEqual(json.loads(encode_result(b"bytes", []))["result"], "bytes")
        for bad in (
            [{"title": "", "content": "C"}],
            [{"title": "T"}],
            [{"title": "T", "content": "C", "outcome": "maybe"}],
            [{"title": "T", "content": "C"}] * 17,
        ):
            with self.assertRaises(ValueError):
                encode_result("r", bad)
        with self.assertRaises(ValueError):
            encode_result({"memory_items": []}, [item])

    def test_the_example_agent_as_a_worker_runs_it(self) -> None:
        code, out, err = run_agent(b"hello", {"SWARM_TASK_ID": "42", "SWARM_ATTEMPT": "2"})
        self.assertEqual(code, 0, err)
        self.assertEqual(
            json.loads(out),
            {"upper": "HELLO", "patterns": 0, "pattern_titles": [], "task_id": 42, "attempt": 2},
        )
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "patterns.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(
                    {
                        "patterns": [
                            {"id": "pat-1", "title": "One", "description": "d", "content": "c",
                             "outcome": "success", "confidence": 0.5, "score": 0.9},
                            {"id": "pat-2", "title": "Two", "description": "", "content": "c",
                             "outcome": "failure", "confidence": 0.2, "score": 0.1},
                        ]
                    },
                    f,
                )
            code, out, err = run_agent(b"learn:Lesson", {"SWARM_PATTERNS_FILE": path})
        self.assertEqual(code, 0, err)
        doc = json.loads(out)
        self.assertEqual((doc["patterns"], doc["pattern_titles"]), (2, ["One", "Two"]))
        self.assertEqual(doc["memory_items"][0]["title"], "Lesson")
        code, out, err = run_agent(b"fail:nope")
        self.assertEqual((code, out), (1, b""))
        self.assertEqual(err, b"nope\n")

    def test_helpers_read_the_environment(self) -> None:
        script = (
            "from swarm_client import agent\n"
            "import sys\n"
            "ps = agent.patterns()\n"
            "agent.respond({'json': agent.payload_json(), 'raw': agent.payload().decode(),"
            " 'n': len(ps), 'conf': [p.confidence for p in ps], 'exec': agent.execution_id(),"
            " 'agent': agent.agent_name(), 'key': agent.idempotency_key(), 'task': agent.task_id()})\n"
        )
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "patterns.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump({"patterns": [{"id": "p", "title": "t", "confidence": 0.25}]}, f)
            env = {
                "SWARM_PATTERNS_FILE": path,
                "SWARM_EXECUTION_ID": "9-1",
                "SWARM_AGENT": "py",
                "SWARM_IDEMPOTENCY_KEY": "k1",
            }
            code, out, err = run_agent(b'{"a": [1]}', env, script=script)
        self.assertEqual(code, 0, err)
        self.assertEqual(
            json.loads(out),
            {"json": {"a": [1]}, "raw": '{"a": [1]}', "n": 1, "conf": [0.25], "exec": "9-1",
             "agent": "py", "key": "k1", "task": None},
        )
        code, _, err = run_agent(b"", script="from swarm_client import agent\nagent.fail('x', code=0)\n")
        self.assertNotEqual(code, 0)
        self.assertIn(b"ValueError", err)
        code, _, err = run_agent(b"", script="from swarm_client import agent\nagent.fail('bad', code=3)\n")
        self.assertEqual((code, err), (3, b"bad\n"))


if __name__ == "__main__":
    unittest.main()
