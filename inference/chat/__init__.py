"""Chat generation on models in Microsoft's Phi-3-mini ONNX layout (genai_config.json + model.onnx).

Model-folder parsing, prompt templating, sampling, detokenization, stop handling and the decode
scheduler live here. Nothing here knows about HTTP or SSE.
"""
