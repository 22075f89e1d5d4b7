"""SAPT continual learning (REFERENCE.md §2): learn tasks one after another into one bundle of LoRA
blocks whose shared attention routes each request, with ARM keeping old tasks routed; evaluate the
sequence against SAPT without ARM, SeqLoRA and per-task LoRA (AP, F.Ra, FWT, BWT).

- ``config``: the run's settings.            - ``data``: the task sequence as token ids.
- ``blocks``: training LoRA blocks through the adaptation runtime (the serving path).
- ``routing``: batched attention, ARM's KL, served copies of a bundle.
- ``arm``: pseudo-input generators.          - ``learner``: one method learning the sequence.
- ``evaluate``: a_{i,j} through the engine.  - ``metrics``: AP, F.Ra, FWT, BWT.
- ``checkpoint``: task-boundary resume.      - ``run``: ``train sapt`` (bundle to the store).
- ``compare``: ``train sapt --compare``.     - ``report``, ``progress``: tables, heat map, log lines.
- ``cli``: the ``sapt`` subcommand of ``t2serve train`` / ``python -m experts.train``.
Like ``experts.train``, runs without the server's settings stack or HTTP code.
"""
