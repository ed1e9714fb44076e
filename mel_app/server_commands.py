"""`mel serve` and `mel deploy`: a standalone Prefect server with a process worker, and the campaign deployment."""

from __future__ import annotations

import argparse
import os
import sys

from mel_app import serve
from mel_app.common import prefect_env


def cmd_serve(args) -> int:
    prefect_env(verbose=False)
    try:
        return serve.serve(args.host, args.port, args.limit, dict(os.environ))
    except serve.ServeError as e:
        print(f"mel: {e}", file=sys.stderr)
        return 1



def cmd_deploy(args) -> int:
    from mel_core import config as config_mod

    if args.run:  # the deployed flow validates too; this fails before anything reaches the server
        config_mod.load(args.config, args.overrides)
    prefect_env(verbose=False)
    url = args.api_url or os.environ.get("PREFECT_API_URL") or serve.api_url("127.0.0.1", serve.DEFAULT_PORT)
    if not serve.healthy(url):
        print(f"mel: no Prefect server at {url}; start one with `mel serve` or pass --api-url", file=sys.stderr)
        return 1
    try:
        serve.deploy(url, dict(os.environ))
    except serve.ServeError as e:
        print(f"mel: {e}", file=sys.stderr)
        return 1
    print(f"mel: deployed prefect.yaml's '{serve.DEPLOYMENT}' to {url} (work pool {serve.POOL})", flush=True)
    if not args.run:
        return 0
    os.environ["PREFECT_API_URL"] = url  # read when prefect is imported below
    from flows.deploy import trigger

    run = trigger(serve.DEPLOYMENT, args.config, args.overrides, args.timeout)
    print(f"mel: flow run {run.name} ({run.id}): {run.state.type.value}", flush=True)
    if run.state.is_failed() or run.state.is_crashed():
        from flows.deploy import failure_lines
        for line in failure_lines(run):
            print(f"mel: {line}", file=sys.stderr, flush=True)
    return 0 if run.state.is_completed() else 1


def _port(text: str) -> int:
    """A TCP port a server can listen on: 1..65535 (0, "any free port", would leave the URL unknown)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (a whole number from 1 to 65535)")
    return port


def register(sub) -> None:
    """The subcommands of this module on `mel`'s parser."""
    sv = sub.add_parser("serve", help="a standalone Prefect server and a process worker (state under ./.prefect)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=_port, default=serve.DEFAULT_PORT, help=f"1-65535 (default {serve.DEFAULT_PORT})")
    sv.add_argument("--limit", type=int, default=None,
                    help=f"most concurrent flow runs on pool {serve.POOL} (e.g. 1 per GPU host); default: no cap")
    sv.set_defaults(fn=cmd_serve)
    dp = sub.add_parser("deploy", help="create prefect.yaml's campaign deployment on a server; --run starts a run")
    dp.add_argument("--api-url", default=None,
                    help=f"the server's API (default: $PREFECT_API_URL, else mel serve's "
                         f"{serve.api_url('127.0.0.1', serve.DEFAULT_PORT)})")
    dp.add_argument("--run", action="store_true", help="then run it and wait for the end")
    dp.add_argument("--config", default="configs/tiny.yaml", help="the run's config (a path the worker can read)")
    dp.add_argument("--timeout", type=float, default=None, help="seconds to wait for the run (default: until it ends)")
    dp.add_argument("overrides", nargs="*", help="key=value overrides of the run")
    dp.set_defaults(fn=cmd_deploy)
