"""LoRA factors as a PEFT folder (adapter_config.json + adapter_model.safetensors), the format vLLM reads,
with lora_alpha = r so the LoRA scaling is 1 and everything lives in B; and back."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapters.atomic import atomic_folder
from adapters.lora_export import LoraFactors

PEFT_PREFIX = "base_model.model."  # PEFT's prefix before the model's own module names
REPORT_FILE = "t2_report.json"  # what the adapter serves, next to the PEFT files


def peft_config(loras: Mapping[str, LoraFactors], base_model: str) -> dict:
    r = max(f.rank for f in loras.values())
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": r,  # scaling alpha / r = 1: B carries every factor
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in loras}),
        "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "inference_mode": True,
    }


def write_peft_adapter(folder: Path, loras: Mapping[str, LoraFactors], base_model: str,
                       dtype: torch.dtype, report: dict | None = None) -> Path:
    """Write ``loras`` (target module name -> factors) as a PEFT LoRA folder; atomic (rename into place).

    Matrices with rank 0 are left out; at least one must remain."""
    loras = {n: f for n, f in loras.items() if f.rank > 0}
    if not loras:
        raise ValueError("an adapter needs at least one matrix with a non-zero change")
    tensors = {}
    for name, f in loras.items():
        if f.A.shape[0] != f.B.shape[1]:
            raise ValueError(f"{name}: A is {tuple(f.A.shape)} but B is {tuple(f.B.shape)}")
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = f.A.to(dtype).contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = f.B.to(dtype).contiguous().cpu()
    folder = Path(folder)
    # Scratch files a restart does not need: renamed into place whole, without fsync.
    with atomic_folder(folder, durable=False) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config(loras, base_model), indent=1))
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1))
    return folder


def read_peft_adapter(folder: Path) -> tuple[dict, dict[str, LoraFactors]]:
    """(adapter_config, target module name -> factors) of a PEFT LoRA folder."""
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    loras: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if not key.startswith(PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
                raise ValueError(f"unexpected tensor {key!r} in {folder}")
            name, part = key[len(PEFT_PREFIX):].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
            loras.setdefault(name, {})[part] = f.get_tensor(key)
    scaling = config["lora_alpha"] / config["r"]
    return config, {n: LoraFactors(p["lora_A"], p["lora_B"] * scaling) for n, p in loras.items()}
