"""Stand-in servers on 127.0.0.1 for tests: a flaky OpenAI-compatible judge, a real ``mlflow
server`` in a process of its own, and a proxy in front of it that wants HTTP basic auth (so a test
can tell the MLflow client really sent the credentials of its tracking URI)."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import requests

_CASE = re.compile(r"\[case:([a-z0-9_]+)\]")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FlakyServer:
    """Answers by the ``[case:NAME]`` marker in the request: the first answers of case NAME follow
    ``SCRIPT[NAME]``, later ones succeed. Counts requests per case and records what it was sent."""

    SCRIPT = {
        "ok": [],
        "rate_limited": [("429", "2")],
        "rate_limited_date": [("429", "date+30")],
        "unavailable": [("503", None), ("503", None)],
        "slow": [("slow", None)],
        "garbage": [("garbage", None)],
        "half_json": [("half_json", None)],
        "down": [("503", None)] * 100,
        "too_long": [("400", None)] * 100,
        "forbidden": [("401", None)] * 100,
        "long_wait": [("429", "3600")] * 100,
    }

    def __init__(self, slow_s: float):
        self.slow_s = slow_s
        self.counts: Counter[str] = Counter()
        self.seen: list[dict] = []
        self.lock = threading.Lock()

    def __enter__(self) -> "FlakyServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                text = json.dumps(body.get("messages") or body.get("prompt"))
                case = (_CASE.search(text) or [None, "ok"])[1]
                with owner.lock:
                    n = owner.counts[case]
                    owner.counts[case] += 1
                    owner.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "case": case, "text": text})
                script = owner.SCRIPT[case]
                action, arg = script[n] if n < len(script) else ("ok", None)
                try:
                    self._answer(action, arg, body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (the slow case)
                    pass

            def _answer(self, action, arg, body):
                if action == "slow":
                    time.sleep(owner.slow_s)
                    action = "ok"
                if action == "ok":
                    return self._send(200, json.dumps(_completion(body)).encode())
                if action == "garbage":
                    return self._send(200, b"<html>502 Bad Gateway</html>", "text/html")
                if action == "half_json":
                    return self._send(200, b'{"choices": [{"index": 0, "logpro')
                headers = {}
                if arg == "date+30":
                    headers["Retry-After"] = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
                elif arg:
                    headers["Retry-After"] = arg
                self._send(int(action), b'{"error": "try later"}', headers=headers)

            def _send(self, status, payload, ctype="application/json", headers=None):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _completion(body: dict) -> dict:
    """A chat completion from a judge that puts most mass on one digit (score_only) and writes
    "Score: N" (text mode): N is 4 for a request with a ``[case:...]`` marker, so tests can assert
    it; otherwise it follows a checksum of the request, so a real round gets scores that differ."""
    text = json.dumps(body.get("messages") or body.get("prompt"))
    best = "4" if _CASE.search(text) else str(zlib.crc32(text.encode()) % 6)
    others = [d for d in "012345" if d != best][:2]
    top = [{"token": t, "logprob": lp} for t, lp in ((best, -0.1), (others[0], -2.5), (" " + others[1], -3.0), ("hello", -4.0))]
    n = int(body.get("n") or 1)
    return {
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": f"Fine. Score: {best}"}, "finish_reason": "stop",
             "logprobs": {"content": [{"token": best, "logprob": -0.1, "top_logprobs": top}]}}
            for i in range(n)
        ],
        "usage": {"completion_tokens": 5 * n},
    }


class BasicAuthProxy:
    """Forwards every request to ``upstream`` when it carries ``Authorization: Basic user:password``,
    else answers 401; counts both."""

    def __init__(self, upstream: str, user: str, password: str):
        self.upstream = upstream.rstrip("/")
        self.wanted = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.counts: Counter[str] = Counter()

    def __enter__(self) -> "BasicAuthProxy":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                if self.headers.get("Authorization") != owner.wanted:
                    owner.counts["refused"] += 1
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                owner.counts["forwarded"] += 1
                keep = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
                up = requests.request(self.command, owner.upstream + self.path, data=body, headers=keep, timeout=60)
                self.send_response(up.status_code)
                self.send_header("Content-Type", up.headers.get("Content-Type", "application/octet-stream"))
                self.send_header("Content-Length", str(len(up.content)))
                self.end_headers()
                self.wfile.write(up.content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.port = self.server.server_address[1]
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def mlflow_server(root: Path, timeout_s: float = 180) -> Iterator[str]:
    """A real ``mlflow server`` (sqlite store and artifacts under ``root``) on 127.0.0.1; yields its
    URL. Stopped (its own process group only) on the way out."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
           "--workers", "1"]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
