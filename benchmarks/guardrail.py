"""CI guardrail: what must not change unnoticed, checked in under a minute.

Fails (exit 1) when any of these differs from `benchmarks/guardrail_baseline.json`:
  - the token counts of a fixed corpus, on the default embedding model's tokenizer and on the
    default chat model's;
  - the embedding vectors of that corpus (all-MiniLM-L6-v2, each text alone): every value
    within 1e-3 of the baseline's; the digest printed is of the vectors rounded to 4 places,
    for the record (CPUs with other SIMD units may move the last places);
and when the default chat model's (SmolLM2's) build moved or serves what it did not build:
  - the quality gate's counts in its manifest (answers identical to fp32, right answers,
    loops: inference/prepare/quality.py) differ from the baseline's, so a fresh build of the
    pinned sources with the pinned toolchain answers otherwise than the one measured;
  - the engine's greedy answer to any of the gate's prompts differs from the plain loop's
    answer recorded in the manifest at build time (a serving regression).
It also prints throughput ratios against raw onnxruntime measured in the same run (the
batcher against raw batches; batched decode against the plain loop) and never fails on them:
these machines are noisy. After an intended change, `--update` writes a new baseline; commit
it with the change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inference.chat.engine import ChatEngine  # noqa: E402
from inference.chat.model import ChatModel  # noqa: E402
from inference.chat.sampling import SamplingParams  # noqa: E402
from inference.embed.batcher import EmbeddingBatcher  # noqa: E402
from inference.embed.model import EmbeddingModel  # noqa: E402
from inference.limits import ChatLimits  # noqa: E402
from inference.prepare import default_models_dir  # noqa: E402
from inference.prepare.quality import MAX_NEW_TOKENS, PROMPTS  # noqa: E402
from inference.prepare.recipes import MANIFEST, RECIPES, build_model  # noqa: E402

BASELINE = REPO / "benchmarks/guardrail_baseline.json"
EMBEDDING, CHAT = "all-minilm-l6-v2", "smollm2-135m-instruct"
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Local inference keeps data on the device.",
    "Batching merges requests into one model run.",
    "¿Dónde está la biblioteca? Está cerca de la estación.",
    "東京は日本の首都です。",
    "def add(a, b):\n    return a + b",
    "Prices rose 3.5% in March, after 2.1% in February.",
    "emoji 🚀 and symbols ∑ ≠ ∞",
]
PROMPT = [{"role": "user", "content": "Name three primary colours."}]
GATE_COUNTS = ("prompts", "identical", "correct", "correct_fp32", "loops", "loops_fp32")
TOLERANCE = 1e-3


def measure(models_dir: Path) -> tuple[dict[str, Any], dict[str, float], np.ndarray]:
    say = lambda msg: None  # noqa: E731 - models come from the cache
    emb = EmbeddingModel.load(build_model(RECIPES[EMBEDDING], models_dir, say), device="cpu")
    chat_dir = build_model(RECIPES[CHAT], models_dir, say)
    chat = ChatModel.load(chat_dir)
    quality = json.loads((chat_dir / MANIFEST).read_text(encoding="utf-8")).get("quality")
    ids = emb.tokenize(CORPUS)
    vectors = np.stack([emb.embed_batch([x])[0] for x in ids])
    rounded = np.round(vectors.astype(np.float64), 4)
    checked: dict[str, Any] = {
        "embedding_token_counts": [len(x) for x in ids],
        "chat_token_counts": [len(x) for x in chat.encode_texts(CORPUS)],
        "vector_digest": hashlib.sha256(rounded.tobytes()).hexdigest(),
        "vectors": rounded.tolist(),
    }
    ratios = {"embedding": anyio.run(_embedding_ratio, emb),
              "chat": anyio.run(_chat_ratio, chat)}
    if quality is None:
        raise SystemExit(f"{chat_dir} has no quality gate results: rebuild it (npugate "
                         "prepare after deleting the folder)")
    checked["quality"] = {k: quality[k] for k in GATE_COUNTS}
    served = anyio.run(_greedy_answers, chat)
    checked["greedy_answers"] = [{"prompt": p.text, "served": text, "plain_loop": row["answer"]}
                                 for p, text, row in zip(PROMPTS, served, quality["answers"],
                                                         strict=True)]
    return checked, ratios, vectors


async def _greedy_answers(model: ChatModel) -> list[str]:
    """The engine's greedy answers to the quality gate's prompts, one request at a time."""
    engine = ChatEngine(model, ChatLimits(max_running=4))
    answers = []
    async with anyio.create_task_group() as tg:
        await tg.start(engine.run)
        for prompt in PROMPTS:
            stream = await engine.start(prompt.messages(), SamplingParams(
                temperature=0, max_tokens=MAX_NEW_TOKENS))
            answers.append("".join([d.text async for d in stream]))
        tg.cancel_scope.cancel()
    return answers


async def _embedding_ratio(model: EmbeddingModel) -> float:
    """32 concurrent single-text requests through the batcher, against raw length-sorted
    batches of 32 of the same texts: texts per second, batcher / raw."""
    texts = [f"{CORPUS[i % len(CORPUS)]} {i}" for i in range(512)]
    ids = model.tokenize(texts)
    ordered = sorted(ids, key=len)
    start = time.perf_counter()
    for i in range(0, len(ordered), 32):
        model.embed_batch(ordered[i:i + 32])
    raw = len(ids) / (time.perf_counter() - start)
    batcher = EmbeddingBatcher(model)
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        queue = list(ids)

        async def client() -> None:
            while queue:
                await batcher.embed([queue.pop()])

        start = time.perf_counter()
        async with anyio.create_task_group() as clients:
            for _ in range(32):
                clients.start_soon(client)
        served = len(ids) / (time.perf_counter() - start)
        tg.cancel_scope.cancel()
    return served / raw


async def _chat_ratio(model: ChatModel) -> float:
    """4 greedy 48-token answers batched by the engine, against the plain one-at-a-time
    loop: decoded tokens per second, batched / plain."""
    prompt = model.encode_prompt(PROMPT)
    start = time.perf_counter()
    cache = model.new_cache()
    logits = model.forward(cache, prompt)
    for _ in range(47):
        logits = model.forward(cache, [int(np.argmax(logits))])
    plain = 48 / (time.perf_counter() - start)
    engine = ChatEngine(model, ChatLimits(max_running=4, prompt_cache=False))
    tokens = 0
    async with anyio.create_task_group() as tg:
        await tg.start(engine.run)

        async def one() -> None:
            nonlocal tokens
            stream = await engine.start(PROMPT, SamplingParams(temperature=0, max_tokens=48))
            async for _ in stream:  # one delta per decoded token
                tokens += 1

        start = time.perf_counter()
        async with anyio.create_task_group() as streams:
            for _ in range(4):
                streams.start_soon(one)
        batched = tokens / (time.perf_counter() - start)
        tg.cancel_scope.cancel()
    return batched / plain


def compare(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    problems = []
    for key in ("embedding_token_counts", "chat_token_counts"):
        if got[key] != want.get(key):
            problems.append(f"{key} changed: {want.get(key)!r} -> {got[key]!r}")
    for answer in got["greedy_answers"]:
        if answer["served"] != answer["plain_loop"]:
            problems.append(f"the engine's greedy answer to {answer['prompt']!r}, "
                            f"{answer['served']!r}, is not the plain loop's "
                            f"{answer['plain_loop']!r}")
    if got["quality"] != want.get("quality"):
        problems.append(f"the default chat build's quality gate moved: {want.get('quality')} "
                        f"-> {got['quality']}")
    base = np.asarray(want.get("vectors", []), dtype=np.float64)
    vec = np.asarray(got["vectors"], dtype=np.float64)
    if base.shape != vec.shape:
        problems.append(f"vectors changed shape: {base.shape} -> {vec.shape}")
    else:
        worst = float(np.max(np.abs(base - vec))) if base.size else 0.0
        if worst > TOLERANCE:
            problems.append(f"vectors moved by up to {worst:.2e} (tolerance {TOLERANCE}); "
                            f"digest {want.get('vector_digest', '')[:16]} -> "
                            f"{got['vector_digest'][:16]}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, default=default_models_dir())
    ap.add_argument("--update", action="store_true", help="write a new baseline")
    args = ap.parse_args()
    started = time.perf_counter()
    got, ratios, _ = measure(args.models_dir)
    print(f"guardrail: vector digest {got['vector_digest'][:16]}, token counts "
          f"{got['embedding_token_counts']} / {got['chat_token_counts']}")
    same = sum(a["served"] == a["plain_loop"] for a in got["greedy_answers"])
    print(f"guardrail: {same}/{len(got['greedy_answers'])} served greedy answers are the plain "
          f"loop's; quality gate {got['quality']}")
    print(f"guardrail: batcher / raw onnxruntime {ratios['embedding']:.2f}x texts/s; batched "
          f"decode (4 streams) / plain loop {ratios['chat']:.2f}x tok/s (informational)")
    if args.update:
        kept = {k: v for k, v in got.items() if k != "greedy_answers"}
        BASELINE.write_text(json.dumps(kept, indent=1, ensure_ascii=False) + "\n")
        print(f"guardrail: wrote {BASELINE.relative_to(REPO)}")
        return 0
    want = json.loads(BASELINE.read_text(encoding="utf-8"))
    problems = compare(got, want)
    for problem in problems:
        print(f"guardrail: FAIL: {problem}")
    print(f"guardrail: {'FAILED' if problems else 'passed'} in "
          f"{time.perf_counter() - started:.1f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
