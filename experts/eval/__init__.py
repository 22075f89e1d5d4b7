"""Evaluation of adaptation strategies on held-out task data: accuracy with 95% Wilson intervals,
per cell (``evaluate``) or for the whole Transformer² table (``table``), as JSON and Markdown.

- ``strategies``: base / expert built in; the pass-1 strategies plug in through a hook (issue 5).
- ``evaluate``: one (task, strategy) cell.   - ``table``: every cell.   - ``stats``: Wilson interval.
- ``cli``: ``t2serve eval`` / ``python -m experts.eval``. Never imports the server's settings or HTTP code.
"""
