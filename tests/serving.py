"""A real uvicorn server in a thread, `vitkit serve` in a subprocess, and a raw-socket client
that can stop mid-request."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI


def wait_until(condition: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@contextlib.contextmanager
def real_server(app: FastAPI, **options: Any) -> Iterator[tuple[str, uvicorn.Server]]:
    """`app` under uvicorn (with `options` for uvicorn.Config) on a free loopback port, in a
    thread: its base URL and the server."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    # A short graceful shutdown: connections a failed test leaves open do not hold it up.
    options = {"log_level": "warning", "timeout_graceful_shutdown": 2, **options}
    server = uvicorn.Server(uvicorn.Config(app, **options))
    # Off the main thread, uvicorn installs no signal handlers.
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@contextlib.contextmanager
def serve_process(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[str, str, subprocess.Popen]]:
    """`vitkit serve ARGS --port 0` in a subprocess, its stderr in `log`, once /healthz
    answers: its base URL, its first line of output, and the process."""
    command = [sys.executable, "-m", "vitkit", "serve", *args, "--port", "0"]
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env or dict(os.environ)
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.search(r"http://[\d.]+:\d+", line)
        assert found, f"the server did not start: {line!r} {log.read_text()}"
        url = found.group()
        for _ in range(100):
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url, line, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when it had all arrived

    def json(self) -> Any:
        return json.loads(self.body)


def send_part(
    url: str,
    body: bytes,
    content_type: str,
    sent: int,
    path: str = "/v1/predict",
    headers: dict[str, str] | None = None,
) -> socket.socket:
    """A connection that has sent a POST's headers (declaring all of `body`) and its first
    `sent` bytes, then stalls."""
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=30)
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body[:sent])
    return conn


def read_answer(conn: socket.socket, timeout: float) -> Answer:
    """The response on a connection, read within `timeout` seconds."""
    conn.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, "the connection closed in the response's body"
        body += chunk
    conn.close()
    return Answer(int(status_line.split()[1]), headers, body, time.monotonic())
