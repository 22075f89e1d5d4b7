"""Import (and export) of other tools' expert files, each built here from its documented layout
(REFERENCE.md §1-§2): through the API, the CLI (offline and --url), and back out again."""
from __future__ import annotations

import io
import json
import math

import pytest
import torch
from safetensors.torch import save
from torch import nn

from experts.store.expert_store import ExpertStore
from experts.store.exporters import export
from experts.store.importers import import_sapt_reference
from experts.store.tensor_files import read_safetensors
from experts.store.uploads import Upload, UploadMetadata, to_draft
from server.cli import main as cli
from tests.support.experts import post_files, random_z
from tests.support.live import assert_error_shape, serve

D, R, ALPHA = 64, 4, 16.0  # tiny model hidden size; LoRA rank and alpha of the built checkpoints


def pt(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def srv(expert_settings, tmp_path_factory):
    """A server adapting attention and MLP, so q/v LoRA blocks fit."""
    with serve(expert_settings(expert_dir=tmp_path_factory.mktemp("store"), adapt_targets="all")) as s:
        yield s


def mlp_names(base) -> list[str]:
    return [t.name for t in base.targets if ".mlp." in t.name]


def qv_targets(base) -> list:
    return [t for t in base.targets if t.name.endswith(("q_proj", "v_proj"))]


# --- Transformer² reference files ----------------------------------------------------------------

def policy_params(base) -> tuple[bytes, dict]:
    """learnable_params_module_list.{i}: z (bf16), i over the MLP matrices in state-dict order."""
    names = mlp_names(base)
    z = {n: (torch.randn(base.target(n).rank) + i).to(torch.bfloat16) for i, n in enumerate(names)}
    return pt({f"learnable_params_module_list.{i}": z[n] for i, n in enumerate(names)}), z


def test_policy_params_maps_indices_in_state_dict_order(srv, base_all):
    data, z = policy_params(base_all)
    with srv.client() as c:
        r = post_files(c, {"name": "pp", "format": "policy_params", "category": "math"}, [("file", data)])
        assert r.status_code == 200, r.text
        card = r.json()
        assert card["source"] == "policy_params" and card["parametrization"] == "sakana"
        assert card["targets"][:3] == [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
        # The same vectors as the wrong count of matrices: refused, naming both counts.
        err = assert_error_shape(post_files(c, {"name": "pp2", "format": "policy_params", "reference_targets": "all"},
                                            [("file", data)]), 400)
        assert err["code"] == "missing_target" and "6 vectors" in err["message"]
    served = srv.state.registry.get("pp").expert
    for n, v in z.items():
        assert torch.equal(served.z[n], v.float())


def test_learnable_params(srv, base_all):
    z = {n: torch.randn(base_all.target(n).rank) for n in mlp_names(base_all)[:4]}
    data = pt({f"{n}.weight": v for n, v in z.items()})
    with srv.client() as c:
        r = post_files(c, {"name": "lp", "format": "learnable_params"}, [("file", data)])
        assert r.status_code == 200, r.text
        bad = pt({"model.layers.0.mlp.gate_proj.bias": torch.zeros(3)})
        err = assert_error_shape(post_files(c, {"name": "lp2", "format": "learnable_params"}, [("file", bad)]), 400)
        assert err["code"] == "unknown_target"
    assert all(torch.equal(srv.state.registry.get("lp").expert.z[n], v) for n, v in z.items())


def test_cli_offline_import_then_served_after_restart(expert_settings, tiny_llama_dir, tmp_path, base_mlp):
    data, z = policy_params(base_mlp)
    (tmp_path / "policy_params.pt").write_bytes(data)
    settings = expert_settings(expert_dir=tmp_path / "store")
    args = ["--model", str(tiny_llama_dir), "--cache-dir", str(settings.cache_dir), "--expert-dir", str(tmp_path / "store")]
    assert cli(["experts", "import", "policy_params", str(tmp_path / "policy_params.pt"), "--name", "offline",
                "--category", "math", *args]) == 0
    with serve(settings) as s, s.client() as c:
        card = c.get("/v1/experts/offline").json()
        assert card["status"] == "ready" and card["category"] == "math"
        assert c.post("/v1/completions", json={"model": "offline", "prompt": "x", "max_tokens": 2}).status_code == 200
    # Export back to the reference format: the same vectors (bf16 values are exact in float32).
    assert cli(["experts", "export", "offline", "policy_params", str(tmp_path / "out"), *args]) == 0
    back = torch.load(tmp_path / "out" / "policy_params.pt", weights_only=True)
    for i, n in enumerate(mlp_names(base_mlp)):
        assert torch.equal(back[f"learnable_params_module_list.{i}"], z[n].float())


# --- PEFT --------------------------------------------------------------------------------------------

def peft_folder(base, rslora: bool = False) -> tuple[bytes, bytes, dict]:
    blocks = {t.name: (torch.randn(R, t.in_features), torch.randn(t.out_features, R)) for t in qv_targets(base)}
    weights = {}
    for n, (A, B) in blocks.items():
        weights[f"base_model.model.{n}.lora_A.weight"] = A
        weights[f"base_model.model.{n}.lora_B.weight"] = B
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": ALPHA, "bias": "none",
              "target_modules": ["q_proj", "v_proj"], "use_rslora": rslora, "base_model_name_or_path": "tiny"}
    return json.dumps(config).encode(), save(weights), blocks


def lora_delta(bundle, name, x, attn):
    """Σ_t a_t s B_t A_t x from the bundle's stacked LoRA (what the layers apply)."""
    A_cat, B_cat = bundle.stacked_lora()[name]
    return ((x @ A_cat.T) * attn.repeat_interleave(bundle.rank, -1)) @ B_cat.T


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_is_one_pet_block(srv, base_all, rslora):
    config, weights, blocks = peft_folder(base_all, rslora)
    with srv.client() as c:
        r = post_files(c, {"name": f"peft{int(rslora)}", "format": "peft"}, [("config", config), ("file", weights)])
        assert r.status_code == 200, r.text
        assert r.json()["kind"] == "sapt" and r.json()["spec"]["num_tasks"] == 1
    bundle = srv.state.store.bundle(f"peft{int(rslora)}")
    scaling = ALPHA / math.sqrt(R) if rslora else ALPHA / R
    x = torch.randn(3, D)
    for n, (A, B) in blocks.items():  # PEFT's forward: scaling · B A x
        torch.testing.assert_close(lora_delta(bundle, n, x, torch.ones(3, 1)), scaling * (x @ A.T) @ B.T)


def test_peft_append_adds_a_task(srv, base_all):
    config, weights, blocks = peft_folder(base_all)
    with srv.client() as c:
        assert post_files(c, {"name": "grow", "format": "peft"}, [("config", config), ("file", weights)]).status_code == 200
        config2, weights2, blocks2 = peft_folder(base_all)
        r = post_files(c, {"name": "grow", "format": "peft", "append": True}, [("config", config2), ("file", weights2)])
        assert r.status_code == 200, r.text
        assert r.json()["version"] == 2 and r.json()["spec"]["num_tasks"] == 2
        bad = json.dumps({**json.loads(config), "r": 2}).encode()
        err = assert_error_shape(post_files(c, {"name": "grow", "format": "peft", "append": True},
                                            [("config", bad), ("file", weights)]), 400)
        assert err["code"] == "shape_mismatch"
    bundle = srv.state.store.bundle("grow")
    x = torch.randn(2, D)
    for n, (A, B) in blocks2.items():  # attention [0, 1] selects the appended task alone
        torch.testing.assert_close(lora_delta(bundle, n, x, torch.tensor([[0.0, 1.0]] * 2)), ALPHA / R * (x @ A.T) @ B.T)


# --- SAPT reference checkpoints --------------------------------------------------------------------

def sapt_reference_files(base, T: int = 3, hidden: int = 10):
    """Per task: lora_weights_A/B.pt ({model.layers.j.self_attn.lora_q.lora_A: (r, in)} ...); after the
    last task: trans_input.pt (Sequential state dict) and prompts_keys_till_now.pt (T, d), newest first."""
    layers = sorted({int(t.name.split(".")[2]) for t in qv_targets(base)})
    tasks = []
    for _ in range(T):
        A = {f"model.layers.{j}.self_attn.lora_{p}.lora_A": torch.randn(R, D) for j in layers for p in "qv"}
        B = {f"model.layers.{j}.self_attn.lora_{p}.lora_B": torch.randn(D // 2 if p == "v" else D, R)
             for j in layers for p in "qv"}
        tasks.append((A, B))
    trans_input = nn.Sequential(nn.Linear(D, hidden, bias=False), nn.Linear(hidden, D, bias=False), nn.SiLU(),
                                nn.LayerNorm(D))
    with torch.no_grad():
        trans_input[3].weight.uniform_(0.5, 1.5)
        trans_input[3].bias.normal_()
    keys = torch.rand(T, D) * 2 - 1  # row 0: the newest task
    return tasks, trans_input, keys


def reference_attention(trans_input, keys, embeds):
    """The reference's cal_attention (temperature √d), for unpadded prompts: weights over keys' rows."""
    q = trans_input(embeds.max(dim=1, keepdim=True).values)  # (B, 1, d)
    scores = keys.unsqueeze(0).expand(len(embeds), -1, -1).bmm(q.transpose(1, 2)) / math.sqrt(D)
    return torch.softmax(scores, dim=1).squeeze(-1)  # (B, T), newest task first


def test_sapt_reference_checkpoints(srv, base_all):
    tasks, trans_input, keys = sapt_reference_files(base_all)
    files = [(f"lora_weights_{ab}", pt(t[i])) for t in tasks for i, ab in enumerate("AB")]
    files += [("trans_input", pt(trans_input.state_dict())), ("prompts_keys_till_now", pt(keys))]
    with srv.client() as c:
        r = post_files(c, {"name": "cl", "format": "sapt_reference", "lora_alpha": ALPHA}, files)
        assert r.status_code == 200, r.text
        assert r.json()["spec"]["num_tasks"] == 3 and r.json()["spec"]["hidden"] == 10
    bundle = srv.state.store.bundle("cl")
    embeds = torch.randn(4, 7, D)
    with torch.no_grad():
        ref = reference_attention(trans_input, keys, embeds)
        ours = bundle.attention(embeds, torch.ones(4, 7))
    torch.testing.assert_close(ours, ref.flip(-1))  # ours is in task order, oldest first
    x = torch.randn(4, D)
    for j in range(2):
        for p in "qv":
            name = f"model.layers.{j}.self_attn.{p}_proj"
            want = sum(ours[:, [t]] * ALPHA / R * (x @ tasks[t][0][f"model.layers.{j}.self_attn.lora_{p}.lora_A"].T)
                       @ tasks[t][1][f"model.layers.{j}.self_attn.lora_{p}.lora_B"].T for t in range(3))
            torch.testing.assert_close(lora_delta(bundle, name, x, ours), want, rtol=1e-4, atol=1e-4)


def test_sapt_reference_through_cli_url_and_export_round_trip(srv, base_all, tmp_path):
    tasks, trans_input, keys = sapt_reference_files(base_all, T=2)
    folders = []
    for i, (A, B) in enumerate(tasks):
        f = tmp_path / f"{i + 1}-task{i}" / "saved_weights"
        f.mkdir(parents=True)
        (f / "lora_weights_A.pt").write_bytes(pt(A))
        (f / "lora_weights_B.pt").write_bytes(pt(B))
        folders.append(str(f.parent))
    (f / "trans_input.pt").write_bytes(pt(trans_input.state_dict()))
    (f / "prompts_keys_till_now.pt").write_bytes(pt(keys))
    assert cli(["experts", "import", "sapt_reference", *folders, "--name", "viaurl", "--lora-alpha", str(ALPHA),
                "--url", srv.url]) == 0
    record, raw = srv.state.store.read_file("viaurl")
    tensors = read_safetensors(raw)
    out = export(record, tensors, "sapt_reference")
    last = "2-task1/saved_weights"
    again = import_sapt_reference([(out[f"{i}-task{i - 1}/saved_weights/lora_weights_A.pt"],
                                    out[f"{i}-task{i - 1}/saved_weights/lora_weights_B.pt"]) for i in (1, 2)],
                                  out[f"{last}/trans_input.pt"], out[f"{last}/prompts_keys_till_now.pt"], "again", ALPHA)
    assert set(again.tensors) == set(tensors)
    assert all(torch.equal(again.tensors[k].float(), tensors[k]) for k in tensors)


def test_export_svf_and_peft_round_trips(tmp_path, base_all):
    store = ExpertStore(tmp_path, base=base_all)
    z = {n: v for n, v in random_z(base_all, 3).items() if ".mlp." in n}

    def imported(meta: dict, files: dict) -> dict:
        draft = to_draft(Upload(UploadMetadata(**meta), {k: [v] for k, v in files.items()}, multipart=True), store)
        return store.put(draft)

    from experts.store.validation import ExpertDraft

    svf = store.put(ExpertDraft("z", "svf", z))
    record, raw = store.read_file("z")
    for fmt in ("policy_params", "learnable_params"):
        (name, data), = export(record, read_safetensors(raw), fmt).items()
        back = imported({"name": f"z-{fmt.split('_')[0]}", "format": fmt}, {"file": data})
        assert all(torch.equal(back.payload.z[n], svf.payload.z[n]) for n in z)
    config, weights, _ = peft_folder(base_all)
    peft = imported({"name": "p", "format": "peft"}, {"config": config, "file": weights})
    record, raw = store.read_file("p")
    out = export(record, read_safetensors(raw), "peft")
    again = imported({"name": "p2", "format": "peft"}, {"config": out["adapter_config.json"],
                                                        "file": out["adapter_model.safetensors"]})
    for n, (A, B) in peft.payload.stacked_lora().items():
        torch.testing.assert_close(again.payload.stacked_lora()[n][0], A)
        torch.testing.assert_close(again.payload.stacked_lora()[n][1], B)


def test_imported_peft_block_is_served_by_the_sapt_strategy(srv, base_all, tiny_llama_dir):
    """End to end: a PEFT adapter imported over HTTP, then requests routed through it (one task: weight 1)
    give the same greedy tokens as the base model with W + scaling·B A merged into q/v."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, weights, blocks = peft_folder(base_all)
    with torch.no_grad():  # small deltas: the LoRA changes the output without drowning the model
        blocks = {n: (A * 0.05, B * 0.05) for n, (A, B) in blocks.items()}
    weights = save({f"base_model.model.{n}.lora_{x}.weight": t for n, ab in blocks.items() for x, t in zip("AB", ab)})
    with srv.client() as c:
        for name in [s.name for s in srv.state.store.bundles()]:  # one bundle: the strategy picks it
            assert c.delete(f"/v1/experts/{name}").status_code == 200
        assert post_files(c, {"name": "lora", "format": "peft"}, [("config", config), ("file", weights)]).status_code == 200
        r = c.post("/v1/completions", json={"prompt": "The weather today is", "max_tokens": 12, "temperature": 0,
                                            "adaptation": {"strategy": "sapt"}})
        assert r.status_code == 200, r.text
        base = c.post("/v1/completions", json={"prompt": "The weather today is", "max_tokens": 12,
                                               "temperature": 0}).json()["choices"][0]["text"]
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for n, (A, B) in blocks.items():
            ref.get_submodule(n).weight += ALPHA / R * B @ A
    ids = tok("The weather today is", return_tensors="pt").input_ids
    out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    want = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert r.json()["choices"][0]["text"] == want and want != base
