"""Where experts live: files on disk, versions, validation, import and export, replicas.

- ``expert_store``: the store (versioned safetensors + JSON records, recovery at start) that validates
  experts and publishes them to the ``registry`` (the in-memory experts requests can name), with
  ``version_files`` (the files on disk), ``mixtures`` (mixtures and the experts they name) and
  ``stored`` (one expert as the store holds it).
- ``uploads``: the files of a format and their metadata -> ``ExpertDraft`` (the API and the CLI).
- ``records`` (metadata, names), ``validation`` (drafts -> validated experts), ``base_model`` (what experts
  are checked against), ``tensor_files`` (bytes <-> tensors, pickle refusal), ``sapt_tensors`` (a SAPT
  bundle's file layout), ``errors`` (refusals with HTTP status and code).
- ``lock``, ``sync`` and ``watcher``: several replicas sharing one folder.
- ``importers`` / ``exporters``: the Transformer² and SAPT reference files and PEFT LoRA folders.
- ``shipped``: the experts shipped with the package (``experts/builtin``).
Never unpickles uploaded bytes (reference ``.pt`` files only through ``torch.load(weights_only=True)``).
"""
