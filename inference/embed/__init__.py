"""Sentence embeddings on ONNX encoder models (sentence-transformers folder layout).

Folder parsing, tokenization, pooling and the cross-request micro-batcher live here.
"""
