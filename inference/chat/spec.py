"""Reads a chat model folder in the Phi-3-mini ONNX layout into a `ChatModelSpec`.

Every shape, name and token id comes from the folder's files (genai_config.json,
tokenizer_config.json, chat_template.jinja); nothing model-specific is hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.errors import ModelLoadError
from inference.model_files import inside, json_object


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampling for a request that leaves it unset, from genai_config.json's `search` section:
    greedy when the folder says `do_sample: false` (as transformers and onnxruntime-genai would
    decode it), else its temperature, top_p and top_k. Without a `search` section, the OpenAI
    API's defaults."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    @classmethod
    def from_search(cls, search: Any) -> SamplingDefaults:
        if not isinstance(search, dict):
            return cls()
        if not search.get("do_sample", True):
            return cls(temperature=0.0)
        try:
            return cls(temperature=min(max(float(search.get("temperature", 1.0)), 0.0), 2.0),
                       top_p=min(max(float(search.get("top_p", 1.0)), 1e-6), 1.0),
                       top_k=max(int(search.get("top_k", 0)), 0))
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"genai_config.json's search section is invalid: {exc}") from exc


@dataclass(frozen=True)
class ChatModelSpec:
    """What the engine needs to know about one chat model folder."""

    model_id: str
    folder: Path
    onnx_file: Path
    tokenizer_file: Path
    chat_template: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    context_length: int
    eos_token_ids: frozenset[int]
    bos_token: str
    eos_token: str
    input_ids_name: str
    attention_mask_name: str
    position_ids_name: str
    past_key_names: str
    past_value_names: str
    logits_name: str
    present_key_names: str
    present_value_names: str
    sampling: SamplingDefaults = SamplingDefaults()

    @classmethod
    def from_folder(cls, folder: Path, model_id: str | None = None) -> ChatModelSpec:
        """Parse `folder`; raise `ModelLoadError` naming the missing or broken file."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelLoadError(f"chat model folder {folder} does not exist")
        genai = json_object(inside(folder, "genai_config.json"), required=True)
        tok_cfg = json_object(inside(folder, "tokenizer_config.json"))
        try:
            model = genai["model"]
            decoder = model["decoder"]
            inputs = decoder.get("inputs", {})
            outputs = decoder.get("outputs", {})
            onnx_file = inside(folder, str(decoder.get("filename", "model.onnx")))
            num_layers = int(decoder["num_hidden_layers"])
            num_kv_heads = int(decoder.get("num_key_value_heads", decoder["num_attention_heads"]))
            head_size = int(decoder["head_size"])
            context_length = int(model.get("context_length") or genai["search"]["max_length"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(
                f"{folder}/genai_config.json lacks a required field: {exc}") from exc
        if not onnx_file.is_file():
            raise ModelLoadError(f"{onnx_file} is missing")
        tokenizer_file = inside(folder, "tokenizer.json")
        if not tokenizer_file.is_file():
            raise ModelLoadError(f"{tokenizer_file} is missing")
        template = _chat_template(folder, tok_cfg)
        eos = model.get("eos_token_id", [])
        eos_ids = {int(e) for e in (eos if isinstance(eos, list) else [eos])}
        return cls(
            model_id=model_id or folder.name,
            folder=folder,
            onnx_file=onnx_file,
            tokenizer_file=tokenizer_file,
            chat_template=template,
            num_layers=num_layers,
            num_kv_heads=num_kv_heads,
            head_size=head_size,
            context_length=context_length,
            eos_token_ids=frozenset(eos_ids),
            bos_token=_token_text(tok_cfg.get("bos_token")),
            eos_token=_token_text(tok_cfg.get("eos_token")),
            input_ids_name=inputs.get("input_ids", "input_ids"),
            attention_mask_name=inputs.get("attention_mask", "attention_mask"),
            position_ids_name=inputs.get("position_ids", "position_ids"),
            past_key_names=inputs.get("past_key_names", "past_key_values.%d.key"),
            past_value_names=inputs.get("past_value_names", "past_key_values.%d.value"),
            logits_name=outputs.get("logits", "logits"),
            present_key_names=outputs.get("present_key_names", "present.%d.key"),
            present_value_names=outputs.get("present_value_names", "present.%d.value"),
            sampling=SamplingDefaults.from_search(genai.get("search")),
        )


def _chat_template(folder: Path, tok_cfg: dict[str, Any]) -> str:
    # transformers >= 5 writes the template to its own file; older folders keep it inline.
    jinja = inside(folder, "chat_template.jinja")
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    inline = tok_cfg.get("chat_template")
    if isinstance(inline, str) and inline:
        return inline
    if isinstance(inline, list):  # named templates: [{"name": "default", "template": ...}]
        for entry in inline:
            if isinstance(entry, dict) and entry.get("name") == "default":
                return str(entry["template"])
    raise ModelLoadError(
        f"{folder} has no chat template (chat_template.jinja or tokenizer_config.json)"
    )


def _token_text(value: object) -> str:
    if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""
