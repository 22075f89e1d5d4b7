"""A trained SAPT bundle goes into the expert store and a server serves it: same routing weights and the
same greedy replies as the trained bundle gives through the engine in the training process, on the native
engine and on the vLLM engine's rows. Also the
``--compare`` command end to end (tiny settings) and the ``t2serve train sapt`` wiring."""
import json

import torch

from engine.contract import SamplingParams
from engine.vllm.engine import VLLMEngine, VLLMOptions
from experts.sapt.blocks import row_adaptations
from experts.sapt.data import TaskPool
from experts.sapt.evaluate import Evaluator
from experts.sapt.learner import SequenceLearner
from experts.sapt.routing import batched_attention, serving_copy
from experts.commands import train_main
from experts.sapt.run import store_bundle
from experts.train.rollout import generate
from server.cli import build_parser
from server.config import Settings
from tests.support.fake_vllm import fake_connect
from tests.support.live import serve


def test_stored_bundle_serves_what_training_measured(tiny_cfg, tiny_base, tiny_llama_dir, tmp_path):
    cfg = tiny_cfg("reverse,upper", steps=3, store=str(tmp_path / "store"), name="skills", lr=0.05)
    pool = TaskPool(tiny_base.tokenizer, None, cfg.train_limit, cfg.val_limit, cfg.test_limit)
    evaluator = Evaluator(tiny_base, cfg.max_num_seqs)
    learner = SequenceLearner(cfg, tiny_base, pool, evaluator)
    for i, name in enumerate(cfg.task_list):
        learner.learn(name, i, make_pseudo=False)
    assert store_bundle(cfg, tiny_base, learner.bundle, cfg.task_list).endswith("skills v1")
    tasks = [pool.get(n) for n in cfg.task_list]
    exs = [(d.task, d.test[k], d.test_prompts[k]) for d in tasks for k in range(2)]
    served = serving_copy(learner.bundle)
    attn = batched_attention(tiny_base.model, served, [p for _, _, p in exs])
    params = [SamplingParams(max_tokens=8, temperature=0.0)] * len(exs)
    local = generate(evaluator.engine, [p for _, _, p in exs], row_adaptations(served, attn, len(exs)), params)

    settings = Settings(model=str(tiny_llama_dir), served_model_name="tiny", cache_dir=tmp_path / "cache",
                        expert_dir=tmp_path / "store", adapt_targets="attn", api_key=None, admin_api_key=None,
                        max_model_len=1024, max_num_seqs=4, threads=None)
    check_served(serve(settings), exs, local, attn)
    # the same through the vLLM engine's rows (vLLM replaced by its CPU stand-in): pass 1 routes with the
    # engine's skeleton, the bundle is served from the SAPT bank
    opts = VLLMOptions(model=str(tiny_llama_dir), served_name="tiny", cache_dir=tmp_path / "cache", dtype="float32",
                       adapt_targets="attn", max_model_len=1024, max_num_seqs=4, svf=False, sapt_bank=64)
    check_served(serve(settings, engine=VLLMEngine.from_options(opts, connect=fake_connect)), exs, local, attn)


def check_served(server, exs, local, attn):
    with server as srv, srv.client() as c:
        listed = c.get("/v1/experts").json()["data"]
        assert [(e["id"], e["kind"], e["spec"]["num_tasks"]) for e in listed] == [("skills", "sapt", 2)]
        for (task, ex, prompt), want, a in zip(exs, local, attn):
            r = c.post("/v1/chat/completions", json={
                "messages": task.messages(ex), "max_tokens": 8, "temperature": 0,
                "adaptation": {"strategy": "sapt", "experts": ["skills"]}})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["usage"]["prompt_tokens"] == len(prompt)  # the prompt the router saw in training
            weights = body["adaptation"]["weights"]
            torch.testing.assert_close(torch.tensor([weights["task0"], weights["task1"]]), a, rtol=0, atol=2e-6)
            assert body["choices"][0]["message"]["content"] == want.text


def test_compare_command_writes_the_table_matrices_and_heat_map(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["sapt", "--tasks", "reverse,count", "--model", str(tiny_llama_dir), "--compare", "--seeds", "3",
            "--out", str(out), "--steps", "2", "--batch-size", "4", "--micro-batch", "4", "--train-limit", "16",
            "--val-limit", "3", "--test-limit", "3", "--generator-steps", "1", "--min-pseudo", "3",
            "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    assert train_main(args) == 0
    printed = capsys.readouterr().out
    assert "| SAPT w/o ARM |" in printed and "| SeqLoRA |" in printed and "attention heat map" in printed
    res = json.loads((out / "sapt_compare.json").read_text())
    assert res["peak_rss_mb"] > 0 and res["peak_gpu_mb"] is None  # memory reported (CPU run)
    run = res["runs"][0]
    assert res["seeds"] == [3] and set(run["methods"]) == {"sapt", "sapt_noarm", "seqlora"}
    for m in run["methods"].values():
        assert [sorted(r) for r in m["matrix"]] == [["reverse"], ["count", "reverse"]]  # a_ij for j <= i
        assert set(m["metrics"]) == {"AP", "F.Ra", "FWT", "BWT"}
    # branches are exact: SAPT w/o ARM shares SAPT's first task, LoRA alone on task 1 is SeqLoRA's first task
    assert run["methods"]["sapt_noarm"]["matrix"][0] == run["methods"]["sapt"]["matrix"][0]
    assert run["alone"]["reverse"] == run["methods"]["seqlora"]["matrix"][0]["reverse"]
    assert len(run["methods"]["sapt"]["attention"]["count"]) == 2
    assert (out / "sapt_compare.md").read_text().count(": a_ij (%)**") == 3
    assert (out / "sapt_attention.png").stat().st_size > 0 and (out / "log.jsonl").exists()


def test_t2serve_train_sapt_is_wired():
    args = build_parser().parse_args(["train", "sapt", "--tasks", "reverse,upper", "--kl-ratio", "0.5"])
    assert args.func.__name__ == "run_sapt" and args.kl_ratio == 0.5 and args.tasks == "reverse,upper"
