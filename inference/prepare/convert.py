"""Heavy conversion steps, run as `python -m inference.prepare.convert STEP ...` subprocesses
so that torch and transformers never load into the calling process."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def gguf_to_hf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain fp32 transformers folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    config = loaded.config
    # transformers refuses to save a GGUF-loaded model; re-home its weights in a plain one.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.save_pretrained(out)
    tok.save_pretrained(out)


def phi3_random(base_tokenizer: Path, out: Path) -> None:
    """A tiny random-weight Phi-3 with Phi-3's vocabulary size, special tokens and template."""
    import torch
    from tokenizers import AddedToken, Tokenizer
    from transformers import Phi3Config, Phi3ForCausalLM

    from inference.prepare.recipes import PHI3_CHAT_TEMPLATE, PHI3_SPECIAL_TOKENS

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(base_tokenizer))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in PHI3_SPECIAL_TOKENS])
    for offset, token in enumerate(PHI3_SPECIAL_TOKENS):
        if tok.token_to_id(token) != 32000 + offset:
            raise SystemExit(f"{token} landed at id {tok.token_to_id(token)}, not {32000 + offset}")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>",
        "pad_token": "<|endoftext|>", "model_max_length": 4096,
        "tokenizer_class": "LlamaTokenizerFast", "add_bos_token": False,
    }, indent=2), encoding="utf-8")
    (out / "chat_template.jinja").write_text(PHI3_CHAT_TEMPLATE, encoding="utf-8")
    torch.manual_seed(0)
    config = Phi3Config(vocab_size=32064, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        max_position_embeddings=4096, bos_token_id=1,
                        eos_token_id=[32000, 32001, 32007], pad_token_id=32000)
    Phi3ForCausalLM(config).save_pretrained(out)


EXPORT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def export_bert(src: Path, out: Path, min_cosine: float) -> None:
    """Export a transformers BERT encoder to ONNX (token embeddings, dynamic batch and
    sequence) and check it against transformers' own pooled output."""
    import warnings

    import onnxruntime as ort
    import torch
    from transformers import AutoModel

    warnings.filterwarnings("ignore")
    model = AutoModel.from_pretrained(src, attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
            # An explicit additive mask and explicit position ids keep the graph free of the
            # mask-building and broadcast-Add patterns that QNN's HTP simulator miscomputes
            # for batch > 1.
            additive = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * -1e4
            return self.inner(input_ids=input_ids, attention_mask=additive,  # type: ignore[no-any-return]
                              token_type_ids=token_type_ids,
                              position_ids=position_ids).last_hidden_state

    encoder = Encoder(model).eval()
    ids = torch.tensor([[101, 7592, 2088, 102, 0, 0], [101, 7592, 2045, 2003, 1037, 102]])
    mask = (ids != 0).long()
    args = (ids, mask, torch.zeros_like(ids), torch.arange(6)[None].expand(2, 6).contiguous())
    out.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(encoder, args, str(out / "model.onnx"), input_names=list(EXPORT_INPUTS),
                      output_names=["token_embeddings"], opset_version=17, dynamo=False,
                      dynamic_axes={n: {0: "batch_size", 1: "sequence_length"}
                                    for n in (*EXPORT_INPUTS, "token_embeddings")})
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    check_ids = rng.integers(1000, 5000, size=(3, 17))
    check_ids[:, 0], check_ids[:, -1] = 101, 102
    check_mask = np.ones_like(check_ids)
    check_mask[1, 9:] = 0
    feeds = {"input_ids": check_ids, "attention_mask": check_mask,
             "token_type_ids": np.zeros_like(check_ids),
             "position_ids": np.broadcast_to(np.arange(17), check_ids.shape).copy()}
    got = session.run(None, feeds)[0]
    with torch.no_grad():
        want = model(input_ids=torch.tensor(check_ids), attention_mask=torch.tensor(check_mask),
                     token_type_ids=torch.zeros_like(torch.tensor(check_ids))
                     ).last_hidden_state.numpy()
    m = check_mask[:, :, None]
    a, b = (got * m).sum(1) / m.sum(1), (want * m).sum(1) / m.sum(1)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    print(f"export check: cosine against transformers min {cos.min():.6f}")
    if cos.min() < min_cosine:
        raise SystemExit(f"exported model disagrees with transformers: cosine {cos.min():.6f} "
                         f"< {min_cosine}")


def bert_random(tokenizer_dir: Path, out: Path) -> None:
    """A tiny random BERT (seed 0) with a real WordPiece tokenizer, declaring CLS pooling."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        shutil.copyfile(tokenizer_dir / name, out / name)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=128)
    BertModel(config).save_pretrained(out)
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": True,
        "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False}, indent=2))
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}], indent=2))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))


# Chat prompts whose greedy continuations (from the fp32 transformers model) a quantized build
# must reproduce, token by token, when fed the same context.
FIDELITY_PROMPTS = (
    "What is the capital of France?", "Write a haiku about the sea.",
    "Explain what a CPU does in two sentences.", "List three primary colors.",
    "What is 2+2?", "Hi! Who are you?", "Give me a recipe for pancakes.",
    "Why is the sky blue?",
)


def chat_fidelity(hf_dir: Path, onnx_dir: Path, max_new_tokens: int = 48) -> dict[str, float]:
    """How closely an ONNX chat build follows the fp32 transformers model it came from.

    For each prompt, transformers decodes a greedy continuation; then both models see the same
    tokens (teacher forcing), and at every position we compare their next-token distributions:
    `top1` is the share of positions where the argmax agrees, `kl_mean`/`kl_p90` the
    KL(fp32 || build) in nats. The ONNX side runs through npugate's own ChatModel, one token per
    step, as serving does.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from inference.chat.model import ChatModel

    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]
    build = ChatModel.load(onnx_dir)
    agree, kls = 0, []
    for prompt in FIDELITY_PROMPTS:
        ids = build.encode_prompt([{"role": "user", "content": prompt}])
        with torch.no_grad():
            full = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                      do_sample=False, max_new_tokens=max_new_tokens,
                                      eos_token_id=sorted(build.spec.eos_token_ids),
                                      pad_token_id=min(build.spec.eos_token_ids))[0]
            want = reference(full[None]).logits[0, len(ids) - 1:].double().numpy()
        cache, feed = build.new_cache(), ids
        for pos, expected in enumerate(want):
            got = build.forward(cache, feed).astype(np.float64)[: expected.shape[0]]
            p, q = _log_softmax(expected), _log_softmax(got)
            kls.append(float((np.exp(p) * (p - q)).sum()))
            agree += int(np.argmax(got) == np.argmax(expected))
            if len(ids) + pos < len(full):
                feed = [int(full[len(ids) + pos])]
    return {"positions": len(kls), "top1": agree / len(kls), "kl_mean": float(np.mean(kls)),
            "kl_p90": float(np.percentile(kls, 90))}


def _log_softmax(v: Any) -> Any:
    v = v - v.max()
    return v - np.log(np.exp(v).sum())


def check_chat(hf_dir: Path, onnx_dir: Path, out_json: Path, min_top1: float) -> None:
    """Measure fidelity (above), write it to `out_json`, and fail below `min_top1`."""
    result = chat_fidelity(hf_dir, onnx_dir)
    out_json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"fidelity check: next-token argmax agrees with fp32 transformers at "
          f"{result['top1']:.3f} of {result['positions']} positions, "
          f"KL mean {result['kl_mean']:.4f} nats")
    if result["top1"] < min_top1:
        raise SystemExit(f"the quantized model disagrees with its fp32 source: top-1 agreement "
                         f"{result['top1']:.3f} < {min_top1}")


def fp32_answers(hf_dir: Path, onnx_dir: Path) -> list[dict[str, Any]]:
    """The fp32 transformers model's greedy answers to the quality prompts (rendered by the
    build's own template, so both read the same ids)."""
    import torch
    from transformers import AutoModelForCausalLM

    from inference.chat.model import ChatModel
    from inference.prepare.quality import MAX_NEW_TOKENS, PROMPTS

    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]
    build = ChatModel.load(onnx_dir)
    eos = sorted(build.spec.eos_token_ids)
    answers = []
    for prompt in PROMPTS:
        ids = build.encode_prompt(prompt.messages())
        with torch.no_grad():
            full = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                      do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                                      eos_token_id=eos, pad_token_id=eos[0])[0]
        new = [int(t) for t in full[len(ids):]]
        ended = bool(new) and new[-1] in build.spec.eos_token_ids
        new = new[:-1] if ended else new
        answers.append({"ids": new, "ended": ended,
                        "text": build.tokenizer.decode(new, skip_special_tokens=True)})
    return answers


def build_answers(onnx_dir: Path) -> list[dict[str, Any]]:
    """A build's greedy answers to the quality prompts, through npugate's plain loop."""
    from inference.chat.model import ChatModel
    from inference.prepare.quality import MAX_NEW_TOKENS, PROMPTS

    build = ChatModel.load(onnx_dir)
    answers = []
    for prompt in PROMPTS:
        ids, ended = build.greedy(build.encode_prompt(prompt.messages()), MAX_NEW_TOKENS)
        answers.append({"ids": ids, "ended": ended,
                        "text": build.tokenizer.decode(ids, skip_special_tokens=True)})
    return answers


def quality_gate(hf_dir: Path, onnx_dir: Path, out_json: Path, enforce: bool) -> None:
    """Score a build on the quality prompts against its fp32 source (inference.prepare.quality),
    write the result to `out_json`, and with `enforce` fail when the gate does."""
    from inference.prepare.quality import score

    result = score(build_answers(onnx_dir), fp32_answers(hf_dir, onnx_dir))
    out_json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"quality gate: {result['identical']}/{result['prompts']} answers identical to fp32; "
          f"{result['correct']} right (fp32: {result['correct_fp32']}); {result['loops']} loops "
          f"(fp32: {result['loops_fp32']})")
    if enforce and not result["passed"]:
        raise SystemExit(f"the build is worse than its fp32 source: {result['reason']}")


def main(argv: list[str]) -> None:
    step, *args = argv
    if step == "gguf-to-hf":
        gguf_to_hf(Path(args[0]), Path(args[1]))
    elif step == "phi3-random":
        phi3_random(Path(args[0]), Path(args[1]))
    elif step == "bert-export":
        export_bert(Path(args[0]), Path(args[1]), float(args[2]))
    elif step == "chat-check":
        check_chat(Path(args[0]), Path(args[1]), Path(args[2]), float(args[3]))
    elif step == "bert-random":
        bert_random(Path(args[0]), Path(args[1]))
    elif step == "quality-gate":
        quality_gate(Path(args[0]), Path(args[1]), Path(args[2]), args[3:] != ["--report"])
    else:
        raise SystemExit(f"unknown step {step!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
