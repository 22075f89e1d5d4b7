"""``engine.vllm.rows`` wired into vLLM's workers: its linear layers, its model runner, its RPCs.

Written against vLLM 0.25's model runner V2 (``vllm.v1.worker.gpu.model_runner.GPUModelRunner``, which
vLLM picks for dense decoder models; the front end pins it with ``VLLM_USE_V2_MODEL_RUNNER=1``). Three
of its methods are wrapped, in the worker process, before the runner exists:

- ``load_model``: after vLLM loads the weights, every adapted layer gets its SVD factors (computed on this
  GPU from the full matrix, gathered across tensor-parallel ranks, and cached on disk), its bank slices,
  and ``RowLinear`` as its quant method; W of SVF matrices is released. This runs before vLLM profiles
  memory and captures CUDA graphs, so both see the adapted layers.
- ``add_requests``: each new (or resumed) request's slot (its index in the runner's request state) gets
  its scale row from the recipe in ``SamplingParams.extra_args``; requests without one get the base row.
- ``prepare_inputs``: the step's per-token row index (the batch's request indices repeated by their
  scheduled tokens) is written to the fixed buffer every adapted layer reads.

``check_hook_points`` fails loudly when vLLM is another version or these hook points moved. The two vLLM
internals the front end uses (AsyncLLM's output handler, llguidance's request check) live here too and are
checked with them: this module is the one place where the engine reaches past vLLM's public API.
The front end passes the configuration inside vLLM's own config: ``VllmConfig.additional_config[CONFIG_KEY]``
(``RowsConfig.to_config``), which every worker receives with the rest of vLLM's config; a runner without it
is left as vLLM made it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from adapters.svd_cache import load_or_compute_matrices
from adapters.targets import Target, matches_spec
from engine.vllm.layers import replicas, shard_rows
from engine.vllm.rows import RECIPE_KEY, RowLinear, RowTables, adapt_layer, layer_bytes, write_bank

log = logging.getLogger("t2serve.vllm.rows")

CONFIG_KEY = "t2_rows"  # the key of vLLM's additional_config that carries a RowsConfig
SUPPORTED_VLLM = ("0.25.0",)
RUNNER = "vllm.v1.worker.gpu.model_runner.GPUModelRunner"
HOOKED = ("load_model", "add_requests", "prepare_inputs")
BATCH_FIELDS = ("idx_mapping_np", "num_scheduled_tokens", "num_tokens_after_padding")


@dataclass
class RowsConfig:
    targets: str | list[str] = "mlp"  # what SVF adapts and where SAPT banks sit (the adapt_targets setting)
    sapt_rank: int = 64  # bank width: total rank (tasks × r) of the SAPT bundles loaded at once
    svf: bool = True  # False: W kept, no SVD, SVF experts refused (the SAPT bank alone)
    svd_cache: str | None = None  # folder of the SVD cache (None: computed, not stored)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def to_config(self) -> dict:
        """What travels in vLLM's ``additional_config``: the fields, and the compile key."""
        return {**asdict(self), "compile_key": self.compile_key()}

    @classmethod
    def from_config(cls, additional: dict | None) -> "RowsConfig | None":
        raw = (additional or {}).get(CONFIG_KEY)
        if not raw:
            return None
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})

    def compile_key(self) -> str:
        """What vLLM's compiled-graph cache must tell apart: this configuration and the code of the layers
        it traces. vLLM 0.25 keys its ahead-of-time compiled model by its own configuration only (not by the
        traced code), so without this key an engine would load the graph another layout was compiled for."""
        h = hashlib.sha256(self.to_json().encode())
        for module in ("rows.py", "rows_worker.py"):
            h.update((Path(__file__).parent / module).read_bytes())
        return h.hexdigest()[:16]


# --- vLLM internals the front end uses (beyond its public API): kept here, checked with the hooks --------

def start_output_handler(llm) -> None:
    """Start AsyncLLM's output handler now, as vLLM does when AsyncLLM is built on a running loop (engine
    failures are then heard at once, not at the first request)."""
    start = getattr(llm, "_run_output_handler", None)
    if start is not None:
        start()


def guidance_validator():
    """llguidance's own check of a structured-outputs request, as vLLM's grammar backend runs it
    (``(SamplingParams) -> None``, ValueError when it refuses)."""
    from vllm.v1.structured_output.backend_guidance import validate_guidance_grammar

    return validate_guidance_grammar


def check_hook_points() -> None:
    """Raise if this vLLM is not one the hooks were written against, or its hook points moved."""
    import dataclasses
    import importlib

    import vllm

    if vllm.__version__ not in SUPPORTED_VLLM:
        raise RuntimeError(f"per-row adaptation is written against vLLM {' / '.join(SUPPORTED_VLLM)}; "
                           f"this is vLLM {vllm.__version__}: check engine/vllm/rows_worker.py's hook points")
    module, _, name = RUNNER.rpartition(".")
    runner = getattr(importlib.import_module(module), name)
    missing = [m for m in HOOKED if not callable(getattr(runner, m, None))]
    from vllm.v1.worker.gpu.input_batch import InputBatch

    fields = {f.name for f in dataclasses.fields(InputBatch)}
    missing += [f"InputBatch.{f}" for f in BATCH_FIELDS if f not in fields]
    from vllm.model_executor.layers.linear import LinearBase, RowParallelLinear  # noqa: F401
    from vllm.v1.engine.async_llm import AsyncLLM

    missing += [f"AsyncLLM.{m}" for m in ("_run_output_handler",) if not callable(getattr(AsyncLLM, m, None))]
    guidance_validator()  # raises ImportError when it moved

    if missing:
        raise RuntimeError(f"vLLM {vllm.__version__}'s model runner lacks {missing}: the per-row hooks cannot run")


def install_runner_hooks() -> None:
    """Wrap the V2 model runner's hook points (once per process)."""
    import importlib

    check_hook_points()
    module, _, name = RUNNER.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if getattr(cls, "_t2_rows_hooked", False):
        return
    load_model, add_requests, prepare_inputs = (getattr(cls, m) for m in HOOKED)

    def hooked_load_model(self, *args, **kwargs):
        load_model(self, *args, **kwargs)
        config = RowsConfig.from_config(getattr(self.vllm_config, "additional_config", None))
        if config is not None:
            self.t2_rows = WorkerRows.build(self, config)

    def hooked_add_requests(self, scheduler_output):
        add_requests(self, scheduler_output)
        rows = getattr(self, "t2_rows", None)
        if rows is not None and scheduler_output.scheduled_new_reqs:
            slots, recipes = [], []
            for new in scheduler_output.scheduled_new_reqs:
                params = new.sampling_params
                slots.append(self.req_states.req_id_to_index[new.req_id])
                recipes.append((params.extra_args or {}).get(RECIPE_KEY) if params is not None else None)
            rows.tables.admit_many(slots, recipes)

    def hooked_prepare_inputs(self, scheduler_output, batch_desc):
        batch = prepare_inputs(self, scheduler_output, batch_desc)
        rows = getattr(self, "t2_rows", None)
        if rows is not None:
            rows.tables.map_tokens(batch.idx_mapping_np, batch.num_scheduled_tokens, batch.num_tokens_after_padding)
        return batch

    cls.load_model, cls.add_requests, cls.prepare_inputs = hooked_load_model, hooked_add_requests, hooked_prepare_inputs
    cls._t2_rows_hooked = True


# --- the model's layers ---------------------------------------------------------------------------------

@dataclass
class Sub:
    """One Hugging Face matrix inside a vLLM linear layer, as this rank holds it."""

    name: str  # e.g. model.layers.0.mlp.gate_proj
    index: int | None  # its place in a fused layer (None: the whole layer)
    rows: slice  # its rows of the layer's local weight


def _tp(layer) -> tuple[int, int]:
    return int(getattr(layer, "tp_rank", 0)), int(getattr(layer, "tp_size", 1))


def _row_parallel(layer) -> bool:
    from vllm.model_executor.layers.linear import RowParallelLinear

    return isinstance(layer, RowParallelLinear)


def adapted_layers(model: torch.nn.Module, spec) -> list[tuple[torch.nn.Module, list[Sub], list[str]]]:
    """(layer, its matrices in output order, the names among them that ``spec`` adapts), model order."""
    from vllm.model_executor.layers.linear import LinearBase

    packed = getattr(model, "packed_modules_mapping", None) or {}
    out = []
    for name, layer in model.named_modules():
        if not isinstance(layer, LinearBase) or getattr(layer, "weight", None) is None:
            continue
        parent, _, leaf = name.rpartition(".")
        parts = list(packed.get(leaf, [leaf]))
        names = [f"{parent}.{p}" if parent else p for p in parts]
        chosen = [n for n in names if matches_spec(n, spec)]
        if not chosen:
            continue
        if len(parts) == 1:
            subs = [Sub(names[0], None, slice(None))]
        else:
            subs = [Sub(n, i, shard_rows(layer, i)) for i, n in enumerate(names)]
        out.append((layer, subs, chosen))
    return out


def _all_gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Every tensor-parallel rank's ``t`` joined along ``dim``, in rank order: through vLLM's tensor-parallel
    group inside vLLM, through torch.distributed's default group where vLLM's is not set up (CPU tests)."""
    try:
        from vllm.distributed import parallel_state
    except ImportError:
        parallel_state = None
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        from vllm.distributed import tensor_model_parallel_all_gather

        return tensor_model_parallel_all_gather(t, dim=dim)
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts, dim=dim)


def _gather(layer, sub: Sub, local: torch.Tensor) -> torch.Tensor:
    """The full (out, in) matrix of ``sub`` from every rank's part."""
    rank, tp = _tp(layer)
    if tp == 1:
        return local
    if _row_parallel(layer):
        return _all_gather(local.contiguous(), dim=1)
    full = _all_gather(local.contiguous(), dim=0)
    rep = replicas(layer, sub.index)
    return torch.cat(full.chunk(tp)[::rep]) if rep > 1 else full


def _full_shape(layer, sub: Sub, local: torch.Tensor) -> tuple[int, int]:
    """The (out, in) shape of ``sub``'s full matrix, from this rank's part alone (what ``_gather`` would
    return, without moving the weights: the SAPT-only layout needs no factors, so no full matrix)."""
    rank, tp = _tp(layer)
    out, inp = local.shape
    if tp == 1:
        return out, inp
    if _row_parallel(layer):
        return out, inp * tp
    return out * tp // replicas(layer, sub.index), inp


def _this_rank(layer, sub: Sub, local_rows: int, out_side: torch.Tensor, in_side: torch.Tensor):
    """This rank's part of a factor pair of ``sub`` (out_side: (out, r) like U or B; in_side: (r, in) like
    Vh or A): rows of out_side for a column-parallel layer, columns of in_side for a row-parallel one."""
    rank, tp = _tp(layer)
    if tp == 1:
        return out_side, in_side
    if _row_parallel(layer):
        n = in_side.shape[1] // tp
        return out_side, in_side[:, rank * n:(rank + 1) * n]
    start = (rank // replicas(layer, sub.index)) * local_rows
    return out_side[start:start + local_rows], in_side


class WorkerRows:
    """One worker's tables and adapted layers; the RPCs of ``engine.vllm.worker.RowsExtension`` call into it."""

    def __init__(self, tables: RowTables, layers: list[tuple[torch.nn.Module, RowLinear, list[Sub]]],
                 targets: list[Target], seconds: dict):
        self.tables, self.layers, self.targets, self.seconds = tables, layers, targets, seconds
        self.bundle_names: dict[str, list[str]] = {}

    @classmethod
    def build(cls, runner, config: RowsConfig) -> WorkerRows:
        """Install on a vLLM model runner's model: one request slot per request the runner holds."""
        found = adapted_layers(runner.model, config.targets)
        if not found:
            raise ValueError(f"no linear layer of this model matches the adapted targets {config.targets!r}")
        return cls.install(found, config, runner.max_num_reqs, int(runner.input_buffers.input_ids.shape[0]))

    @classmethod
    def install(cls, found: list[tuple[torch.nn.Module, list[Sub], list[str]]], config: RowsConfig, slots: int,
                max_tokens: int) -> WorkerRows:
        """Adapt ``found`` ((layer, its matrices, the adapted ones) as ``adapted_layers`` gives them)."""
        t0 = time.time()
        weights, targets = [], []
        with torch.no_grad():
            for layer, subs, chosen in found:
                for sub in subs:
                    if sub.name in chosen:
                        if not config.svf:  # the SAPT bank alone: shapes only
                            targets.append(Target(sub.name, "linear", *_full_shape(layer, sub, layer.weight[sub.rows])))
                            continue
                        w = _gather(layer, sub, layer.weight[sub.rows])
                        targets.append(Target(sub.name, "linear", w.shape[0], w.shape[1]))
                        weights.append(w)
                        del w
            t1 = time.time()
            factors = load_or_compute_matrices(weights, targets, config.svd_cache, progress=False) if weights else {}
            del weights
            t2 = time.time()
            sigma = {t.name: factors[t.name].S.float() for t in targets if t.name in factors}
            dev = found[0][0].weight.device
            tables = RowTables(sigma, config.sapt_rank, slots, max_tokens, dev)
            layers = []
            for layer, subs, chosen in found:
                if not sigma and not config.sapt_rank:
                    break  # nothing to adapt: the layers stay vLLM's
                pieces, local = [], {}
                for sub in subs:
                    w = layer.weight[sub.rows]
                    pieces.append((sub.name, w))
                    if sub.name in factors:
                        f = factors.pop(sub.name)
                        local[sub.name] = _this_rank(layer, sub, w.shape[0], f.U, f.Vh)
                method = adapt_layer(layer, tables, pieces, local, set(chosen))
                layers.append((layer, method, subs))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        seconds = {"gather": round(t1 - t0, 2), "svd": round(t2 - t1, 2), "install": round(time.time() - t2, 2)}
        log.info("per-row adaptation on %d layers (%d matrices, %d request slots, SAPT bank %d): %s",
                 len(layers), len(targets), tables.rows, tables.sapt_rank, seconds)
        return cls(tables, layers, targets, seconds)

    # --- RPCs -------------------------------------------------------------------------------------------
    def info(self) -> dict:
        sizes = [layer_bytes(layer, method) for layer, method, _ in self.layers]
        return {"targets": [(t.name, t.out_features, t.in_features) for t in self.targets],
                "svf": bool(self.tables.width), "sapt_rank": self.tables.sapt_rank, "rows": self.tables.rows,
                "seconds": self.seconds, "table_bytes": self.tables.memory_bytes(),
                "factor_bytes": sum(b["factors"] for b in sizes), "bank_bytes": sum(b["bank"] for b in sizes),
                "kept_weight_bytes": sum(b["weights"] for b in sizes)}

    def sigma(self) -> dict[str, torch.Tensor]:
        return {n: s.cpu() for n, s in self.tables.sigma.items()}

    def put_expert(self, digest: str, path: str, parametrization: str) -> None:
        from safetensors.torch import load_file

        self.tables.put_expert(digest, load_file(path), parametrization)

    def put_bundle(self, key: str, path: str, rank: int, offset: int) -> int:
        """Load a SAPT bundle's stacked blocks (``<name>.A`` (T·r, in), ``<name>.B`` (out, T·r), scaling
        folded into B) into a free range of the bank; returns its offset."""
        from safetensors.torch import load_file

        tensors = load_file(path)
        names = sorted({k.rsplit(".", 1)[0] for k in tensors})
        width = tensors[f"{names[0]}.A"].shape[0]
        place = self.tables.place_bundle(key, width, rank, offset)
        try:
            for layer, method, subs in self.layers:
                for sub in subs:
                    if sub.name in names:
                        A, B = tensors[f"{sub.name}.A"], tensors[f"{sub.name}.B"]
                        local_rows = next(p.width for p in method.pieces if p.name == sub.name)
                        B, A = _this_rank(layer, sub, local_rows, B, A)
                        dt, dev = layer.t2_down.dtype, layer.t2_down.device
                        write_bank(layer, method, sub.name, place, A.to(dev, dt), B.to(dev, dt))
        except BaseException:
            self.drop_bundle(key)
            raise
        self.bundle_names[key] = names
        return place.offset

    def drop_bundle(self, key: str) -> None:
        place = self.tables.drop_bundle(key)
        if place is None:
            return
        for layer, method, subs in self.layers:
            for p in method.pieces:
                if p.sapt:
                    write_bank(layer, method, p.name, place, None, None)
        self.bundle_names.pop(key, None)


def rows_of(worker) -> WorkerRows:
    rows = getattr(worker.model_runner, "t2_rows", None)
    if rows is None:
        raise RuntimeError("per-row adaptation is not installed in this worker (no rows configuration in vLLM's "
                           "additional_config, or vLLM did not use the V2 model runner)")
    return rows


def write_expert_file(path: Path, z: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({n: v.detach().float().contiguous().cpu() for n, v in z.items()}, str(path))
