"""Serve a model over HTTP: a JSON API with micro-batched inference, and a web page.

`vitkit.serve.app.create_app(model)` builds the FastAPI application; `vitkit serve MODEL_DIR`
runs it with uvicorn. Nothing here is imported until used, so the `vitkit` command stays quick
to start.
"""
