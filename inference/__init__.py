"""npugate's inference layer: model loading, decoding and batching on ONNX Runtime.

Nothing here knows about HTTP, Quart or JSON wire formats; it can be driven from a plain script.
"""
