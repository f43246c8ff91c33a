"""Tool calling on `npugate serve` with the default chat model, in one run:

  auto      36 prompts that plainly need one of three tools (the weather in a city, a sum, a
            unit conversion), `tool_choice` "auto", greedy: how often the model calls a tool,
            the right one, and how many calls' arguments validate against the function's
            schema with every object closed (`additionalProperties: false`, as strict mode
            reads it)
  required  the same prompts with `tool_choice` "required", and parallel_tool_calls left
            unset: calls per answer (one is what agents expect) and arguments' validity
  parallel  the same with `parallel_tool_calls: true`: calls per answer

With `--baseline TREE` (another checkout, e.g. the commit before a change), the same three
passes run against that checkout's server too, in the same run. Results go to
benchmarks/results/tools.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.served import served  # noqa: E402
from server.openai.tools import strict_arguments  # noqa: E402

MODEL = "smollm2-135m-instruct"
# The schemas leave objects open, as LangChain's, the Agents SDK's and most agents' do
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 40}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two numbers and return their sum",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "integer", "minimum": -10**9, "maximum": 10**9},
            "b": {"type": "integer", "minimum": -10**9, "maximum": 10**9}},
            "required": ["a", "b"]}}},
    {"type": "function", "function": {
        "name": "convert_units", "description": "Convert an amount from one unit to another",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "integer", "minimum": 0, "maximum": 10**6},
            "source": {"type": "string", "maxLength": 20},
            "target": {"type": "string", "maxLength": 20}},
            "required": ["amount", "source", "target"]}}},
]
CITIES = ["Paris", "Tokyo", "Lagos", "Lima", "Oslo", "Cairo", "Denver", "Hanoi", "Perth",
          "Quito", "Seoul", "Vienna"]
SUMS = [(12, 30), (250, 750), (1234, 5678), (7, 8), (99, 1), (45, 55), (321, 123),
        (1000, 2000), (17, 25), (64, 36), (3, 4), (500, 501)]
CONVERSIONS = [(12, "miles", "kilometres"), (3, "kilograms", "pounds"),
               (100, "fahrenheit", "celsius"), (5, "feet", "metres"), (2, "litres", "cups"),
               (60, "minutes", "seconds"), (10, "inches", "centimetres"),
               (8, "ounces", "grams"), (42, "kilometres", "miles"), (1, "gallon", "litres"),
               (250, "grams", "ounces"), (30, "celsius", "fahrenheit")]
PROMPTS: list[tuple[str, str]] = [
    *((f"What is the weather in {city} right now?", "get_weather") for city in CITIES),
    *((f"What is {a} plus {b}? Use the add tool.", "add") for a, b in SUMS),
    *((f"Convert {n} {src} to {dst}.", "convert_units") for n, src, dst in CONVERSIONS),
]
SCHEMAS = {t["function"]["name"]: strict_arguments(t["function"]["parameters"]) for t in TOOLS}


def _ask(client: httpx.Client, url: str, prompt: str, **extra: Any) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "tools": TOOLS,
            "temperature": 0, "max_tokens": 120, **extra}
    resp = client.post(url, json=body)
    resp.raise_for_status()
    choice = resp.json()["choices"][0]
    calls = choice["message"].get("tool_calls") or []
    valid = 0
    for call in calls:
        fn = call["function"]
        try:
            jsonschema.validate(json.loads(fn["arguments"]), SCHEMAS[fn["name"]])
            valid += 1
        except (jsonschema.ValidationError, json.JSONDecodeError, KeyError):
            pass
    return {"calls": [c["function"]["name"] for c in calls], "valid": valid,
            "finish_reason": choice["finish_reason"],
            "content": (choice["message"].get("content") or "")[:120]}


def _summary(rows: list[dict[str, Any]], wanted: list[str]) -> dict[str, Any]:
    calls = sum(len(r["calls"]) for r in rows)
    return {
        "prompts": len(rows),
        "answers_with_a_call": sum(bool(r["calls"]) for r in rows),
        "call_rate": sum(bool(r["calls"]) for r in rows) / len(rows),
        "right_tool_first": sum(bool(r["calls"]) and r["calls"][0] == w
                                for r, w in zip(rows, wanted, strict=True)) / len(rows),
        "calls": calls,
        "calls_per_answer_max": max(len(r["calls"]) for r in rows),
        "arguments_valid": (sum(r["valid"] for r in rows) / calls) if calls else None,
        "finished_length": sum(r["finish_reason"] == "length" for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another checkout whose server runs the same passes, as a baseline")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/tools.json")
    args = ap.parse_args()
    wanted = [w for _, w in PROMPTS]
    out: dict[str, Any] = {"benchmark": "tools", "model": MODEL, "prompts": len(PROMPTS)}
    started = time.monotonic()
    trees = {"this": REPO, **({"baseline": args.baseline} if args.baseline else {})}
    for name, tree in trees.items():
        print(f"{name} ({tree}):", flush=True)
        out[name] = {}
        with served(tree=tree) as base, httpx.Client(timeout=300) as client:
            url = base + "/v1/chat/completions"
            for mode, extra in (("auto", {"tool_choice": "auto"}),
                                ("required", {"tool_choice": "required"}),
                                ("parallel", {"tool_choice": "required",
                                              "parallel_tool_calls": True})):
                rows = [_ask(client, url, prompt, **extra) for prompt, _ in PROMPTS]
                out[name][mode] = s = {**_summary(rows, wanted), "answers": rows}
                valid = "n/a" if s["arguments_valid"] is None else \
                    f"{s['arguments_valid']:.2f}"
                print(f"  {mode:9} calls in {s['answers_with_a_call']}/{s['prompts']} answers "
                      f"({s['call_rate']:.2f}), right tool first {s['right_tool_first']:.2f}, "
                      f"{s['calls']} calls (at most {s['calls_per_answer_max']} per answer), "
                      f"arguments valid {valid}, cut at max_tokens {s['finished_length']}",
                      flush=True)
    out["seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
