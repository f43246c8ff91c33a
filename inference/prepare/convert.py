"""Heavy conversion steps, run as `python -m inference.prepare.convert STEP ...` subprocesses
so that torch and transformers never load into the calling process."""

from __future__ import annotations

import json
import sys
from pathlib import Path


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


def main(argv: list[str]) -> None:
    step, *args = argv
    if step == "gguf-to-hf":
        gguf_to_hf(Path(args[0]), Path(args[1]))
    elif step == "phi3-random":
        phi3_random(Path(args[0]), Path(args[1]))
    else:
        raise SystemExit(f"unknown step {step!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
