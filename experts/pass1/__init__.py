"""Pass 1: which adaptation serves a request.

- ``resolver``: a request's ``model`` and ``adaptation`` fields -> a ``Decision`` (the entry point of the
  HTTP edge); raises ``AdaptationError`` only.
- ``decision``: ``Decision`` and ``AdaptationError``, the types pass 1 hands out.
- ``dispatch`` (with ``classify``, the classification prompt): the ``prompt`` and ``cls_expert`` strategies.
- ``few_shot`` (with ``cem``): a task's mixture of experts from a few examples (Transformer²'s CEM).
- SAPT: the bundle's attention over its tasks (``resolver.sapt_attention``).
Talks to the engine through its contract only (score requests batch with other work).
"""
