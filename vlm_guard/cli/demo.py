"""``vlm-guard demo``: launch the Gradio demo (plain vs guarded answers, heatmaps, flagged words).

Usage:
    vlm-guard demo [--model ID_OR_PATH] [--head-map DIR] [--host 127.0.0.1] [--port 7860] [--share-on-network]

Binds to the loopback interface unless ``--share-on-network`` is given: a non-loopback ``--host``
without it is refused. No public Gradio share link is ever created.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import signal
import threading

from vlm_guard.cli.arguments import (
    add_allow_pickle_argument,
    add_threads_argument,
    apply_threads,
    int_range,
    max_new_tokens_int,
    positive_float,
    positive_int,
)

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="launch the Gradio demo: plain vs guarded answers with attention heatmaps",
        description="Launch the Gradio demo (needs the 'demo' extra: pip install 'vlm-attention-guard[demo]').",
    )
    parser.add_argument(
        "--model", default=None, help="hub id or local folder of a supported VLM (default: the shipped toy LLaVA)"
    )
    parser.add_argument(
        "--head-map", default=None, help="head map folder from `vlm-guard calibrate` (default: the cached one, if any)"
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help=f"interface to bind (default {DEFAULT_HOST}, loopback only)"
    )
    parser.add_argument("--port", type=int_range(1, 65535), default=DEFAULT_PORT, help="port (default %(default)s)")
    parser.add_argument(
        "--share-on-network",
        action="store_true",
        help="allow a non-loopback --host (e.g. 0.0.0.0): anyone who can reach this machine can use the demo",
    )
    parser.add_argument("--device", default="cpu", help="torch device for the model (default %(default)s)")
    add_threads_argument(parser)
    parser.add_argument(
        "--max-new-tokens",
        type=max_new_tokens_int,
        default=None,
        help="cap of the max-new-tokens control (default 128)",
    )
    parser.add_argument(
        "--max-upload-mb", type=positive_float, default=None, help="largest accepted upload in MB (default 10)"
    )
    parser.add_argument(
        "--max-image-pixels", type=positive_int, default=None, help="largest accepted width*height (default 4096*4096)"
    )
    parser.add_argument("--queue-size", type=positive_int, default=None, help="requests allowed to wait (default 16)")
    parser.add_argument(
        "--max-sessions",
        type=positive_int,
        default=None,
        help="browser sessions whose results are kept in memory; the oldest is dropped beyond it (default 64)",
    )
    parser.add_argument(
        "--session-ttl",
        type=positive_int,
        default=None,
        metavar="SECONDS",
        help="a session's results, its upload and the pictures served are deleted this long after "
        "they were made (default 1800)",
    )
    parser.add_argument("--no-checker", action="store_true", help="do not load the grounding checker")
    add_allow_pickle_argument(parser)
    parser.set_defaults(func=run_demo)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # another host name: treat as network-facing


def check_host(host: str, share_on_network: bool) -> None:
    """Refuse a non-loopback ``host`` unless the user asked for it explicitly.

    Raises:
        UserError: with what to do instead.
    """
    from vlm_guard.cli import UserError

    if not host or not host.strip():
        raise UserError("--host is empty; use 127.0.0.1 (default) or pass an interface address")
    if not is_loopback(host) and not share_on_network:
        raise UserError(
            f"--host {host} would expose the demo to other machines; it binds to {DEFAULT_HOST} by default. "
            "Pass --share-on-network as well if you really want that."
        )


def build_limits(args: argparse.Namespace):
    from vlm_guard.demo.inputs import MEGABYTE, DemoLimits

    defaults = DemoLimits()
    max_new_tokens = args.max_new_tokens or defaults.max_new_tokens
    return DemoLimits(
        max_upload_bytes=int(args.max_upload_mb * MEGABYTE) if args.max_upload_mb else defaults.max_upload_bytes,
        max_image_pixels=args.max_image_pixels or defaults.max_image_pixels,
        max_new_tokens=max_new_tokens,
        default_new_tokens=min(defaults.default_new_tokens, max_new_tokens),
        queue_size=args.queue_size or defaults.queue_size,
        max_sessions=args.max_sessions or defaults.max_sessions,
        session_ttl_seconds=args.session_ttl or defaults.session_ttl_seconds,
    )


def run_demo(args: argparse.Namespace) -> int:
    from vlm_guard.cli import UserError

    check_host(args.host, args.share_on_network)
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a valid port; choose 1..65535")
    try:
        limits = build_limits(args)
    except ValueError as error:
        raise UserError(str(error)) from error
    from vlm_guard.cli.checks import check_device, check_head_map_folder, check_model_argument, check_port

    check_device(args.device)  # before the model loads: one line, not a traceback
    apply_threads(args)
    check_model_argument(args.model)
    check_head_map_folder(args.head_map)
    check_port(args.host, args.port)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from vlm_guard.demo.tempfiles import owned_temp_dir

    with owned_temp_dir() as temp_dir:  # uploads and served pictures live here and go when the server stops
        try:
            import gradio  # noqa: F401
        except ImportError as error:
            raise UserError(
                f"the demo needs gradio ({error}); install it with: pip install 'vlm-attention-guard[demo]'"
            ) from error
        from vlm_guard.demo.app import build_app, launch_options
        from vlm_guard.demo.session import DemoSession

        if not is_loopback(args.host):
            logger.warning("the demo listens on %s: anyone who can reach this machine can use it", args.host)
        try:
            session = DemoSession.load(
                model=args.model,
                head_map=args.head_map,
                limits=limits,
                use_checker=not args.no_checker,
                device=args.device,
                allow_pickle=args.allow_pickle,
            )
        except OSError as error:  # from_pretrained: an id that is neither a folder nor in the local cache
            from vlm_guard.cli.checks import model_load_error

            raise model_load_error(args.model, error) from None
        demo = build_app(session)
        logger.info("temporary files in %s", temp_dir)
        print(
            f"vlm-guard demo on http://{args.host}:{args.port} (model: {session.model_name}); Ctrl+C to stop",
            flush=True,
        )
        with _sigterm_as_interrupt():
            demo.launch(server_name=args.host, server_port=args.port, **launch_options(limits))
    return 0


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM stops the server like Ctrl+C (Gradio shuts down, the temporary folder is removed) instead of
    killing the process on the spot. The previous handler is restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
