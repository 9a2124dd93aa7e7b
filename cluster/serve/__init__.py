"""The OpenAI-compatible Ray Serve endpoint over the speculative pipelines.

    serve run deploy/serve.yaml        # http://127.0.0.1:8000/v1/...

- `config.py`: what the Serve config's `args` may say (validated before anything loads).
- `openai_api.py`: the OpenAI request and response shapes, and OpenAI-style errors.
- `backend.py`: the replica's decoder (`cluster.factory.make_decoder`: batched in the
  replica, or a Ray pipeline / ensemble one request at a time), tokenizing, limits.
- `admission.py`: how many requests a replica holds; past `max_pending` -> 503 + Retry-After.
- `text.py`: token ids to streamed text, with `stop` strings.
- `metrics.py`: Prometheus metrics through Ray.
- `intake.py`: every check on a request before it takes a place (key, body, fields, prompt).
- `responses.py`: an admitted request answered from the decoder's events (JSON or SSE).
- `app.py`: the FastAPI ingress deployment (routes, admission slots) and the application builder.
"""
