"""The vLLM engine backend: the same engine contract as the native engine, served by vLLM.

vLLM serves adaptations one way: every request its own row of per-row tables inside vLLM's batches.
- ``rows``: the scale tables and the adapted layers' math (torch).
- ``rows_worker``: its wiring into vLLM's workers (layers, model-runner hooks); every use of vLLM's
  internals beyond its public API lives there, checked at start (``check_hook_points``).
- ``row_router``: its front end (recipes in requests; experts and SAPT bundles registered on the workers).
- ``layers``: where a Hugging Face matrix's rows live among vLLM's (fused, sharded) linear layers.
- ``worker``: the worker extension that runs inside vLLM's workers (the rows' RPCs).
- ``scoring``: score requests (pass 1, few-shot fitness) as prompt log-probabilities.
- ``engine``: ``VLLMEngine``, vLLM's AsyncLLM behind the engine contract.

Nothing here is imported unless the vllm engine is chosen; only ``engine``, ``rows_worker`` and ``worker``
import vLLM.
"""
