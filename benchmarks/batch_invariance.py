"""Does a sequence's decode step depend on its batch mates? Where, by how much, and what would
making it not depend cost.

For each chat model (SmolLM2 int8, the Phi-3 int4 fixture; or `--model DIR`), one decode step
of the same row is run alone and inside batches, with every node's output exposed:
  - the first node whose output for that row differs, and the largest difference per op type;
  - the row's logits at batch sizes 1, 2, 3, 4, 5 and 8, with other mates, and in another
    position of the batch;
  - the cost of the alternative not taken: running a lone row's step as two rows (a
    placeholder beside it), so every step takes the multi-row kernel path. Decode steps of one
    and two rows are timed alternately through `ChatModel.decode`, medians.
Needs the `prepare` extra (onnx). Results go to benchmarks/results/batch_invariance.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inference.chat.kv_pool import KVPool  # noqa: E402
from inference.chat.model import ChatModel, KVCache  # noqa: E402
from inference.prepare import default_models_dir  # noqa: E402
from inference.prepare.recipes import RECIPES, build_model  # noqa: E402
from inference.providers import cpu_session  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea, please, now.", "hi",
           "Tell me three facts about cats and dogs and birds."]
Outputs = dict[str, npt.NDArray[Any]]


def _exposed(model: ChatModel, scratch: Path) -> tuple[Any, list[tuple[str, str]]]:
    """A session on a copy of the graph whose every node output is also a graph output."""
    import onnx

    proto = onnx.load(str(model.spec.onnx_file), load_external_data=False)
    existing = {o.name for o in proto.graph.output}
    nodes = [(n.op_type, o) for n in proto.graph.node for o in n.output
             if o and o not in existing]
    for _, name in nodes:
        proto.graph.output.append(onnx.ValueInfoProto(name=name))
    for data in model.spec.onnx_file.parent.glob("*.onnx.data"):  # links are refused
        shutil.copyfile(data, scratch / data.name)
    onnx.save(proto, str(scratch / "exposed.onnx"))
    return cpu_session(scratch / "exposed.onnx").session, nodes


def _step(model: ChatModel, session: Any, rows: list[tuple[KVCache, int]]) -> Outputs:
    """One decode step of `rows` (each a cache and its next token), right-padded."""
    spec, longest = model.spec, max(c.length for c, _ in rows)
    mask = np.zeros((len(rows), longest + 1), dtype=np.int64)
    feeds: dict[str, npt.NDArray[Any]] = {
        spec.input_ids_name: np.asarray([[t] for _, t in rows], dtype=np.int64),
        spec.attention_mask_name: mask}
    for b, (cache, _) in enumerate(rows):
        mask[b, :cache.length + 1] = 1
    for name in rows[0][0].past:
        _, heads, _, size = rows[0][0].past[name].shape
        past = np.zeros((len(rows), heads, longest, size), dtype=rows[0][0].past[name].dtype)
        for b, (cache, _) in enumerate(rows):
            past[b, :, :cache.length] = cache.past[name][0]
        feeds[name] = past
    names = [o.name for o in session.get_outputs()]
    inputs = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in inputs}),
                    strict=True))


def where_it_differs(model: ChatModel) -> dict[str, Any]:
    rows = []
    for text in PROMPTS:
        cache = model.new_cache()
        rows.append((cache, int(np.argmax(model.forward(cache, model.encode_prompt(
            [{"role": "user", "content": text}]))))))
    with tempfile.TemporaryDirectory() as scratch:
        session, nodes = _exposed(model, Path(scratch))
        lone, batched = _step(model, session, rows[:1]), _step(model, session, rows)
        logits = model.spec.logits_name

        def row0(rs: list[tuple[KVCache, int]], at: int = 0) -> npt.NDArray[np.float64]:
            return _step(model, session, rs)[logits][at, -1].astype(np.float64)

        by_size = {n: row0([rows[i % len(rows)] for i in range(n)]) for n in (1, 2, 3, 4, 5, 8)}
        other_mates = row0([rows[0], rows[3], rows[2], rows[1]])
        placed_last = row0([rows[1], rows[2], rows[3], rows[0]], at=3)
    per_op: dict[str, dict[str, float | int]] = {}
    first = None
    for op, name in nodes:
        a, b = lone.get(name), batched.get(name)
        if a is None or b is None or a.ndim == 0 or a.shape[0] != 1 or b.shape[1:] != a.shape[1:]:
            continue  # not a per-row tensor
        diff = float(np.max(np.abs(a[0].astype(np.float64) - b[0].astype(np.float64)))) \
            if a.size else 0.0
        entry = per_op.setdefault(op, {"nodes": 0, "differing": 0, "max_abs_diff": 0.0})
        entry["nodes"] = int(entry["nodes"]) + 1
        entry["differing"] = int(entry["differing"]) + (diff > 0)
        entry["max_abs_diff"] = max(float(entry["max_abs_diff"]), diff)
        if diff > 0 and first is None:
            first = {"op": op, "output": name, "max_abs_diff": diff}
    two = by_size[2]
    return {"first_differing_node": first, "per_op": per_op,
            "max_abs_logit": float(np.max(np.abs(by_size[1]))),
            "row0_vs_batch_of_2": {n: float(np.max(np.abs(v - two))) for n, v in by_size.items()},
            "other_mates_vs_batch_of_4": float(np.max(np.abs(other_mates - by_size[4]))),
            "placed_last_vs_first_of_4": float(np.max(np.abs(placed_last - by_size[4])))}


def padding_cost(model: ChatModel, steps: int, rounds: int) -> dict[str, float]:
    """Decode step time of one row against two (the padded lone step), alternating."""
    prompt = model.encode_prompt([{"role": "user", "content": PROMPTS[0]}])
    need = len(prompt) + rounds * steps + 1
    pool = KVPool(model.kv_layout(), max_rows=2,
                  budget_bytes=2 * 4096 * model.kv_layout().bytes_per_token)
    for _ in range(2):
        model.prefill(pool, pool.add(need), prompt)
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(rounds):
        for n in (1, 2):
            start = time.perf_counter()
            for _ in range(steps):
                model.decode(pool, [1] * n)
            times[n].append((time.perf_counter() - start) / steps * 1e3)
            for row in range(2):
                pool.set_length(row, len(prompt))
    one, two = statistics.median(times[1]), statistics.median(times[2])
    return {"step_ms_one_row": one, "step_ms_two_rows": two, "padded_vs_lone": two / one}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, action="append",
                    help="a chat model folder (default: SmolLM2 and the Phi-3 fixture)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    folders = args.model or [build_model(RECIPES[name], default_models_dir(), print)
                             for name in ("smollm2-135m-instruct", "phi3-tiny-random")]
    results: dict[str, Any] = {"machine": platform.processor() or platform.machine(),
                               "models": {}}
    for folder in folders:
        model = ChatModel.load(folder)
        found = {"batch_invariant_probe": model.batch_invariant, **where_it_differs(model),
                 **padding_cost(model, args.steps, args.rounds)}
        results["models"][folder.name] = found
        first = found["first_differing_node"]
        where = f"{first['op']} {first['output']} ({first['max_abs_diff']:.2g})" if first \
            else "none"
        sizes = found["row0_vs_batch_of_2"]
        among = max(*[v for n, v in sizes.items() if n > 1], found["other_mates_vs_batch_of_4"],
                    found["placed_last_vs_first_of_4"])
        print(f"{folder.name}: lone step == batched step: {model.batch_invariant}")
        print(f"  first differing node: {where}")
        print(f"  logits max |lone - batched| {sizes[1]:.3g} (largest |logit| "
              f"{found['max_abs_logit']:.3g}); among batches of 2-8, other mates, other "
              f"positions: {among:.3g}")
        print(f"  a lone step padded to two rows: {found['step_ms_one_row']:.2f} -> "
              f"{found['step_ms_two_rows']:.2f} ms per step ({found['padded_vs_lone']:.2f}x)")
    out = REPO / "benchmarks/results/batch_invariance.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
