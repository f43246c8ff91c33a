"""Chat precision benchmark: how faithful and how fast each ONNX build of SmolLM2 is.

The packaged SmolLM2-135M-Instruct is a GGUF file whose weights are Q4_1 (4-bit with a scale
and a float minimum per 32 values) and whose embedding/LM head is Q8_0. `npugate prepare`
dequantizes it to fp32 and builds ONNX from that. This benchmark builds the same fp32 folder
four ways with onnxruntime-genai's model builder, all in one run:
  fp32       no quantization: the baseline, exactly the source model
  int4       the builder's default int4 (symmetric, block 32): the recipe before revision 2
  int8       symmetric int8, block 32
  int8-asym  asymmetric int8, block 32: what `npugate prepare` builds now
For each it measures fidelity to the fp32 transformers model (teacher-forced next-token
argmax agreement and KL, inference.prepare.convert.chat_fidelity), then time to first token
and greedy decode tokens/s through npugate's ChatModel (rounds interleaved, medians), and the
greedy answer to one question. Needs the `prepare` extra. Results go to
benchmarks/results/chat_precision.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.chat_stream import raw_loop  # noqa: E402
from inference.chat.model import ChatModel  # noqa: E402
from inference.prepare import default_models_dir  # noqa: E402
from inference.prepare.convert import FIDELITY_PROMPTS, chat_fidelity  # noqa: E402
from inference.prepare.recipes import (  # noqa: E402
    SMOLLM2_GGUF,
    downloads_dir,
    onnx_builder,
    run_step,
)
from inference.prepare.sources import fetch  # noqa: E402

VARIANTS: dict[str, tuple[str, ...]] = {
    "fp32": ("fp32",),
    "int4": ("int4",),
    "int8": ("int8",),
    "int8-asym": ("int8", "is_symmetric=false"),
}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def build_variants(work: Path, models_dir: Path) -> dict[str, Path]:
    gguf = fetch(SMOLLM2_GGUF, downloads_dir(models_dir), work / "model.gguf")
    hf_dir = work / "hf"
    run_step(print, "dequantizing GGUF to fp32 transformers",
             [sys.executable, "-m", "inference.prepare.convert", "gguf-to-hf", str(gguf),
              str(hf_dir)], work / "build.log")
    folders = {}
    for name, (precision, *options) in VARIANTS.items():
        folders[name] = work / name
        onnx_builder(print, hf_dir, folders[name], work, precision, *options)
    return folders


def greedy_answer(model: ChatModel, max_tokens: int = 60) -> str:
    cache, feed, out = model.new_cache(), model.encode_prompt(QUESTION), []
    for _ in range(max_tokens):
        token = int(model.forward(cache, feed).argmax())
        if token in model.spec.eos_token_ids:
            break
        out.append(token)
        feed = [token]
    return str(model.tokenizer.decode(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models-dir", type=Path, default=default_models_dir(),
                    help="where the verified GGUF download is kept")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path,
                    default=REPO / "benchmarks/results/chat_precision.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="npugate-precision-") as tmp:
        work = Path(tmp)
        folders = build_variants(work, args.models_dir)
        fidelity = {}
        for name, folder in folders.items():
            fidelity[name] = chat_fidelity(work / "hf", folder)
            print(f"{name}: top-1 {fidelity[name]['top1']:.3f}", flush=True)
        models = {name: ChatModel.load(folder) for name, folder in folders.items()}
        answers = {name: greedy_answer(m) for name, m in models.items()}
        sizes = {name: sum(f.stat().st_size for f in folder.glob("model.onnx*"))
                 for name, folder in folders.items()}
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in models}
        for i in range(args.rounds + 1):  # round 0 warms up
            for name, model in models.items():
                time.sleep(0.5)  # let the previous model's spinning threads go idle
                run = raw_loop(model, args.max_tokens)
                if i:
                    runs[name].append(run)

    summary = {name: {**fidelity[name],
                      "ttft_ms_p50": statistics.median(r["ttft_ms"] for r in runs[name]),
                      "decode_tok_s_p50": statistics.median(r["decode_tok_s"]
                                                            for r in runs[name]),
                      "onnx_mb": sizes[name] / 1e6, "answer": answers[name]}
                   for name in models}
    report = {"benchmark": "chat_precision", "source": SMOLLM2_GGUF.spec,
              "rounds": args.rounds, "max_tokens": args.max_tokens,
              "machine": {"cpus": len(os.sched_getaffinity(0)),
                          "platform": platform.platform(), "python": platform.python_version()},
              "summary": summary, "raw": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    base = summary["fp32"]["decode_tok_s_p50"]
    print(f"{'build':<11}{'top-1':>7}{'KL mean':>9}{'KL p90':>8}{'TTFT ms':>9}"
          f"{'decode tok/s':>14}{'vs fp32':>9}{'MB':>6}")
    for name, s in summary.items():
        print(f"{name:<11}{s['top1']:>7.3f}{s['kl_mean']:>9.4f}{s['kl_p90']:>8.4f}"
              f"{s['ttft_ms_p50']:>9.1f}{s['decode_tok_s_p50']:>14.1f}"
              f"{s['decode_tok_s_p50'] / base:>8.2f}x{s['onnx_mb']:>6.0f}")
    print(f"\n{QUESTION[0]['content']!r}, greedy:")
    for name, s in summary.items():
        print(f"  {name:<10} {s['answer'][:100]!r}")
    print(f"({fidelity['fp32']['positions']} teacher-forced positions over "
          f"{len(FIDELITY_PROMPTS)} prompts)\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
