"""The vLLM engine backend: the same engine contract as the native engine, served by vLLM.

- ``peft_folder``: LoRA factors (``adapters.lora_export``) as the PEFT folder format vLLM reads.
- ``adapter_cache``: one adapter folder per distinct mixture, LRU with a bound, never evicted in use.
- ``router``: how each request's adaptation is served (base weights, swapped weights, LoRA adapter).
- ``swap_gate``: admission in front of vLLM, so that swapped weights only ever serve their own group.
- ``weight_swap``: the merged weights of an adaptation written once and loaded by every worker.
- ``rows``: per-row adaptation inside vLLM's batches: the scale tables and the adapted layers' math (torch).
- ``rows_worker``: its wiring into vLLM's workers (layers, model-runner hooks, RPCs).
- ``row_router``: its front end (recipes in requests; experts and SAPT bundles registered on the workers).
- ``layers``: where a Hugging Face matrix lives among vLLM's (fused, sharded) linear layers.
- ``worker``: the worker extension that runs inside vLLM's workers (weights loaded in place; rows RPCs).
- ``scoring``: score requests (pass 1, few-shot fitness) as prompt log-probabilities.
- ``engine``: ``VLLMEngine``, the thread that owns vLLM's AsyncLLM and the asyncio-facing API.

Nothing here is imported unless the vllm engine is chosen; only ``engine`` and ``worker`` import vLLM.
"""
