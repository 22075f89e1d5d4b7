"""`t2serve` command line. `t2serve serve` flags are generated from the Settings fields, so every
setting has one flag (``--max-num-seqs``) and one environment variable (``T2_MAX_NUM_SEQS``).

Nothing heavy (torch, transformers, the engine) is imported before the arguments are parsed and the port
is bound: ``--help``, a mistyped flag and a taken port answer in a fraction of a second."""
from __future__ import annotations

import argparse
import errno
import logging
import re
import socket
import sys
import time

from pydantic import ValidationError

from server.config import Settings, choices, env_var, flag, shown_default

# argparse names the option first ("argument --port: invalid int value: 'abc'"; booleans as --x/--no-x).
_ARGUMENT = re.compile(r"^argument (--([a-z0-9-]+))((?:/--[a-z0-9-]+)*): ")


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line on stderr (exit 2), no usage block above it; an error about a
    setting's flag also names the setting's environment variable."""

    def error(self, message: str):
        m = _ARGUMENT.match(message)
        name = m.group(2).replace("-", "_") if m else ""
        if name in Settings.model_fields:
            message = f"{m.group(1)}{m.group(3)} ({env_var(name)}): {message[m.end():]}"
        self.exit(2, f"{self.prog}: error: {message}\n")


MODEL_SETTINGS = ("model", "served_model_name", "dtype", "device", "cache_dir", "adapt_targets", "threads")


def _add_settings_flags(p: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """One flag per setting (``only``: these settings, for a subcommand that uses no others)."""
    for name, field in Settings.model_fields.items():
        if only is not None and name not in only:
            continue
        kinds = choices(name)
        text = f"{field.description} (default: {shown_default(name)}) [env {env_var(name)}]"
        # "%" would start a format in argparse's help (e.g. a description saying "50%")
        text = text.replace("%", "%%")
        if kinds == (True, False):
            p.add_argument(flag(name), dest=name, default=None, action=argparse.BooleanOptionalAction, help=text)
        elif kinds:
            p.add_argument(flag(name), dest=name, default=None, choices=kinds, help=text)
        else:
            kind = next((t for t in (int, float) if field.annotation in (t, t | None)), str)
            p.add_argument(flag(name), dest=name, default=None, metavar=name.upper(), type=kind, help=text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**overrides)


def settings_error(e: ValidationError) -> str:
    """One line for the first invalid setting: which flag (and variable), and why."""
    err = e.errors()[0]
    name = str(err["loc"][0]) if err.get("loc") else "?"
    got = f", got {err['input']!r}" if "input" in err and not isinstance(err["input"], dict) else ""
    return f"{flag(name)} ({env_var(name)}): {err['msg']}{got}"


class ListenError(OSError):
    """The server's address cannot be listened on; the message names the setting at fault."""


def listen(host: str, port: int) -> list[socket.socket]:
    """Sockets listening on ``host``:``port`` (every address the host resolves to, as uvicorn would bind),
    opened before the model loads so that a taken port ends the command at once; uvicorn serves on them."""
    try:
        addresses = dict.fromkeys(socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                     flags=socket.AI_PASSIVE))
    except socket.gaierror as e:
        raise ListenError(f"{flag('host')} ({env_var('host')}): cannot resolve {host!r}: {e.strerror}") from e
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in addresses:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart over TIME_WAIT
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen()  # held from now on: a second server on this port fails here, not after loading
    except OSError as e:
        for sock in sockets:
            sock.close()
        name = "port" if e.errno in (errno.EADDRINUSE, errno.EACCES) else "host"
        raise ListenError(f"{flag(name)} ({env_var(name)}): cannot listen on {host}:{port}: {e.strerror}") from e
    return sockets


def cmd_serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    sockets = listen(settings.host, settings.port)
    import uvicorn

    from server.app import create_app
    from server.edge import uvicorn_config

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("uvicorn.access").addFilter(_NoHealthProbes())
    servers: list[uvicorn.Server] = []  # a model that cannot load stops the server: exit 1 below
    app = create_app(settings, on_load_failure=lambda: setattr(servers[0], "should_exit", True))
    servers.append(uvicorn.Server(uvicorn_config(app, settings, host=settings.host, port=settings.port,
                                                 log_level=settings.log_level,
                                                 timeout_graceful_shutdown=settings.shutdown_timeout)))
    for sock in sockets:  # uvicorn names the address only when it binds it itself
        host, port = sock.getsockname()[:2]
        logging.getLogger("t2serve").info("listening on http://%s:%d", f"[{host}]" if ":" in host else host, port)
    servers[0].run(sockets=sockets)
    error = app.state.t2.load_error
    if error is not None:
        print(f"t2serve: error: the model could not be served: {error.splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


class _NoHealthProbes(logging.Filter):
    """Orchestrators probe /health every few seconds: those lines would drown the access log."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        path = str(args[2]) if len(args) > 2 else ""
        return not (path == "/health" or path.startswith("/health?"))


def cmd_prepare(args: argparse.Namespace) -> int:
    """Convert/load the model and compute its SVD factors once (fills the caches), then exit: used at image
    build time so a container starts without either."""
    spec = settings_from_args(args).model_spec()  # a bad setting is reported before torch loads
    from engine.loader import install_adapters, load_model

    loaded = load_model(spec)
    install_adapters(loaded.model, spec.adapt_targets, spec.cache_dir)  # computes and caches the SVD factors
    print(f"ready: {loaded.name} from {loaded.path}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """List the cache folder's entries, or prune them (engine/cache.py says what each kind is)."""
    from engine.cache import KINDS, entries, human, prune

    settings = settings_from_args(args)
    root, store = settings.cache_dir, settings.resolved_expert_dir()
    if args.action == "list":
        now = time.time()
        listed = entries(root, store)
        print(f"{'kind':<9} {'size':>9} {'last used':>10}  path")
        for e in listed:
            age = now - e.used
            used = f"{age / 86400:.1f} d ago" if age >= 86400 else f"{age / 3600:.1f} h ago"
            print(f"{e.kind:<9} {human(e.size):>9} {used:>10}  {e.path}" + (f"  ({e.about})" if e.about else ""))
        total = sum(e.size for e in listed if e.prunable)
        print(f"{len(listed)} entries in {root}; {human(total)} prunable")
        return 0
    removed = prune(root, kinds=tuple(args.kind or KINDS),
                    older_than_s=None if args.older_than_days is None else args.older_than_days * 86400,
                    max_bytes=None if args.max_gb is None else int(args.max_gb * 1e9), expert_dir=store,
                    dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for e in removed:
        print(f"{verb} {e.kind} {e.path} ({human(e.size)})")
    print(f"{verb} {len(removed)} entries, {human(sum(e.size for e in removed))}")
    return 0


def _add_cache_subcommand(sub) -> None:
    from engine.cache import KINDS

    cache = sub.add_parser("cache", help="list or prune the cache folder (converted models, SVD factors, ...)")
    actions = cache.add_subparsers(dest="action", required=True)
    for name, text in (("list", "every entry: kind, size, last use"), ("prune", "remove entries (default: all "
                                                                                "prunable ones; never the expert store)")):
        a = actions.add_parser(name, help=text)
        _add_settings_flags(a, only=("cache_dir", "expert_dir"))
        if name == "prune":
            a.add_argument("--kind", action="append", choices=KINDS, help="only entries of this kind (repeatable)")
            a.add_argument("--older-than-days", type=float, default=None, help="only entries unused this long")
            a.add_argument("--max-gb", type=float, default=None,
                           help="remove the least recently used until the prunable entries fit in this size")
            a.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
        a.set_defaults(func=cmd_cache)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="t2serve", description="Self-adaptive LLM server (Transformer², SAPT)")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    _add_settings_flags(serve)
    serve.set_defaults(func=cmd_serve)
    prep = sub.add_parser("prepare", help="convert and cache the model, then exit")
    _add_settings_flags(prep, only=MODEL_SETTINGS)
    prep.set_defaults(func=cmd_prepare)
    _add_cache_subcommand(sub)
    from server.expert_cli import add_subcommand

    add_subcommand(sub, _add_settings_flags, settings_from_args)
    from experts.eval.cli import add_subcommand as add_eval
    from experts.commands import add_train_subcommand as add_train

    add_train(sub)  # also standalone, without the server settings: python -m experts.train / experts.eval
    add_eval(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from engine.spec import EngineUnavailableError
    from experts.tasks.base import DataMissingError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (EngineUnavailableError, ListenError) as e:  # a setup problem: one line saying what to do, no traceback
        print(f"t2serve: error: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:  # a setting of the wrong type or out of range (flag or environment)
        print(f"t2serve: error: {settings_error(e)}", file=sys.stderr)
        return 2
    except DataMissingError as e:  # training or evaluation data not where the data root says
        print(f"t2serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
