"""``diffloom serve``: load the model once, then serve the page and the JSON API with uvicorn."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

from diffloom.cli import UsageError

LOOPBACK_NAMES = ["127.0.0.1", "localhost", "[::1]"]  # as the Host header writes them


def serve_command(parser):
    parser.add_argument("--model", metavar="FOLDER_OR_HUB_ID",
                        help="text-to-image pipeline folder (diffusers layout) or Hub repo id; default: the shipped "
                             "shapes-128")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to "
                             "the network, with no login)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    parser.add_argument("--outputs", metavar="FOLDER", default="diffloom-outputs",
                        help="where finished images are written and the gallery reads them "
                             "(default: ./diffloom-outputs)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else mps, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="default: float16 on a GPU, float32 on the CPU")
    return run


def run(args) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UsageError(f"the web UI needs Starlette and uvicorn, and {e.name} is not installed: "
                         f"pip install \"diffloom[serve]\"") from None
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: give a port from 1 to 65535")
    outputs = Path(args.outputs).expanduser()
    if outputs.exists() and not outputs.is_dir():
        raise UsageError(f"--outputs {outputs} is a file; give a folder")

    from .app import create_app
    from .engine import Engine

    engine = Engine.load(args.model, outputs, args.device, args.dtype)
    loopback = is_loopback(args.host)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    app = create_app(engine, trusted_hosts=[*LOOPBACK_NAMES, shown] if loopback else None)
    print(f"diffloom serve: http://{shown}:{args.port}/  (model {engine.model_name}, images in {outputs})",
          file=sys.stderr)
    if not loopback:
        print(f"diffloom serve: listening on {args.host}: anyone who can reach this machine can generate images "
              f"and see the gallery", file=sys.stderr)
    try:
        # An open event stream must not hold the shutdown for the rest of a long run.
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        engine.close()
    return 0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
