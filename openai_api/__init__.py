"""An OpenAI-compatible HTTP server (chat completions, models, health) in front of the Triton
`internvl` ensemble, which it reaches over gRPC streaming; it loads no model itself.

    python -m openai_api --triton-url 127.0.0.1:8001 --port 9000
"""
