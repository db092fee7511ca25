"""Tests of swarm_client that need no cluster: encodings, parsing, configuration, the
event-stream parser and the event client against a scripted local HTTP server, and the
exec-agent helpers (run as a real subprocess, the way a worker runs an agent)."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Tuple
from unittest import mock

from swarm_client import (
    Client,
    Event,
    MemoryItem,
    SubmitSpec,
    SwarmConnectionError,
    SwarmError,
    Task,
    WaitTimeout,
    encode_payload,
)
from swarm_client._http import parse_bases, parse_error
from swarm_client.events import SseParser
from swarm_client.agent import encode_result
from swarm_client.models import spec_to_json

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SRC = os.path.join(ROOT, "src")
ECHO_AGENT = os.path.join(ROOT, "examples", "echo_agent.py")
TICKER_AGENT = os.path.join(ROOT, "examples", "ticker_agent.py")


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

    def test_callback_signatures_verify_with_the_secret_only(self) -> None:
        import hashlib
        import hmac

        from swarm_client import verify_callback

        body = b'{"event":"task.finished","task":{"id":7}}'
        t = 1_700_000_000_000
        tag = hmac.new(b"s3cret", f"{t}.".encode() + body, hashlib.sha256).hexdigest()
        sig = f"t={t},v1={tag}"
        self.assertTrue(verify_callback("s3cret\n", sig, body, now_ms=t + 1000))
        self.assertFalse(verify_callback("other", sig, body, now_ms=t))
        self.assertFalse(verify_callback("s3cret", sig, body + b" ", now_ms=t))
        self.assertFalse(verify_callback("s3cret", sig, body, now_ms=t + 10 * 60 * 1000))
        self.assertTrue(verify_callback("s3cret", sig, body, tolerance_ms=None))
        self.assertFalse(verify_callback("s3cret", "v1=" + tag, body, tolerance_ms=None))
        self.assertFalse(verify_callback("s3cret", "garbage", body, tolerance_ms=None))
        self.assertEqual(
            SubmitSpec(agent="echo", callback_url="http://h/cb").to_json(),
            {"agent": "echo", "callback_url": "http://h/cb"},
        )

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


# -- live events -------------------------------------------------------------------


def feed_all(pieces: List[bytes]) -> List[Event]:
    """The events a fresh parser makes of ``pieces``, fed one after the other."""
    p = SseParser()
    out: List[Event] = []
    for piece in pieces:
        out.extend(p.feed(piece))
    return out


class SseParserTest(unittest.TestCase):
    # Every feature at once: a BOM, comments (keep-alives), LF, CRLF and lone-CR line
    # ends, a multi-line data, a field without a space or a colon, an id carried over,
    # an event without data (not dispatched), `retry`, text that is not JSON, and a
    # character of several bytes.
    STREAM = (
        b"\xef\xbb\xbf: keep-alive\n\n"
        b'event: state\nid: 0:0\ndata: {"state":"queued"}\n\n'
        b'event: output\r\nid: 1:5\r\ndata: {"stream":"stdout","text":"h\xc3\xa9 \\u2713"}\r\n\r\n'
        b"event: note\rdata:first\rdata: second\r\rretry: 1500\n"
        b"event: nothing\nid: 1:9\n\n"
        b": another comment\n"
        b"event: gap\nignored\ndata: {\"from\": 1}\n\n"
        b"data: plain text\n\n"
        b'event: end\r\nid: 1:12\r\ndata: {"id": 3, "state": "succeeded"}\r\n\r\n'
    )
    WANT = [
        ("state", "0:0", {"state": "queued"}),
        ("output", "1:5", {"stream": "stdout", "text": "h\u00e9 \u2713"}),
        ("note", "1:5", "first\nsecond"),
        ("gap", "1:9", {"from": 1}),
        ("message", "1:9", "plain text"),
        ("end", "1:12", {"id": 3, "state": "succeeded"}),
    ]

    def check(self, events: List[Event], msg: str = "") -> None:
        self.assertEqual([(e.event, e.id, e.data) for e in events], self.WANT, msg)

    def test_a_whole_stream(self) -> None:
        p = SseParser()
        self.check(p.feed(self.STREAM))
        self.assertEqual(p.retry_ms, 1500)
        self.assertEqual(p.last_event_id, "1:12")

    def test_split_anywhere_across_reads(self) -> None:
        data = self.STREAM
        for cut in range(len(data) + 1):
            self.check(feed_all([data[:cut], data[cut:]]), f"cut at {cut}")
        for a in range(0, len(data), 7):
            for b in range(a, len(data), 13):
                self.check(feed_all([data[:a], data[a:b], data[b:]]), f"cuts at {a}, {b}")

    def test_byte_by_byte(self) -> None:
        self.check(feed_all([bytes([b]) for b in self.STREAM]))

    def test_crlf_split_between_reads_is_one_line_end(self) -> None:
        # "\r" ends a piece, "\n" starts the next: one line end, not a blank line.
        evs = feed_all([b"event: a\r", b"\ndata: 1\r", b"\n\r", b"\n"])
        self.assertEqual([(e.event, e.data) for e in evs], [("a", 1)])
        # Two CRs are a line end and a blank line.
        evs = feed_all([b"data: 2\r", b"\r"])
        self.assertEqual([(e.event, e.data) for e in evs], [("message", 2)])

    def test_an_event_cut_short_by_the_end_of_the_stream_is_not_given(self) -> None:
        self.assertEqual(feed_all([b'event: end\ndata: {"id": 1}\n']), [])
        self.assertEqual(feed_all([b"data: x"]), [])

    def test_multi_line_data_and_empty_data(self) -> None:
        (ev,) = feed_all([b"data: {\ndata: \"a\":\ndata:  1}\n\n"])
        self.assertEqual((ev.raw, ev.data), ('{\n"a":\n 1}', {"a": 1}))
        (ev,) = feed_all([b"data\n\n"])  # no colon: the field's value is empty
        self.assertEqual((ev.event, ev.raw, ev.data), ("message", "", ""))
        self.assertEqual(feed_all([b"id: 5\nevent: x\n\n"]), [])  # no data: no event

    def test_event_helpers(self) -> None:
        text = Event.parse("output", "1:0", '{"attempt": 1, "stream": "stderr", "offset": 0, "len": 3, "text": "ab\\n"}')
        self.assertEqual((text.stream, text.output, text.text, text.attempt), ("stderr", b"ab\n", "ab\n", 1))
        raw = bytes([0xFF, 0x00, 0xC3])
        b64 = Event.parse(
            "output",
            "1:3",
            json.dumps({"stream": "stdout", "data": base64.b64encode(raw).decode(), "encoding": "base64"}),
        )
        self.assertEqual(b64.output, raw)
        self.assertEqual(b64.text, raw.decode("utf-8", errors="replace"))
        end = Event.parse("end", "1:3", json.dumps({"id": 9, "agent": "echo", "state": "succeeded", "output": "x"}))
        self.assertIsInstance(end.task, Task)
        self.assertEqual((end.task.id, end.task.text), (9, "x"))
        state = Event.parse("state", "0:0", '{"state": "running", "attempt": 2}')
        self.assertEqual((state.output, state.text, state.task, state.stream, state.attempt), (None, None, None, None, 2))


def sse(event: str, id: str, data: Any) -> bytes:
    """One event as the coordinator writes it."""
    return f"event: {event}\nid: {id}\ndata: {json.dumps(data)}\n\n".encode()


def out_event(attempt: int, offset: int, stream: str, data: bytes) -> bytes:
    """An ``output`` event: text when UTF-8, else base64 (as the coordinator does)."""
    v: Dict[str, Any] = {"task": 7, "attempt": attempt, "stream": stream, "offset": offset, "len": len(data)}
    try:
        v["text"] = data.decode("utf-8")
    except UnicodeDecodeError:
        v["data"] = base64.b64encode(data).decode()
        v["encoding"] = "base64"
    return sse("output", f"{attempt}:{offset + len(data)}", v)


TASK_VIEW = {"id": 7, "agent": "py", "state": "succeeded", "output": "done", "attempts": []}
END = sse("end", "1:99", TASK_VIEW)


class Handler(BaseHTTPRequestHandler):
    """Answers as its server's ``script`` says; records every request."""

    protocol_version = "HTTP/1.1"
    server: "FakeApi"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        with self.server.lock:
            n = len(self.server.requests)
            self.server.requests.append((self.path, dict(self.headers.items())))
        self.server.script(self, n)

    def send_json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_stream(self, content_type: str = "text/event-stream") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def finish_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class FakeApi(ThreadingHTTPServer):
    """A local HTTP server answering with ``script(handler, request_index)``."""

    daemon_threads = True

    def __init__(self, script: Callable[[Handler, int], None]) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.script = script
        self.lock = threading.Lock()
        self.requests: List[Tuple[str, Dict[str, str]]] = []
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that left early (as some tests do) is no error here

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class EventClientTest(unittest.TestCase):
    """Client.events/follow/logs against a scripted server."""

    def serve(self, script: Callable[[Handler, int], None]) -> FakeApi:
        api = FakeApi(script)
        self.addCleanup(api.stop)
        return api

    def client(self, api: FakeApi, **kwargs: Any) -> Client:
        c = Client(api.url, token="tok", **kwargs)
        self.addCleanup(c.close)
        return c

    def test_events_come_as_they_are_sent(self) -> None:
        go = threading.Event()
        waited: List[bool] = []

        def script(h: Handler, n: int) -> None:
            h.start_stream()
            h.chunk(sse("state", "0:0", {"state": "running", "attempt": 1}))
            h.chunk(out_event(1, 0, "stdout", b"first\n")[:20])  # half an event
            # The client must have the state event before the rest is sent.
            waited.append(go.wait(10))
            h.chunk(out_event(1, 0, "stdout", b"first\n")[20:] + END)
            h.finish_chunks()

        api = self.serve(script)
        seen = []
        for ev in self.client(api).events(7):
            seen.append(ev.event)
            go.set()
        self.assertEqual(seen, ["state", "output", "end"])
        self.assertEqual(waited, [True])
        path, headers = api.requests[0]
        self.assertEqual(path, "/v1/tasks/7/events")
        self.assertEqual(headers.get("Authorization"), "Bearer tok")
        self.assertEqual(headers.get("Accept"), "text/event-stream")
        self.assertNotIn("Last-Event-ID", headers)

    def test_a_stream_ending_without_end_is_resumed_from_the_last_id(self) -> None:
        def script(h: Handler, n: int) -> None:
            h.start_stream()
            if n == 0:
                # Ends cleanly, without `end` (a node that lost the leadership).
                h.chunk(sse("state", "0:0", {"state": "running", "attempt": 1}))
                h.chunk(out_event(1, 0, "stdout", b"one\n"))
                h.finish_chunks()
            elif n == 1:
                # Breaks off in the middle of an event (a crash).
                h.chunk(out_event(1, 4, "stdout", b"two\n") + b"event: output\nid: 1:")
            else:
                h.chunk(out_event(1, 8, "stderr", b"three\n") + END)
                h.finish_chunks()

        api = self.serve(script)
        got = [(e.event, e.id, e.text) for e in self.client(api).events("7")]
        self.assertEqual(
            got,
            [
                ("state", "0:0", None),
                ("output", "1:4", "one\n"),
                ("output", "1:8", "two\n"),
                ("output", "1:14", "three\n"),
                ("end", "1:99", None),
            ],
        )
        self.assertEqual(
            [h.get("Last-Event-ID") for _, h in api.requests], [None, "1:4", "1:8"]
        )

    def test_a_given_last_event_id_is_sent(self) -> None:
        api = self.serve(lambda h, n: (h.start_stream(), h.chunk(END), h.finish_chunks()))
        evs = list(self.client(api).events(7, last_event_id="2:40"))
        self.assertEqual([e.event for e in evs], ["end"])
        self.assertEqual(api.requests[0][1].get("Last-Event-ID"), "2:40")

    def test_refusals_are_raised_at_once(self) -> None:
        def script(h: Handler, n: int) -> None:
            if "/7/" in h.path:
                h.send_json(400, {"error": {"code": "bad_request", "message": "bad Last-Event-ID"}})
            else:
                h.send_json(404, {"error": {"code": "not_found", "message": "no task 8"}})

        api = self.serve(script)
        c = self.client(api)
        with self.assertRaises(SwarmError) as cm:
            next(c.events(8))
        self.assertEqual((cm.exception.status, cm.exception.code), (404, "not_found"))
        with self.assertRaises(SwarmError) as cm:
            c.follow(7, io.StringIO(), io.StringIO(), last_event_id="nonsense")
        self.assertEqual(cm.exception.code, "bad_request")
        self.assertEqual(len(api.requests), 2)  # neither was retried

    def test_a_stream_that_stays_broken_gives_up_after_resume_for(self) -> None:
        api = self.serve(
            lambda h, n: h.send_json(503, {"error": {"code": "unavailable", "message": "no leader"}})
        )
        started = time.monotonic()
        with self.assertRaises(SwarmError) as cm:
            list(self.client(api).events(7, resume_for=1.0))
        self.assertEqual(cm.exception.code, "unavailable")
        self.assertLess(time.monotonic() - started, 10)
        self.assertGreater(len(api.requests), 2)

    def test_failover_to_a_node_that_answers(self) -> None:
        api = self.serve(lambda h, n: (h.start_stream(), h.chunk(END), h.finish_chunks()))
        with Client(f"http://127.0.0.1:{closed_port()},{api.url}", token="tok") as c:
            self.assertEqual(c.follow(7, io.StringIO(), io.StringIO()).id, 7)

    def test_an_answer_that_is_not_an_event_stream_is_an_error(self) -> None:
        api = self.serve(lambda h, n: (h.start_stream("text/html"), h.chunk(b"<html>"), h.finish_chunks()))
        with self.assertRaises(SwarmConnectionError) as cm:
            list(self.client(api).events(7, resume_for=0.5))
        self.assertIn("not an event stream", str(cm.exception))

    def test_timeout_raises_wait_timeout_with_the_task(self) -> None:
        def script(h: Handler, n: int) -> None:
            if h.path.endswith("/events"):
                h.start_stream()
                h.chunk(sse("state", "0:0", {"state": "running", "attempt": 1}))
                try:
                    for _ in range(100):  # keep-alives until the client leaves
                        time.sleep(0.05)
                        h.chunk(b": keep-alive\n\n")
                except OSError:
                    pass
            else:
                h.send_json(200, dict(TASK_VIEW, state="running"))

        api = self.serve(script)
        seen = []
        started = time.monotonic()
        with self.assertRaises(WaitTimeout) as cm:
            for ev in self.client(api).events(7, timeout=0.6):
                seen.append(ev.event)
        self.assertEqual(seen, ["state"])
        self.assertEqual(cm.exception.task.state, "running")
        self.assertLess(time.monotonic() - started, 4)

    def test_follow_writes_each_stream_where_it_belongs(self) -> None:
        pieces = [
            sse("state", "0:0", {"state": "running", "attempt": 1}),
            sse("attempt", "1:0", {"attempt": 1, "event": "started", "stage": 0, "worker": "w1"}),
            out_event(1, 0, "stdout", b"h\xc3"),  # a character split between two pieces
            out_event(1, 2, "stdout", b"\xa9llo\n"),
            out_event(1, 7, "stderr", b"warn\n"),
            sse("attempt", "1:12", {"attempt": 1, "event": "ended", "outcome": "failed", "error": "boom", "output_bytes": 12}),
            sse("attempt", "2:0", {"attempt": 2, "event": "started", "stage": 0, "worker": "w2"}),
            sse("gap", "2:0", {"attempt": 2, "from": 0, "to": 10, "reason": "lagged"}),
            out_event(2, 10, "tokens", "tök".encode()),
            END,
        ]
        stream = b"".join(pieces)
        api = self.serve(lambda h, n: (h.start_stream(), h.chunk(stream), h.finish_chunks()))
        out, err = io.StringIO(), io.StringIO()
        task = self.client(api).follow(7, out, err)
        self.assertEqual((task.id, task.state, task.text), (7, "succeeded", "done"))
        self.assertEqual(out.getvalue(), "h\u00e9llo\ntök")
        self.assertEqual(err.getvalue(), "warn\n")

        out, err = io.StringIO(), io.StringIO()
        self.client(api).follow(7, out, err, notes=True)
        self.assertEqual(out.getvalue(), "h\u00e9llo\ntök")
        self.assertEqual(
            err.getvalue(),
            "warn\n== attempt 1 failed: boom\n== attempt 2 on w2\n"
            "== 10 bytes of output not shown (lagged)\n",
        )

        bout, berr = io.BytesIO(), io.BytesIO()
        self.client(api).follow(7, bout, berr)
        self.assertEqual(bout.getvalue(), "h\u00e9llo\ntök".encode())
        self.assertEqual(berr.getvalue(), b"warn\n")

        # The defaults are the process's own streams, as they are when called.
        with mock.patch.object(sys, "stdout", io.StringIO()) as o, mock.patch.object(sys, "stderr", io.StringIO()) as e:
            self.client(api).follow(7)
        self.assertEqual((o.getvalue(), e.getvalue()), ("h\u00e9llo\ntök", "warn\n"))

    def test_logs(self) -> None:
        body = {"id": 7, "state": "succeeded", "attempts": [
            {"attempt": 1, "stage": 0, "worker": "w1", "running": False, "offset": 0,
             "output_bytes": 3, "pieces": [{"stream": "stdout", "text": "hi\n"}]}]}
        api = self.serve(lambda h, n: h.send_json(200, body))
        self.assertEqual(self.client(api).logs(7), body)
        self.assertEqual(api.requests[0][0], "/v1/tasks/7/logs")

    def test_listing_asks_the_api_to_filter_and_follows_next_after(self) -> None:
        pages = [
            {"tasks": [dict(TASK_VIEW, id=9)], "next_after": 9},
            # A filtered page may be empty before the end: the client goes on.
            {"tasks": [], "next_after": 4},
            {"tasks": [dict(TASK_VIEW, id=2)]},
        ]
        api = self.serve(lambda h, n: h.send_json(200, pages[n]))
        got = self.client(api).list(
            agent="py",
            order="desc",
            labels={"team": "red", "zone": "a=b"},
            text="Needle",
            page_size=1,
        )
        self.assertEqual([t.id for t in got], [9, 2])
        queries = [urllib.parse.parse_qs(urllib.parse.urlsplit(p).query) for p, _ in api.requests]
        self.assertEqual(
            queries[0],
            {"limit": ["1"], "order": ["desc"], "agent": ["py"],
             "label": ["team=red,zone=a=b"], "text": ["Needle"]},
        )
        self.assertEqual([q.get("after") for q in queries], [None, ["9"], ["4"]])
        with self.assertRaises(ValueError):
            self.client(api).list_page(order="sideways")
        with self.assertRaises(ValueError):
            self.client(api).list_page(labels={"a,b": "c"})
        self.assertEqual(len(api.requests), 3)

    def test_attempts_carry_output_bytes_and_usage(self) -> None:
        t = Task.from_json({"id": 1, "agent": "llm", "state": "succeeded", "attempts": [
            {"attempt": 1, "worker": "w", "started_at_ms": 1, "output_bytes": 42,
             "usage": {"model": "m", "prompt_tokens": 3, "completion_tokens": 5}},
            {"attempt": 2, "worker": "w", "started_at_ms": 2}]})
        self.assertEqual(t.attempts[0].output_bytes, 42)
        self.assertEqual(t.attempts[0].usage, {"model": "m", "prompt_tokens": 3, "completion_tokens": 5})
        self.assertEqual((t.attempts[1].output_bytes, t.attempts[1].usage), (0, None))


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
