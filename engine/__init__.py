"""The engine: one owner of the model that turns token-id requests into token outputs, each sequence
carrying its own adaptation.

- ``contract``: the request/output types, the ``Engine`` protocol both engines satisfy, ``stream_outputs``
  and the one admission check.
- ``spec``: what an engine is built from (``EngineSpec``, ``ModelSpec``), made once at the edge.
- ``loader``: the base model (embedded GGUF, Hugging Face folder) and the adaptive layers installed into it.
- ``factory``: which engine runs here (native or vLLM), and building it.
- ``native/``: the built-in engine (continuous batching, exact per-row mixtures; CPU or one GPU).
- ``vllm/``: the same contract served by vLLM.
Knows nothing of HTTP or of expert files: it receives ``adapters.Adaptation`` objects. Imports only
``adapters`` (and itself).
"""
