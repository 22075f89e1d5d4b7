"""``t2serve experts ...``: import, export, list, check and delete experts from the command line.

``import`` reads the files of a format (see ``experts.store.importers``) and either sends them to a running
server (``--url``, with ``--admin-key``): the server imports and serves them at once) or, without a
server, loads the model named by the settings flags (for the target matrices and the fingerprint)
and writes into the expert folder; a server reads that folder when it starts. Both go through the
same upload code as ``POST /v1/experts``. ``export`` writes a stored expert in another format. ``check``
validates every stored expert again (a store written before a rule existed, e.g. the value bounds).
Writing to a folder that running servers use is safe: writers lock it, and the servers serve the new
expert within ``store_poll_interval``.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Callable

IMPORT_FORMATS = ("safetensors", "policy_params", "learnable_params", "peft", "sapt_reference")


def _saved_weights(folder: Path) -> Path:
    """A SAPT task folder as given, or its ``saved_weights`` subfolder (the reference's layout)."""
    return folder / "saved_weights" if (folder / "saved_weights").is_dir() else folder


def upload_parts(fmt: str, paths: list[Path]) -> list[tuple[str, Path]]:
    """(multipart field, file) pairs of an import, in order."""
    if fmt in ("safetensors", "policy_params", "learnable_params"):
        if len(paths) != 1 or not paths[0].is_file():
            raise SystemExit(f"{fmt}: give one file")
        return [("file", paths[0])]
    if fmt == "peft":
        if len(paths) != 1 or not paths[0].is_dir():
            raise SystemExit("peft: give the adapter folder (adapter_config.json + adapter_model.safetensors)")
        return [("config", paths[0] / "adapter_config.json"), ("file", paths[0] / "adapter_model.safetensors")]
    folders = [_saved_weights(p) for p in paths]  # sapt_reference: one folder per task, oldest first
    parts = [(f"lora_weights_{ab}", f / f"lora_weights_{ab}.pt") for f in folders for ab in "AB"]
    return parts + [("trans_input", folders[-1] / "trans_input.pt"),
                    ("prompts_keys_till_now", folders[-1] / "prompts_keys_till_now.pt")]


def _metadata(args) -> dict:
    meta = {"name": args.name, "format": args.format, "description": args.description or ""}
    for key in ("category", "kind", "parametrization", "lora_alpha", "reference_targets"):
        if getattr(args, key, None) is not None:
            meta[key] = getattr(args, key)
    if args.append:
        meta["append"] = True
    return meta


def _multipart(meta: dict, parts: list[tuple[str, Path]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    chunks = [f'--{boundary}\r\nContent-Disposition: form-data; name="metadata"\r\n\r\n'.encode(),
              json.dumps(meta).encode(), b"\r\n"]
    for field, path in parts:
        chunks += [f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{path.name}"\r\n'
                   "Content-Type: application/octet-stream\r\n\r\n".encode(), path.read_bytes(), b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def _request(url: str, method: str, key: str | None, body: bytes | None = None, ctype: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if ctype:
        headers["Content-Type"] = ctype
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers, method=method), timeout=600) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise SystemExit(f"{e.code}: {e.read().decode(errors='replace')}") from e


def _open_store(settings, with_model: bool):
    from experts.store.base_model import BaseModelInfo
    from experts.store.expert_store import ExpertStore

    base = None
    if with_model:
        from engine.loader import load_model

        loaded = load_model(settings.model_spec())
        spec = settings.adapt_targets
        base = BaseModelInfo.from_model(loaded.model, loaded.name, target_spec=spec.split(",") if "," in spec else spec)
    store = ExpertStore(settings.resolved_expert_dir(), base=base, max_bytes=settings.max_expert_bytes)
    store.load(recover=False)
    return store


def cmd_import(args, settings) -> int:
    parts = upload_parts(args.format, [Path(p) for p in args.paths])
    missing = [str(p) for _, p in parts if not p.is_file()]
    if missing:
        raise SystemExit(f"missing file(s): {', '.join(missing)}")
    meta = _metadata(args)
    if args.url:
        body, ctype = _multipart(meta, parts)
        card = _request(args.url.rstrip("/") + "/v1/experts", "POST", args.admin_key, body, ctype)
    else:
        from experts.store.errors import ExpertError
        from experts.store.uploads import Upload, UploadMetadata, to_draft

        store = _open_store(settings, with_model=True)
        files: dict[str, list[bytes]] = {}
        for field, path in parts:
            files.setdefault(field, []).append(path.read_bytes())
        try:
            stored = store.put(to_draft(Upload(UploadMetadata(**meta), files, multipart=True), store))
        except ExpertError as e:
            raise SystemExit(f"refused ({e.code}): {e.message}") from e
        card = {"id": stored.name, "version": stored.record.version, "kind": stored.record.kind,
                "sha256": stored.record.sha256, "path": str(store.root / stored.name)}
    print(json.dumps(card, indent=1))
    return 0


def cmd_export(args, settings) -> int:
    from experts.store.errors import ExpertError
    from experts.store.exporters import export
    from experts.store.tensor_files import read_safetensors

    store = _open_store(settings, with_model=False)
    try:
        record, raw = store.read_file(args.name)
        files = export(record, read_safetensors(raw), args.format, task=args.task, raw=raw)
    except ExpertError as e:
        raise SystemExit(f"{e.code}: {e.message}") from e
    out = Path(args.out)
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
        print(out / rel)
    return 0


def cmd_list(args, settings) -> int:
    if args.url:
        rows = _request(args.url.rstrip("/") + "/v1/experts", "GET", args.admin_key)["data"]
        rows = [(r["id"], r["kind"], r["version"], r["category"], r["status"], r["bytes"]) for r in rows]
    else:
        rows = [(s.name, s.record.kind, s.record.version, s.record.category, s.status, s.record.size)
                for s in _open_store(settings, with_model=False).list()]
    for row in rows:
        print("\t".join("-" if v is None else str(v) for v in row))
    return 0


def cmd_check(args, settings) -> int:
    """Validate every stored expert again, against the served model and today's rules (value bounds
    included): one line per expert, exit 1 if any would not be served."""
    experts = _open_store(settings, with_model=True).list()
    for s in experts:
        print("\t".join([s.name, str(s.record.version), s.status, s.reason or ""]))
    bad = [s.name for s in experts if not s.ready]
    summary = f"{len(experts) - len(bad)} of {len(experts)} expert(s) pass"
    print(summary + (f"; not served: {', '.join(bad)}" if bad else ""), file=sys.stderr)
    return 1 if bad else 0


def cmd_delete(args, settings) -> int:
    if args.url:
        print(json.dumps(_request(f"{args.url.rstrip('/')}/v1/experts/{args.name}", "DELETE", args.admin_key)))
        return 0
    from experts.store.errors import ExpertError

    try:
        _open_store(settings, with_model=False).delete(args.name)
    except ExpertError as e:
        raise SystemExit(f"{e.code}: {e.message}") from e
    print(f"deleted {args.name}")
    return 0


# The settings the expert commands read: the model (its targets and fingerprint) and the store.
EXPERT_SETTINGS = ("model", "served_model_name", "dtype", "device", "cache_dir", "adapt_targets", "threads",
                   "expert_dir", "max_expert_bytes")


def add_subcommand(sub, add_settings_flags: Callable, settings_from_args: Callable) -> None:
    experts = sub.add_parser("experts", help="import, export, list, check and delete experts")
    cmds = experts.add_subparsers(dest="experts_command", required=True)

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = cmds.add_parser(name, help=help)
        add_settings_flags(p, only=EXPERT_SETTINGS)
        p.add_argument("--url", help="a running server (e.g. http://127.0.0.1:8000): go through its API")
        p.add_argument("--admin-key", dest="admin_key", help="Bearer key for --url (the admin key if one is set)")
        p.set_defaults(func=lambda args: func(args, settings_from_args(args)))
        return p

    imp = command("import", cmd_import, "import reference / PEFT / SAPT files as an expert")
    imp.add_argument("format", choices=IMPORT_FORMATS, help="what the files are")
    imp.add_argument("paths", nargs="+", help="file, PEFT folder, or SAPT task folders in task order")
    imp.add_argument("--name", required=True, help="the expert's name in the store (and in requests)")
    imp.add_argument("--category", help="what the expert is for, e.g. math")
    imp.add_argument("--description", help="free text shown in the expert list")
    imp.add_argument("--kind", choices=("svf", "sapt"), help="safetensors: what the file holds (default svf)")
    imp.add_argument("--parametrization", choices=("sakana", "direct"),
                     help="svf: how z scales the singular values: sakana (sigmoid + rescale; the default) | "
                          "direct")
    imp.add_argument("--lora-alpha", dest="lora_alpha", type=float, help="sapt: LoRA alpha (reference default 32)")
    imp.add_argument("--reference-targets", dest="reference_targets",
                     help="policy_params: the target set the reference run adapted (default mlp)")
    imp.add_argument("--append", action="store_true", help="peft: add as a new task of the sapt expert --name")
    exp = command("export", cmd_export, "write a stored expert in another format")
    exp.add_argument("name", help="the stored expert")
    exp.add_argument("format", choices=("safetensors", "policy_params", "learnable_params", "sapt_reference", "peft"),
                     help="the format to write")
    exp.add_argument("out", help="output folder")
    exp.add_argument("--task", type=int, help="peft: which task of a SAPT bundle")
    command("list", cmd_list, "list stored experts")
    command("check", cmd_check, "re-validate every stored expert against the model (exit 1 if any fails)")
    rm = command("delete", cmd_delete, "delete an expert (every version)")
    rm.add_argument("name", help="the stored expert")


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run as: t2serve experts ...")
