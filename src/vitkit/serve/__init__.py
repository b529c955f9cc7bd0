"""Serve a model over HTTP: a JSON API with micro-batched inference, and a web page.

`vitkit.serve.app.create_app(model)` builds the FastAPI application from its parts: `decode`
(an upload and its limits), `batcher` (micro-batching on the model's thread), `routes` (the
endpoints), `schemas` (what they take and return) and `auth` (the API key and the origins
allowed to call); `vitkit serve MODEL_DIR` runs it with uvicorn. Nothing here is imported
until used, so the `vitkit` command stays quick to start.
"""
