"""The OpenAI-compatible Ray Serve endpoint over the speculative pipelines.

    serve run deploy/serve.yaml        # http://127.0.0.1:8000/v1/...

- `config.py`: what the Serve config's `args` may say (validated before anything loads).
- `openai_api.py`: the OpenAI request and response shapes, and OpenAI-style errors.
- `backend.py`: the decoder behind a replica (local engine, Ray pipeline or ensemble).
- `admission.py`: one request decodes at a time; a bounded FIFO waits; full -> 503.
- `text.py`: token ids to streamed text, with `stop` strings.
- `metrics.py`: Prometheus metrics through Ray.
- `app.py`: the FastAPI ingress deployment and the application builder.
"""
