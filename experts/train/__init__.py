"""Training of SVF experts (Transformer² REFERENCE.md §1) on the tasks of ``experts/tasks``.

- ``config``: the run's settings, reference defaults.      - ``model``: base model + adaptive layers.
- ``rollout``: batched generation through the engine.      - ``objective``: REINFORCE/KL and next-token losses.
- ``trainer``: the loop, validation, best z.               - ``checkpoint``: exact resume.
- ``runlog``: JSONL log, terminal lines, learning curves.  - ``output``: expert file and the expert store.
- ``cli``: ``t2serve train`` / ``python -m experts.train``.
Runs without the server's settings stack (no pydantic, FastAPI), so a bare torch + transformers
machine can train. Never imports HTTP code.
"""
