"""The engine setting: asking for vLLM where it cannot run is one clear error at start; with vLLM (here
its CPU stand-in) the same HTTP API, experts and pass-1 strategies work as on the native engine."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.factory import EngineUnavailableError, check_engine_available
from engine.vllm.engine import VLLMEngine, VLLMOptions, rows_config
from engine.vllm.rows_worker import CONFIG_KEY, RowsConfig
from experts.store.registry import ExpertRegistry
from server.app import create_app
from server.cli import main
from server.config import Settings
from tests.support.fake_vllm import fake_connect
from tests.support.live import serve
from tests.support.reference import TEXT, mlp_targets, random_expert, reference_probs


def hide_vllm(monkeypatch, present: bool = False):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (real("json") if present else None) if name == "vllm" else real(name, *a))


def test_vllm_engine_without_vllm_is_one_clear_error_at_start(monkeypatch, capsys, tmp_path):
    hide_vllm(monkeypatch)
    with pytest.raises(EngineUnavailableError, match=r"pip install 't2serve\[vllm\]'"):
        create_app(Settings(engine="vllm", cache_dir=tmp_path))
    assert main(["serve", "--engine", "vllm", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("t2serve: error: --engine vllm needs vLLM") and err.count("\n") == 1
    create_app(Settings(engine="native", cache_dir=tmp_path))  # the native engine needs nothing more


def test_vllm_engine_without_a_gpu_is_one_clear_error(monkeypatch):
    hide_vllm(monkeypatch, present=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EngineUnavailableError, match="needs a CUDA GPU"):
        check_engine_available(Settings(engine="vllm").engine)


def test_http_api_and_pass1_on_the_vllm_engine(tiny_llama_dir, tmp_path):
    """The real app over the vLLM engine: pass 1 scores the categories like a full forward and routes."""
    weights = mlp_targets(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32))
    reg = ExpertRegistry()
    for seed, (name, cat) in enumerate([("m", "math"), ("c", "code")]):
        reg.put(random_expert(name, weights, seed + 10), {"kind": "svf", "category": cat})
    settings = Settings(model=str(tiny_llama_dir), served_model_name="tiny", cache_dir=tmp_path, engine="vllm",
                        max_model_len=1024, max_num_seqs=4)
    opts = VLLMOptions(model=str(tiny_llama_dir), served_name="tiny", cache_dir=tmp_path, dtype="float32",
                       max_model_len=1024, max_num_seqs=4)
    engine = VLLMEngine.from_options(opts, connect=fake_connect)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    want = reference_probs(model, AutoTokenizer.from_pretrained(tiny_llama_dir), ["code", "math"])
    with serve(settings, engine=engine, registry=reg) as srv, srv.client() as c:
        r = c.post("/v1/completions", json={"prompt": TEXT, "max_tokens": 5, "temperature": 0,
                                            "adaptation": {"strategy": "prompt"}})
        assert r.status_code == 200, r.text
        info = r.json()["adaptation"]
        assert all(abs(info["weights"][k] - v) < 1e-4 for k, v in want.items())
        chosen = max(want, key=want.get)
        assert info["chosen"] == chosen and info["expert"] == {"math": "m", "code": "c"}.get(chosen)
        assert r.json()["usage"]["completion_tokens"] == 5
        r = c.post("/v1/completions", json={"prompt": TEXT, "max_tokens": 3, "temperature": 0,
                                            "adaptation": {"experts": {"m": 0.5, "c": 0.5}}})
        assert r.status_code == 200 and r.json()["adaptation"]["expert"] == "m+c"
        assert c.get("/v1/models").status_code == 200 and c.get("/metrics").status_code == 200
    assert not engine.ready  # the app shut it down with itself


def test_settings_map_onto_the_vllm_engine(tiny_llama_dir, tmp_path):
    s = Settings(model=str(tiny_llama_dir), cache_dir=tmp_path, engine="vllm", vllm_svf=False, vllm_sapt_bank=96,
                 tensor_parallel_size=2, max_num_seqs=7, vllm_max_experts=5)
    o = VLLMOptions.from_spec(s.engine_spec())
    assert (o.model, o.dtype, o.svf, o.sapt_bank) == (str(tiny_llama_dir), "bfloat16", False, 96)
    assert (o.tensor_parallel_size, o.max_num_seqs, o.max_experts) == (2, 7, 5)
    config = rows_config(o)
    assert (config.svf, config.sapt_rank, config.targets) == (False, 96, "mlp")
    # the configuration travels inside vLLM's own config, whole
    assert RowsConfig.from_config({CONFIG_KEY: config.to_config()}) == config
    assert RowsConfig.from_config({}) is None
    assert rows_config(VLLMOptions.from_spec(Settings(model=str(tiny_llama_dir), cache_dir=tmp_path,
                                                      adapt_targets="none").engine_spec())) is None  # stock vLLM
    for gone in ("vllm_svf_mode", "vllm_lora_max_rank", "vllm_max_loras", "vllm_max_adapters"):
        assert gone not in Settings.model_fields  # one way: rows
