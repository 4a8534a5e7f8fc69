"""``difflab serve RUN [RUN ...]``: a local web app to sample and edit with trained models."""

from __future__ import annotations

import argparse
import ipaddress

from ..training import pick_device

DESCRIPTION = """\
A local web app over the runs given: choose a model, a class or prompt (and a negative
prompt), a sampler, steps, guidance, seed and count; watch the progress; see a gallery; edit an
uploaded image with SDEdit or inpaint a mask painted in the browser; download each PNG and
the JSON of the settings that made it. The page is plain HTML/JS served by the app itself
(nothing is loaded from the internet). Models are chosen by name or index in the page; no
path a client sends is ever opened. One job runs at a time (others wait in a queue).
Needs the serve extra: pip install -e ".[serve]".

Security: it binds 127.0.0.1 (only this machine) unless --host says otherwise; on a loopback
address it answers only requests addressed to localhost/127.0.0.1 (no DNS rebinding). There is
no login: bind another address only on a network you trust."""


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="a local web app: sample, SDEdit and inpaint in a browser",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run folder, pipeline folder or checkpoint to offer (each loaded once "
                        "at start-up; the page names it by its folder name)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free)")
    p.add_argument("--device", default="auto", help="torch device (default auto: cuda if any)")
    p.add_argument("--max-count", type=int, default=16, help="most images a job may ask for "
                   "(default 16)")
    p.add_argument("--max-steps", type=int, default=500, help="most sampler steps a job may ask "
                   "for (default 500)")
    p.add_argument("--max-upload-mb", type=float, default=8.0,
                   help="largest request body, uploads included, in MiB (default 8)")
    p.add_argument("--max-image-side", type=int, default=4096,
                   help="largest width or height of an uploaded image in pixels, checked "
                        "before it is decoded (default 4096)")
    p.set_defaults(func=run_serve)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run_serve(args: argparse.Namespace) -> int:
    try:
        from werkzeug.serving import make_server

        from ..serve import ServeLimits, create_app, load_models
        from ..serve.app import LOOPBACK_HOSTS
    except ImportError as e:
        raise ValueError(f"difflab serve needs Flask ({e}): pip install -e \".[serve]\"") from None
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    limits = ServeLimits(max_count=args.max_count, max_steps=args.max_steps,
                         max_upload_bytes=int(args.max_upload_mb * 2**20),
                         max_image_side=args.max_image_side)
    models = load_models(args.runs, device=pick_device(args.device))
    app = create_app(models, limits,
                     trusted_hosts=LOOPBACK_HOSTS if is_loopback(args.host) else None)
    if not is_loopback(args.host):
        print(f"difflab serve: warning: binding {args.host}: any machine that can reach it may "
              "use these models (there is no login)", flush=True)
    server = make_server(args.host, args.port, app, threaded=True)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"difflab serve: {len(models)} model(s) ({', '.join(m.name for m in models)}) at "
          f"http://{shown}:{server.server_port}/  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
