"""What an expert is and where it lives.

- ``registry``: the in-memory experts requests can name (replaced whole; read by the request path).
- ``store``: the on-disk store (versioned safetensors + JSON records, atomic writes, recovery at start)
  that validates experts and publishes them to the registry; ``records`` (metadata, names),
  ``validation`` (drafts -> validated experts), ``base_model`` (what experts are checked against),
  ``tensor_files`` (bytes <-> tensors, pickle refusal), ``sapt_tensors`` (a SAPT bundle's file layout),
  ``atomic`` (crash-safe writes), ``errors`` (refusals with HTTP status and code).
- ``importers`` / ``exporters``: the Transformer² and SAPT reference files and PEFT LoRA folders.
- Pass 1 (``dispatch``, ``classify``, ``cem``, ``few_shot``, ``jobs``) and task definitions / training.
Tensor math stays in ``adapters``; HTTP stays in ``server``.
Never unpickles uploaded bytes (reference ``.pt`` files only through ``torch.load(weights_only=True)``).
"""
