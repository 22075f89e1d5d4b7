"""The serving side: settings, model loading, the engine (scheduler + model runner), sampling,
the FastAPI app with its routes and schemas, metrics and the CLI.

The engine works on token ids only and owns the model; HTTP code never touches tensors and model
compute never runs on the event-loop thread.
"""
