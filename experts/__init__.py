"""What an expert is, where it lives, how a request picks one, and how experts are made.

- ``store/``: experts on disk and in memory (versions, validation, import/export, replicas).
- ``pass1/``: which adaptation serves a request (explicit, prompt, classifier expert, few-shot CEM, SAPT).
- ``train/`` (SVF experts, Transformer²), ``sapt/`` (SAPT continual learning), ``eval/`` (strategies on
  held-out data), ``tasks/`` (benchmarks and generated tasks with their scorers).
Imports ``engine`` and ``adapters``, never ``server``: tensor math stays in ``adapters``, HTTP in ``server``.
"""
