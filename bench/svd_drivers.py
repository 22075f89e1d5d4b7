"""How fast each way of computing a thin SVD is, and how exact, on this machine's device.

The SVD of every adapted matrix is the start-up cost of SVF (the vLLM workers compute it on the GPU, the
native engine on its device). Candidates, each on float32 copies of bf16 weights:
  svd          torch.linalg.svd (the default driver)
  gesvdj       torch.linalg.svd, cuSOLVER's Jacobi driver (CUDA only)
  eigh64       adapters.svd_cache.gram_svd: eigendecomposition of the Gram matrix W Wᵀ (or Wᵀ W) in
               float64, then the other side as Σ⁻¹ Uᵀ W (what thin_svd uses for float32/bf16 weights)
Matrices: the embedded model's MLP matrices (default), plus Llama-3-8B's MLP shapes (random, CUDA only).
Reported per shape: seconds per matrix, relative reconstruction error ‖W − U diag(σ) Vᵀ‖/‖W‖ with U and
V in bf16 (as served), orthogonality error of V, largest relative σ difference from torch.linalg.svd;
peak RSS and peak GPU memory.

    python bench/svd_drivers.py [--repeat 2] [--out results/svd_drivers.json]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adapters.svd_cache import gram_svd  # noqa: E402
from bench.common import machine, peak_gpu_mb, peak_rss_mb, print_table, write_json  # noqa: E402
from engine.loader import resolve_model_folder  # noqa: E402
from engine.spec import default_cache_dir  # noqa: E402


def drivers(device: str) -> dict:
    out = {"svd": lambda w: torch.linalg.svd(w, full_matrices=False), "eigh64": gram_svd}
    if device == "cuda":
        out["gesvdj"] = lambda w: torch.linalg.svd(w, full_matrices=False, driver="gesvdj")
    return out


def measure(name: str, fn, w: torch.Tensor, ref_s: torch.Tensor, repeat: int) -> dict:
    times = []
    for _ in range(repeat):
        if w.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        U, S, Vh = fn(w)
        if w.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    Ub, Vb = U.to(torch.bfloat16).float(), Vh.to(torch.bfloat16).float()
    rec = torch.linalg.norm(w - (Ub * S) @ Vb) / torch.linalg.norm(w)
    eye = torch.eye(Vh.shape[0], device=w.device)
    orth = torch.linalg.norm(Vh @ Vh.T - eye) / eye.shape[0] ** 0.5
    return {"driver": name, "seconds": min(times), "rel_reconstruction": float(rec), "v_orthogonality": float(orth),
            "max_rel_sigma_diff": float(((S - ref_s).abs() / ref_s.clamp_min(1e-12)).max())}


def matrices(device: str, model: str | None):
    from transformers import AutoModelForCausalLM

    folder, _ = resolve_model_folder(model, default_cache_dir())  # None: the embedded SmolLM2
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    layer = m.model.layers[0].mlp
    for name in ("gate_proj", "down_proj"):
        yield f"{Path(folder).name}:{name}", getattr(layer, name).weight.detach().to(device).float()
    del m
    if device == "cuda":
        g = torch.Generator(device="cuda").manual_seed(0)
        for shape in ((14336, 4096), (4096, 14336)):
            w = (torch.randn(*shape, device="cuda", generator=g) * 0.02).to(torch.bfloat16).float()
            yield f"llama3-8b:{shape[0]}x{shape[1]}", w


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="Hugging Face folder (default: the embedded model)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for label, w in matrices(device, args.model):
        print(f"{label} {tuple(w.shape)} on {device}", flush=True)
        ref_s = torch.linalg.svd(w, full_matrices=False)[1]
        for name, fn in drivers(device).items():
            r = measure(name, fn, w, ref_s, args.repeat)
            r["matrix"] = label
            rows.append(r)
            print(f"  {name}: {r['seconds']:.3f} s, reconstruction {r['rel_reconstruction']:.2e}", flush=True)
    print_table(rows, ["matrix", "driver", "seconds", "rel_reconstruction", "v_orthogonality", "max_rel_sigma_diff"])
    mem = {"peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(torch.device(device))}
    print(f"peak RSS {mem['peak_rss_mb']:.0f} MiB; peak GPU {mem['peak_gpu_mb'] or 0:.0f} MiB")
    write_json(args.out, {"machine": machine(), "device": device, "rows": rows, "memory": mem})


if __name__ == "__main__":
    main()
