"""The native engine: one owner of the model, continuous batching at token boundaries, every batch row
with its own exact adaptation (CPU or one GPU).

- ``kv_cache``: per-slot KV buffers that sequences keep for their lifetime (no per-step copies).
- ``prefix_cache``: KV of shared prompt prefixes, computed once.
- ``runner``: prefill/decode forwards of a Hugging Face causal LM over the slot cache.
- ``sampling``: pure sampling functions with explicit generators.
- ``sequence``: one request's state and its incremental detokenizer.
- ``scheduler``: moves sequences between waiting/running/finished; never touches tensors.
- ``llm_engine``: the synchronous step loop (schedule -> run -> postprocess).
- ``async_engine``: the thread that runs the loop, and the ``engine.contract.Engine`` API callers use.
"""
