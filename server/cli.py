"""`t2serve` command line. `t2serve serve` flags are generated from the Settings fields, so every
setting has one flag (``--max-num-seqs``) and one environment variable (``T2_MAX_NUM_SEQS``)."""
from __future__ import annotations

import argparse
import logging
import sys

from server.config import Settings


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, dest=name, default=None, metavar=name.upper(),
                       help=(field.description or "") + f" [env T2_{name.upper()}]")


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app

    settings = settings_from_args(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("uvicorn.access").addFilter(_NoHealthProbes())
    servers: list[uvicorn.Server] = []  # a model that cannot load stops the server: exit 1 below
    app = create_app(settings, on_load_failure=lambda: setattr(servers[0], "should_exit", True))
    servers.append(uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                                 log_level=settings.log_level,
                                                 timeout_graceful_shutdown=settings.shutdown_timeout)))
    servers[0].run()
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
    from engine.loader import install_adapters, load_model

    spec = settings_from_args(args).model_spec()
    loaded = load_model(spec)
    install_adapters(loaded.model, spec.adapt_targets, spec.cache_dir)  # computes and caches the SVD factors
    print(f"ready: {loaded.name} from {loaded.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t2serve", description="Self-adaptive LLM server (Transformer², SAPT)")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    _add_settings_flags(serve)
    serve.set_defaults(func=cmd_serve)
    prep = sub.add_parser("prepare", help="convert and cache the model, then exit")
    _add_settings_flags(prep)
    prep.set_defaults(func=cmd_prepare)
    from server.expert_cli import add_subcommand

    add_subcommand(sub, _add_settings_flags, settings_from_args)
    from experts.eval.cli import add_subcommand as add_eval
    from experts.train.cli import add_subcommand as add_train

    add_train(sub)  # also standalone, without the server settings: python -m experts.train / experts.eval
    add_eval(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from engine.factory import EngineUnavailableError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EngineUnavailableError as e:  # a setup problem: one line saying what to do, no traceback
        print(f"t2serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
