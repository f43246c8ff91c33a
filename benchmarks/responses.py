"""A 12-turn conversation resumed through the Responses API against the same turns through
chat completions with the whole history: time to first token per turn.

In one run, on one model, greedy, `--repeats` times on a fresh `npugate serve` each (the
order of the two paths alternates between repeats):
  responses  each turn sends only its question and `previous_response_id`; the server reads
             the history from its store and the prompt cache skips what its KV still holds
  chat       each turn resends the whole history, as chat clients do (the baseline)
The two paths use different API keys, so neither reuses the other's cached prompts. Answers
must be identical on both paths. Targets (issue 22): turn 12's TTFT at most 2x turn 2's on
the responses path, and a resumed turn at most 1.2x the chat turn with the same history.
Results go to benchmarks/results/responses.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.prompt_cache import QUESTIONS, turn  # noqa: E402
from benchmarks.served import served  # noqa: E402
from inference.prepare import default_models_dir  # noqa: E402

KEYS = {"responses": "sk-bench-responses", "chat": "sk-bench-chat"}


def resumed_turn(base: str, model: str, question: str, previous: str | None,
                 max_tokens: int) -> dict[str, Any]:
    """One streamed Responses turn: its TTFT, answer, usage and id."""
    body = {"model": model, "input": question, "previous_response_id": previous,
            "temperature": 0, "max_output_tokens": max_tokens, "stream": True}
    t0 = time.perf_counter()
    first = 0.0
    pieces: list[str] = []
    final: dict[str, Any] = {}
    with httpx.stream("POST", base + "/v1/responses", json=body, timeout=600,
                      headers={"Authorization": f"Bearer {KEYS['responses']}"}) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = orjson.loads(line[6:])
            if event["type"] == "response.output_text.delta":
                first = first or time.perf_counter()
                pieces.append(event["delta"])
            elif event["type"] in ("response.completed", "response.incomplete"):
                final = event["response"]
    usage = final["usage"]
    return {"ttft_s": first - t0, "answer": "".join(pieces), "id": final["id"],
            "prompt_tokens": usage["input_tokens"],
            "cached_tokens": usage["input_tokens_details"]["cached_tokens"]}


def responses_path(base: str, model: str, max_tokens: int) -> list[dict[str, Any]]:
    turns: list[dict[str, Any]] = []
    previous = None
    for question in QUESTIONS:
        result = resumed_turn(base, model, question, previous, max_tokens)
        turns.append(result)
        previous = result["id"]
    return turns


def chat_path(base: str, model: str, max_tokens: int) -> list[dict[str, Any]]:
    turns: list[dict[str, Any]] = []
    messages: list[dict[str, str]] = []
    with httpx.Client(timeout=600,
                      headers={"Authorization": f"Bearer {KEYS['chat']}"}) as client:
        for question in QUESTIONS:
            messages.append({"role": "user", "content": question})
            result = turn(base + "/v1/chat/completions", model, messages, max_tokens,
                          client=client)
            turns.append(result)
            messages.append({"role": "assistant", "content": result["answer"]})
    return turns


def repeat(model_dir: Path, max_tokens: int, chat_first: bool, data: Path) -> dict[str, Any]:
    args = ["--chat-model", str(model_dir), "--data-dir", str(data),
            *(a for key in KEYS.values() for a in ("--api-key", key))]
    with served(*args) as base:
        model = model_dir.name
        warm = {"Authorization": f"Bearer {KEYS['chat']}"}
        httpx.post(base + "/v1/chat/completions", headers=warm, timeout=120, json={
            "model": model, "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}]})  # warm-up
        out: dict[str, Any] = {}
        for path in (("chat", "responses") if chat_first else ("responses", "chat")):
            run = chat_path if path == "chat" else responses_path
            out[path] = run(base, model, max_tokens)
            time.sleep(0.5)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path,
                    default=default_models_dir() / "smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/responses.json")
    args = ap.parse_args()
    runs = []
    for i in range(args.repeats):
        data = args.out.parent / f"responses-store-{i}"
        data.mkdir(parents=True, exist_ok=True)
        (data / "responses.sqlite3").unlink(missing_ok=True)
        runs.append(repeat(args.model, args.max_tokens, chat_first=i % 2 == 1, data=data))
    verdicts = []
    for run in runs:
        resp, chat = run["responses"], run["chat"]
        ratios = [r["ttft_s"] / c["ttft_s"] for r, c in zip(resp, chat, strict=True)]
        verdicts.append({
            "answers_identical": [t["answer"] for t in resp] == [t["answer"] for t in chat],
            "responses_turn12_vs_turn2": resp[11]["ttft_s"] / resp[1]["ttft_s"],
            "chat_turn12_vs_turn2": chat[11]["ttft_s"] / chat[1]["ttft_s"],
            "resumed_vs_chat_median": statistics.median(ratios[1:]),
            "resumed_vs_chat_max": max(ratios[1:])})
    met = all(v["responses_turn12_vs_turn2"] <= 2.0 and v["resumed_vs_chat_max"] <= 1.2
              for v in verdicts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "responses", "model": str(args.model),
                                    "max_tokens": args.max_tokens, "runs": runs,
                                    "verdicts": verdicts, "targets_met": met},
                                   indent=2) + "\n")
    print(f"12-turn conversation, {args.model.name}, greedy, {args.max_tokens}-token answers; "
          "TTFT ms per turn (prompt tokens / cached), each repeat on a fresh server")
    for i, run in enumerate(runs):
        print(f"\nrepeat {i + 1} ({'chat' if i % 2 else 'responses'} first)")
        print(f"{'turn':>4} {'responses TTFT':>15} {'prompt/cached':>14} {'chat TTFT':>10} "
              f"{'prompt/cached':>14} {'ratio':>6}")
        for t, (r, c) in enumerate(zip(run["responses"], run["chat"], strict=True), 1):
            print(f"{t:>4} {r['ttft_s'] * 1e3:>15.0f} "
                  f"{r['prompt_tokens']:>7}/{r['cached_tokens']:<6} {c['ttft_s'] * 1e3:>10.0f} "
                  f"{c['prompt_tokens']:>7}/{c['cached_tokens']:<6} "
                  f"{r['ttft_s'] / c['ttft_s']:>6.2f}")
        v = verdicts[i]
        print(f"answers identical: {v['answers_identical']}; responses turn 12 / turn 2: "
              f"{v['responses_turn12_vs_turn2']:.2f} (chat: {v['chat_turn12_vs_turn2']:.2f}); "
              f"resumed / chat, turns 2-12: median {v['resumed_vs_chat_median']:.2f}, "
              f"max {v['resumed_vs_chat_max']:.2f}")
    print(f"\ntargets (turn 12 <= 2x turn 2; resumed <= 1.2x chat) met in every repeat: {met}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
