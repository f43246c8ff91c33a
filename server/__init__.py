"""npugate's HTTP layer: OpenAI wire schemas, services that drive engines, and thin routes.

Nothing here builds or runs an onnxruntime session; that is `inference/`'s job.
"""
