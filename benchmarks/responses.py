"""A 12-turn conversation resumed through the Responses API against the same turns through
chat completions with the whole history: time to first token per turn.

In one run, on one model, greedy, `--repeats` times on a fresh `npugate serve` each, after a
warm-up conversation; the two conversations go turn by turn, interleaved, the path that goes
first alternating from turn to turn:
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
from server.core.database import SQLITE_FILE  # noqa: E402

KEYS = {"responses": "sk-bench-responses", "chat": "sk-bench-chat",
        "warm-up": "sk-bench-warm-up"}


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


class ChatConversation:
    """The baseline: each turn resends the whole history."""

    def __init__(self, base: str, model: str, max_tokens: int, key: str) -> None:
        self.base, self.model, self.max_tokens, self.key = base, model, max_tokens, key
        self.messages: list[dict[str, str]] = []

    def ask(self, question: str) -> dict[str, Any]:
        self.messages.append({"role": "user", "content": question})
        result = turn(self.base + "/v1/chat/completions", self.model, self.messages,
                      self.max_tokens, headers={"Authorization": f"Bearer {self.key}"})
        self.messages.append({"role": "assistant", "content": result["answer"]})
        return result


class ResumedConversation:
    """Each turn sends its question and the previous response's id."""

    def __init__(self, base: str, model: str, max_tokens: int) -> None:
        self.base, self.model, self.max_tokens = base, model, max_tokens
        self.previous: str | None = None

    def ask(self, question: str) -> dict[str, Any]:
        result = resumed_turn(self.base, self.model, question, self.previous, self.max_tokens)
        self.previous = result["id"]
        return result


def repeat(model_dir: Path, max_tokens: int, data: Path, responses_first: bool
           ) -> dict[str, Any]:
    """One fresh server: a warm-up conversation (its own key), then the two conversations
    turn by turn, interleaved, the path that goes first alternating from turn to turn (and
    `responses_first` on turn 1), so both see the same state of the machine and the pool."""
    args = ["--chat-model", str(model_dir), "--data-dir", str(data),
            *(a for key in KEYS.values() for a in ("--api-key", key))]
    with served(*args) as base:
        model = model_dir.name
        warm = ChatConversation(base, model, max_tokens, KEYS["warm-up"])
        for question in QUESTIONS:
            warm.ask("Briefly: " + question)
        paths: dict[str, ChatConversation | ResumedConversation] = {
            "responses": ResumedConversation(base, model, max_tokens),
                 "chat": ChatConversation(base, model, max_tokens, KEYS["chat"])}
        out: dict[str, list[dict[str, Any]]] = {"responses": [], "chat": []}
        for i, question in enumerate(QUESTIONS):
            first = (i % 2 == 0) == responses_first
            for name in (("responses", "chat") if first else ("chat", "responses")):
                out[name].append(paths[name].ask(question))
                time.sleep(0.5)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path,
                    default=default_models_dir() / "smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=4, help="an even number: pairs run both "
                    "orders")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/responses.json")
    args = ap.parse_args()
    runs = []
    for i in range(args.repeats):
        data = args.out.parent / f"responses-store-{i}"
        data.mkdir(parents=True, exist_ok=True)
        (data / SQLITE_FILE).unlink(missing_ok=True)
        runs.append(repeat(args.model, args.max_tokens, data=data, responses_first=i % 2 == 0))
    # Whichever path goes second in a turn waits longer (measured: by up to ~200 ms at turn
    # 12, either way round), so each pair of repeats runs both orders on every turn, and the
    # verdicts compare per-turn means over a pair
    verdicts = []
    for k in range(0, len(runs) - 1, 2):
        pair = runs[k:k + 2]
        resp = [statistics.mean(r["responses"][t]["ttft_s"] for r in pair)
                for t in range(len(QUESTIONS))]
        chat = [statistics.mean(r["chat"][t]["ttft_s"] for r in pair)
                for t in range(len(QUESTIONS))]
        ratios = [a / b for a, b in zip(resp, chat, strict=True)]
        verdicts.append({
            "repeats": [k + 1, k + 2],
            "answers_identical": all([t["answer"] for t in r["responses"]]
                                     == [t["answer"] for t in r["chat"]] for r in pair),
            "responses_ttft_ms": [round(x * 1e3) for x in resp],
            "chat_ttft_ms": [round(x * 1e3) for x in chat],
            "responses_turn12_vs_turn2": resp[11] / resp[1],
            "chat_turn12_vs_turn2": chat[11] / chat[1],
            "resumed_vs_chat_median": statistics.median(ratios[1:]),
            "resumed_vs_chat_max": max(ratios[1:])})
    met = bool(verdicts) and all(v["responses_turn12_vs_turn2"] <= 2.0
                                 and v["resumed_vs_chat_max"] <= 1.2 for v in verdicts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "responses", "model": str(args.model),
                                    "max_tokens": args.max_tokens, "runs": runs,
                                    "verdicts": verdicts, "targets_met": met},
                                   indent=2) + "\n")
    print(f"12-turn conversation, {args.model.name}, greedy, {args.max_tokens}-token answers; "
          "TTFT ms per turn (prompt tokens / cached), each repeat on a fresh server")
    for i, run in enumerate(runs):
        print(f"\nrepeat {i + 1} ({'responses' if i % 2 == 0 else 'chat'} first on turn 1)")
        print(f"{'turn':>4} {'responses TTFT':>15} {'prompt/cached':>14} {'chat TTFT':>10} "
              f"{'prompt/cached':>14}")
        for t, (r, c) in enumerate(zip(run["responses"], run["chat"], strict=True), 1):
            print(f"{t:>4} {r['ttft_s'] * 1e3:>15.0f} "
                  f"{r['prompt_tokens']:>7}/{r['cached_tokens']:<6} {c['ttft_s'] * 1e3:>10.0f} "
                  f"{c['prompt_tokens']:>7}/{c['cached_tokens']:<6}")
    for v in verdicts:
        print(f"\nrepeats {v['repeats'][0]}-{v['repeats'][1]}, per-turn means (both orders): "
              "TTFT ms")
        print(f"{'turn':>4} {'responses':>10} {'chat':>6} {'ratio':>6}")
        for t, (a, b) in enumerate(zip(v["responses_ttft_ms"], v["chat_ttft_ms"],
                                       strict=True), 1):
            print(f"{t:>4} {a:>10} {b:>6} {a / b:>6.2f}")
        print(f"answers identical: {v['answers_identical']}; turn 12 / turn 2: responses "
              f"{v['responses_turn12_vs_turn2']:.2f}, chat {v['chat_turn12_vs_turn2']:.2f}; "
              f"resumed / chat, turns 2-12: median {v['resumed_vs_chat_median']:.2f}, "
              f"max {v['resumed_vs_chat_max']:.2f}")
    print(f"\ntargets (turn 12 <= 2x turn 2; resumed <= 1.2x chat) met in every repeat: {met}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
