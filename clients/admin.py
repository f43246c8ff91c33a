"""`npugate keys` and `npugate usage`: the admin API's command line (server/ops/admin.py).

It talks to a running server, so it works the same against one replica or many sharing
PostgreSQL, and a revoked key stops at once everywhere. The admin key comes from
--admin-key or NPUGATE_ADMIN_KEY (the first of NPUGATE_ADMIN_KEYS also works).

  npugate keys create alice --models smollm2-135m-instruct --rpm 60 --tokens-per-day 200000
  npugate keys list
  npugate keys show alice
  npugate keys revoke alice
  npugate usage --from 2026-12-01
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import httpx

LIMIT_FLAGS = (("--rpm", "requests_per_minute", "requests per minute"),
               ("--tpm", "tokens_per_minute", "tokens per minute (prompt and generated)"),
               ("--tokens-per-day", "tokens_per_day", "tokens per UTC day"),
               ("--tokens-per-month", "tokens_per_month", "tokens per UTC month"),
               ("--max-concurrent", "max_concurrent", "generations running at once"))


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("--url", default=os.environ.get("NPUGATE_URL",
                                                        "http://127.0.0.1:8000"),
                        help="the server (NPUGATE_URL, default http://127.0.0.1:8000)")
    common.add_argument("--admin-key", default=_admin_key_from_env(),
                        help="an admin key (NPUGATE_ADMIN_KEY)")
    common.add_argument("--json", action="store_true", help="print the server's JSON")
    parser = argparse.ArgumentParser(prog="npugate", allow_abbrev=False)
    top = parser.add_subparsers(dest="command", required=True)
    keys = top.add_parser("keys", help="create, list, show and revoke API keys",
                          allow_abbrev=False)
    sub = keys.add_subparsers(dest="action", required=True)
    create = sub.add_parser("create", parents=[common], allow_abbrev=False,
                            help="create a key; it is printed this once")
    create.add_argument("name", help="what usage and /metrics call the key")
    create.add_argument("--models", help="the models it may use, comma-separated "
                        "(default: every model)")
    for flag, field, meaning in LIMIT_FLAGS:
        create.add_argument(flag, dest=field, type=int, default=0,
                            help=f"{meaning}; 0: no limit")
    create.add_argument("--weight", type=float, default=1.0,
                        help="its share of the fair queues against weight 1 (default 1)")
    create.add_argument("--scope", help="a cache scope NAME shared with other keys given it")
    sub.add_parser("list", parents=[common], allow_abbrev=False, help="every key")
    for action, meaning in (("show", "one key"), ("revoke", "revoke a key, at once")):
        one = sub.add_parser(action, parents=[common], allow_abbrev=False, help=meaning)
        one.add_argument("key", help="the key's id or name")
    usage = top.add_parser("usage", parents=[common], allow_abbrev=False,
                           help="usage by day and key")
    usage.add_argument("--from", dest="first", help="first UTC day, YYYY-MM-DD")
    usage.add_argument("--to", dest="last", help="last UTC day, YYYY-MM-DD")
    usage.add_argument("--key", dest="tenant", help="one key's name")
    return parser


def _admin_key_from_env() -> str | None:
    key = os.environ.get("NPUGATE_ADMIN_KEY")
    if key:
        return key
    keys = [k.strip() for k in os.environ.get("NPUGATE_ADMIN_KEYS", "").split(",") if k.strip()]
    return keys[0] if keys else None


def _call(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {args.admin_key}"} if args.admin_key else {}
    try:
        resp = httpx.request(method, args.url.rstrip("/") + path, headers=headers,
                             timeout=30, **kwargs)
    except httpx.HTTPError as exc:
        raise SystemExit(f"npugate: cannot reach {args.url}: {exc}") from exc
    body = resp.json() if resp.headers.get("content-type", "").startswith(
        "application/json") else {}
    if resp.status_code >= 400:
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        raise SystemExit(f"npugate: {resp.status_code}: {message or resp.text}")
    return body


def _row(key: dict[str, Any]) -> str:
    limits = [f"{flag.lstrip('-')}={key[field]}" for flag, field, _ in LIMIT_FLAGS
              if key.get(field)]
    return "  ".join([f"{key['id']:<21}", f"{key['name']:<16}", f"{key['key_prefix']}...",
                      f"{key['status']:<7}",
                      "models=" + (",".join(key["models"]) if key["models"] else "all"),
                      *limits, *([f"weight={key['weight']:g}"] if key["weight"] != 1 else []),
                      *([f"scope={key['scope']}"] if key.get("scope") else [])])


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "usage":
        params = {k: v for k, v in (("from", args.first), ("to", args.last),
                                    ("tenant", args.tenant)) if v}
        body = _call(args, "GET", "/v1/admin/usage", params=params)
        if args.json:
            print(json.dumps(body, indent=2))
            return 0
        print(f"{'day':<11} {'key':<16} {'requests':>9} {'prompt':>10} {'cached':>10} "
              f"{'generated':>10} {'errors':>7} {'429s':>6}")
        for row in body["data"]:
            print(f"{row['day']:<11} {row['tenant']:<16} {row['requests']:>9} "
                  f"{row['prompt_tokens']:>10} {row['cached_tokens']:>10} "
                  f"{row['generated_tokens']:>10} {row['errors']:>7} {row['rate_limited']:>6}")
        return 0
    if args.action == "create":
        payload: dict[str, Any] = {"name": args.name, "weight": args.weight,
                                   **{field: getattr(args, field) for _, field, _ in LIMIT_FLAGS}}
        if args.models:
            payload["models"] = [m for m in args.models.split(",") if m]
        if args.scope:
            payload["scope"] = args.scope
        body = _call(args, "POST", "/v1/admin/keys", json=payload)
        if args.json:
            print(json.dumps(body, indent=2))
        else:
            print(_row(body))
            print(f"key: {body['key']}\n(shown this once; the server keeps only its hash)")
        return 0
    if args.action == "list":
        body = _call(args, "GET", "/v1/admin/keys")
        print(json.dumps(body, indent=2) if args.json else
              "\n".join(_row(k) for k in body["data"]) or "no keys")
        return 0
    body = _call(args, "DELETE" if args.action == "revoke" else "GET",
                 f"/v1/admin/keys/{args.key}")
    print(json.dumps(body, indent=2) if args.json else _row(body))
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
