"""Check that the SAPT bundle a comparison put in the expert store serves what the comparison measured:
reload it through the store (validation against the model, the store's tensor layout), recompute the
mean attention on each task's test prompts and the last row of a_ij of the first seed, and compare.

    python bench/sapt_reload.py --result OUT/sapt/sapt_compare.json --store OUT/sapt/store --name sapt-seq \
        --model FOLDER --device cuda
Prints one line per task and exits 1 on a mismatch. Imports nothing from the server's settings.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experts.sapt.config import SAPTConfig  # noqa: E402
from experts.sapt.routing import batched_attention  # noqa: E402
from experts.sapt.run import load_model, setup  # noqa: E402
from experts.store.base_model import BaseModelInfo  # noqa: E402
from experts.store.expert_store import ExpertStore  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--result", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()
    res = json.loads(Path(args.result).read_text())
    cfg = replace(SAPTConfig.from_dict(res["config"]), model=args.model, device=args.device, dtype=args.dtype)
    base = load_model(cfg)
    store = ExpertStore(args.store, base=BaseModelInfo.from_model(base.model, base.name, targets=base.runtime.targets))
    store.load(recover=False)
    bundle = store.bundle(args.name)
    if bundle is None:
        print(f"no ready SAPT bundle {args.name!r} in {args.store}: {[s.reason for s in store.list()]}")
        return 1
    bundle = bundle.to(base.device)
    pool, evaluator = setup(cfg, base)
    tasks = res["tasks"]
    want = res["runs"][0]["methods"]["sapt"]
    scores = evaluator.score(bundle, True, [pool.get(t) for t in tasks])
    ok = True
    for t in tasks:
        attn = batched_attention(base.model, bundle, pool.get(t).test_prompts).mean(0).tolist()
        d_attn = max(abs(a - b) for a, b in zip(attn, want["attention"][t]))
        d_acc = abs(scores.accuracy[t] - want["matrix"][-1][t])
        ok &= d_attn < 1e-4 and d_acc <= 0.02  # bf16 batches may flip a near-tie greedy token
        print(f"{t}: stored bundle accuracy {100 * scores.accuracy[t]:.1f}% (run: {100 * want['matrix'][-1][t]:.1f}%), "
              f"attention {'/'.join(f'{a:.3f}' for a in attn)} (max diff {d_attn:.1e})")
    print("stored bundle serves what the run measured" if ok else "MISMATCH between the stored bundle and the run")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
