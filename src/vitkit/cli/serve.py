"""`vitkit serve`: the HTTP service and web page, run by uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
from typing import Any

from vitkit.cli.common import add_precision_argument, fail, note

# Host header values for a service on a loopback address (any port).
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
API_KEY_ENV = "VITKIT_API_KEY"
# Idle keep-alive connections count against --max-connections, so they are closed soon; a
# page's calls, made together, still share one.
KEEP_ALIVE_S = 5


def add_serve_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="classify images over HTTP: a JSON API and a web page (at /)"
    )
    p.add_argument("model", metavar="MODEL_DIR", help="model directory or shipped model name")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    p.add_argument("--max-batch", type=int, default=32, help="most images per model call")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a batch waits for more images once its first has arrived",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help="most images waiting for the model (default 8 x --max-batch); beyond it: 503",
    )
    p.add_argument("--max-upload-mb", type=float, default=16.0, help="largest request body")
    p.add_argument(
        "--max-megapixels",
        type=float,
        default=None,
        help="largest image, by its declared size (default: (64 x the model's input size)"
        " squared, from 16.8 to 50)",
    )
    auth = p.add_mutually_exclusive_group()
    auth.add_argument(
        "--api-key",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on the API (/v1/; the page asks for it); "
        f"default: ${API_KEY_ENV}, which keeps the key out of the process list. A --host "
        "other than loopback needs a key, or --no-auth",
    )
    auth.add_argument(
        "--no-auth",
        action="store_true",
        help=f"no API key, even on a --host other than loopback (ignores ${API_KEY_ENV}): "
        "anyone who can reach the address can use the service",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="a web origin (e.g. https://app.example.com) whose pages may call the API from "
        "a browser; repeat for more (default: none, no cross-origin calls)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=256,
        metavar="N",
        help="most connections at once; beyond it: 503 (default 256: room for a full queue "
        "at the default --max-batch, 8 x 32, while bounding the uploads held in memory, "
        "up to --max-upload-mb each)",
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="time to send a whole request body, else 408, so a client that trickles its "
        "body cannot hold a connection (default 10: a 16 MiB upload at 13 Mbit/s)",
    )
    p.add_argument(
        "--max-prompts",
        type=int,
        default=1000,
        metavar="N",
        help="for a CLIP: most prompts (labels x templates) a /v1/zero-shot request may have "
        "embedded; beyond it: 400 (default 1,000; a label set is embedded once, then cached)",
    )
    p.add_argument("--device", default="cpu")
    add_precision_argument(p, "auto")
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="serve the eager model only; by default a compiled model is built in the "
        "background (once: it is kept in vitkit's cache) and takes over when ready",
    )
    p.add_argument(
        "--compiled",
        metavar="DIR",
        help="where `vitkit optimize --out DIR` wrote a compiled model for this one (it is "
        "native code: name only a directory you trust)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    try:  # before anything slow: a usage error is told at once
        api_key = api_key_for(args)
    except ValueError as e:
        return fail("serve", str(e))
    if args.max_connections < 1:
        return fail("serve", f"--max-connections must be at least 1, got {args.max_connections}")
    if args.max_prompts < 2:
        return fail("serve", f"--max-prompts must be at least 2, got {args.max_prompts}")
    # Heavy (FastAPI and uvicorn load in about a second): imported when this command runs.
    import uvicorn

    from vitkit.serve.app import create_app

    _log_to_stderr(args.log_level)
    app = create_app(
        args.model,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_upload_bytes=round(args.max_upload_mb * 1024 * 1024),
        max_pixels=None if args.max_megapixels is None else round(args.max_megapixels * 1e6),
        max_queue=args.max_queue,
        allowed_hosts=loopback_hosts(args.host),
        device=args.device,
        precision=args.precision,
        api_key=api_key,
        cors_origins=args.cors_origin,
        read_timeout_s=args.read_timeout,
        compile=not args.no_compile,
        compiled_dir=args.compiled,
        max_prompts=args.max_prompts,
    )
    try:
        sock = _listen(args.host, args.port)
    except OSError as e:
        return fail("serve", f"cannot listen on {args.host}:{args.port}: {e}")
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if api_key is None and loopback_hosts(args.host) is None:
        note("serve", f"warning: no API key on {args.host}: anyone who can reach it can use it")
    auth = "API key required" if api_key is not None else "no API key"
    print(
        f"vitkit serve: {app.state.service.name} on http://{shown}:{port}/ "
        f"({auth}; API docs at /docs; Ctrl-C stops)",
        flush=True,
    )
    uvicorn.Server(uvicorn.Config(app, **server_options(args))).run(sockets=[sock])
    return 0


def api_key_for(args: argparse.Namespace) -> str | None:
    """The key the API will require: --api-key, else $VITKIT_API_KEY; none with --no-auth.

    Raises ValueError for a --host other than loopback without a key or --no-auth: other
    machines could reach the service.
    """
    if args.no_auth:
        return None
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if key is None and loopback_hosts(args.host) is None:
        raise ValueError(
            f"--host {args.host} can be reached from other machines: give an API key "
            f"(--api-key KEY or ${API_KEY_ENV}), or --no-auth to serve it open to all"
        )
    return key


def _log_to_stderr(level: str) -> None:
    """The service's own log lines (loading, compiling, switching modes) on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("vitkit serve: %(message)s"))
    logger = logging.getLogger("vitkit")
    logger.addHandler(handler)
    logger.setLevel(level.upper())


def server_options(args: argparse.Namespace) -> dict[str, Any]:
    """uvicorn.Config's settings from the command's flags."""
    return {
        "log_level": args.log_level,
        "limit_concurrency": args.max_connections,  # beyond it uvicorn answers 503 at once
        "timeout_keep_alive": KEEP_ALIVE_S,
        "timeout_graceful_shutdown": 5,
    }


def loopback_hosts(host: str) -> list[str] | None:
    """The Host headers to accept when listening on HOST: only loopback names when HOST is a
    loopback address (a web page elsewhere cannot then reach the service by DNS rebinding),
    any otherwise (None)."""
    if host == "localhost":
        return LOOPBACK_HOSTS
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return None
    shown = f"[{host}]" if ":" in host else host  # e.g. 127.0.0.2, also loopback
    return sorted({*LOOPBACK_HOSTS, shown}) if loopback else None


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to HOST:PORT. Binding here, not in uvicorn, lets --port 0 report the
    port the system chose."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    # With proto IPPROTO_TCP (not 0), asyncio sets TCP_NODELAY on each connection; without
    # it, a response's header and body writes meet delayed ACKs and take 40 ms more.
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock
