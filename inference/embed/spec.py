"""Reads an embedding model folder (sentence-transformers layout + an ONNX file).

Pooling (mean, CLS, max), normalisation, maximum length and dimension come from the folder:
1_Pooling/config.json, modules.json, sentence_bert_config.json, config.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from inference.errors import ModelLoadError
from inference.model_files import inside, json_list, json_object

Pooling = Literal["mean", "cls", "max"]


@dataclass(frozen=True)
class EmbeddingModelSpec:
    """What the embedding engine needs to know about one model folder."""

    model_id: str
    folder: Path
    onnx_file: Path
    tokenizer_file: Path
    pooling: Pooling
    normalize: bool
    max_length: int
    dimension: int
    matryoshka: bool

    @classmethod
    def from_folder(cls, folder: Path, model_id: str | None = None) -> EmbeddingModelSpec:
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelLoadError(f"embedding model folder {folder} does not exist")
        onnx_file = next((p for p in (inside(folder, "model.onnx"),
                                      inside(folder, "onnx/model.onnx")) if p.is_file()), None)
        if onnx_file is None:
            raise ModelLoadError(f"{folder} has no model.onnx (or onnx/model.onnx)")
        tokenizer_file = inside(folder, "tokenizer.json")
        if not tokenizer_file.is_file():
            raise ModelLoadError(f"{tokenizer_file} is missing")
        config = json_object(inside(folder, "config.json"))
        pooling_cfg = json_object(inside(folder, "1_Pooling/config.json"))
        modules = json_list(inside(folder, "modules.json"))
        st_cfg = json_object(inside(folder, "sentence_bert_config.json"))
        tok_cfg = json_object(inside(folder, "tokenizer_config.json"))
        dimension = int(pooling_cfg.get("word_embedding_dimension")
                        or config.get("hidden_size") or 0)
        if not dimension:
            raise ModelLoadError(f"{folder} declares no embedding dimension "
                                 "(1_Pooling/config.json or config.json hidden_size)")
        limits = [int(v) for v in (st_cfg.get("max_seq_length"),
                                   config.get("max_position_embeddings"),
                                   tok_cfg.get("model_max_length"))
                  if isinstance(v, int | float) and 0 < v < 1_000_000]
        return cls(
            model_id=model_id or folder.name, folder=folder, onnx_file=onnx_file,
            tokenizer_file=tokenizer_file, pooling=_pooling(pooling_cfg),
            normalize=any(str(m.get("type", "")).endswith("Normalize") for m in modules),
            max_length=min(limits) if limits else 512, dimension=dimension,
            matryoshka=bool(json_object(inside(folder, "npugate.json")).get("matryoshka", False)),
        )


def _pooling(cfg: dict[str, Any]) -> Pooling:
    if not cfg or cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_max_tokens"):
        return "max"
    raise ModelLoadError(f"unsupported pooling mode in 1_Pooling/config.json: {cfg}")
