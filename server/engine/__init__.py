"""The engine: one owner of the model, continuous batching at token boundaries.

- ``types``: plain dataclasses that cross the engine boundary (requests in, outputs out).
- ``kv_cache``: per-slot KV buffers that sequences keep for their lifetime (no per-step copies).
- ``runner``: prefill/decode forwards of a Hugging Face causal LM over the slot cache.
- ``sampling``: pure sampling functions with explicit generators.
- ``scheduler``: moves sequences between waiting/running/finished; never touches tensors.
- ``llm_engine``: the synchronous step loop (schedule -> run -> postprocess).
- ``async_engine``: the thread that runs the loop and the asyncio-facing API used by HTTP.
"""
