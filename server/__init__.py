"""HTTP only: settings, the FastAPI app and its routes, schemas, errors, metrics, background jobs and the
CLI. Builds the typed engine spec from its settings, hands requests to ``experts.pass1`` and the engine,
and never touches tensors; model compute never runs on the event-loop thread.
"""
