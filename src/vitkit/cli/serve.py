"""`vitkit serve`: the HTTP service and web page, run by uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import socket

from vitkit.cli.common import add_precision_argument, fail, note
from vitkit.infer.optimize import int8_batch_sizes

# Host header values for a service on a loopback address (any port).
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "[::1]"]


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
        "--max-megapixels", type=float, default=50.0, help="largest image, by its declared size"
    )
    p.add_argument("--device", default="cpu")
    add_precision_argument(p, "auto")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    # Heavy (FastAPI and uvicorn load in about a second): imported when this command runs.
    import uvicorn

    from vitkit.serve.app import create_app

    app = create_app(
        args.model,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_upload_bytes=round(args.max_upload_mb * 1024 * 1024),
        max_pixels=round(args.max_megapixels * 1_000_000),
        max_queue=args.max_queue,
        allowed_hosts=loopback_hosts(args.host),
        device=args.device,
        precision=args.precision,
    )
    fast = app.state.service.batcher.model
    if fast.precision == "int8":  # compile every batch size now, not in the first requests
        sizes = int8_batch_sizes(args.max_batch)
        note("serve", f"compiling int8 for batches of {sizes}...")
        seconds = sum(fast.warm_up(n) for n in sizes)
        note("serve", f"compiled in {seconds:.0f} s")
    try:
        sock = _listen(args.host, args.port)
    except OSError as e:
        return fail("serve", f"cannot listen on {args.host}:{args.port}: {e}")
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"vitkit serve: {app.state.service.name} on http://{shown}:{port}/ "
        f"(API docs at /docs; Ctrl-C stops)",
        flush=True,
    )
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


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
