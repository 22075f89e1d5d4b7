"""Few-shot adaptations over HTTP: a CEM job runs in the background with progress, its result is stored
as a mixture expert named after the task, requests use it through `adaptation.task`, the same inputs
reuse the stored result, and its fitness is the answers' log-likelihood under each member's mixture."""
from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from experts.pass1.cem import CEMConfig
from experts.pass1.few_shot import FewShotSearch, FewShotSpec, Shot, prompt_ids
from tests.support.live import assert_error_shape, serve
from tests.support.reference import mlp_targets, random_expert, reference_model

EXAMPLES = [{"prompt": "What is 2 + 3?", "answer": "5"}, {"prompt": "What is 4 + 4?", "answer": "8"},
            {"prompt": "What is 1 + 6?", "answer": "7"}]


@pytest.fixture(scope="module")
def cem_server(tiny_settings, tiny_llama_dir, tmp_path_factory):
    weights = mlp_targets(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32))
    experts = {n: random_expert(n, weights, 20 + i) for i, n in enumerate(["a", "b"])}
    with serve(tiny_settings(expert_dir=tmp_path_factory.mktemp("store"))) as srv:
        for e in experts.values():
            srv.state.store.put(_draft(e))
        yield srv, experts


def _draft(e):
    from experts.store.validation import ExpertDraft

    return ExpertDraft(name=e.name, kind="svf", tensors=dict(e.z), category="math")


def wait_job(c, job_id, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/adaptations/{job_id}").json()
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.1)
    pytest.fail("adaptation job did not finish")


def test_cem_job_stores_result_used_by_task_and_reused(cem_server):
    srv, experts = cem_server
    body = {"task": "sums", "experts": ["a", "b"], "examples": EXAMPLES,
            "cem": {"population": 6, "generations": 3, "seed": 3}}
    with srv.client() as c:
        r = c.post("/v1/adaptations", json=body)
        assert r.status_code == 202, r.text
        job = wait_job(c, r.json()["id"])
        assert job["status"] == "done", job
        assert job["progress"]["generation"] == 3 and len(job["result"]["history"]) == 3
        alpha = job["result"]["alpha"]
        assert len(alpha) == 2 and all(0.0 <= a <= 1.0 for a in alpha)
        models = {m["id"] for m in c.get("/v1/models").json()["data"]}
        assert "sums" in models
        # Requests name the task; the output equals the explicit mixture with the found α.
        r1 = c.post("/v1/completions", json={"prompt": "What is 3 + 3?", "max_tokens": 8, "temperature": 0,
                                              "adaptation": {"task": "sums"}})
        r2 = c.post("/v1/completions", json={"prompt": "What is 3 + 3?", "max_tokens": 8, "temperature": 0,
                                              "adaptation": {"experts": {"a": alpha[0], "b": alpha[1]}}})
        assert r1.status_code == 200 and r1.json()["adaptation"]["strategy"] == "few_shot"
        assert r1.json()["choices"][0]["text"] == r2.json()["choices"][0]["text"]
        # Same inputs: the stored result is reused at once, not searched again.
        again = c.post("/v1/adaptations", json=body)
        assert again.status_code == 202 and again.json()["status"] == "done"
        assert again.json()["result"]["reused"] is True
        # Bad inputs: 400s in the OpenAI shape; unknown job 404; unknown task 400.
        assert_error_shape(c.post("/v1/adaptations", json={**body, "experts": ["nope"]}), 400)
        assert_error_shape(c.post("/v1/adaptations", json={**body, "examples": []}), 400)
        assert_error_shape(c.get("/v1/adaptations/adapt-missing"), 404)
        assert_error_shape(c.post("/v1/completions", json={"prompt": "x", "adaptation": {"task": "nope"}}), 400)


def test_fitness_is_the_answers_loglik_under_each_mixture(cem_server, tiny_llama_dir):
    """A member with α = (1, 0) scores the shots exactly as the model with expert a's merged weights."""
    import asyncio

    srv, experts = cem_server
    spec = FewShotSpec("t", ["a", "b"], [Shot(**e) for e in EXAMPLES], CEMConfig(population=2, generations=1))
    search = FewShotSearch(srv.engine, spec, [experts["a"], experts["b"]])
    pop = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    got = asyncio.run(search.fitness(pop))  # the engine delivers to whichever loop submitted the request
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    for row, name in enumerate(["a", "b"]):
        model = reference_model(tiny_llama_dir, [(experts[name], 1.0)])
        per_shot = []
        for e in EXAMPLES:
            p = prompt_ids(tok, e["prompt"])
            a = tok.encode(e["answer"], add_special_tokens=False)
            with torch.no_grad():
                lp = model(torch.tensor([p + a])).logits[0].float().log_softmax(-1)
            per_shot.append(float(lp[len(p) - 1 : -1].gather(1, torch.tensor(a)[:, None]).mean()))
        assert abs(float(got[row]) - sum(per_shot) / len(per_shot)) < 1e-4


def test_jobs_are_bounded_and_cancellable_and_users_go_first(tiny_settings, tiny_llama_dir, tmp_path_factory):
    """With one job allowed, a second is refused (429) while the first runs; DELETE stops the first (its
    engine requests are aborted, nothing is stored), after which a new one may start; and while a search
    fills the engine, a user's request is still answered promptly (background priority)."""
    weights = mlp_targets(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32))
    settings = tiny_settings(expert_dir=tmp_path_factory.mktemp("store"), max_adaptation_jobs=1)
    big = {"experts": ["a", "b"], "examples": EXAMPLES * 8, "cem": {"population": 32, "generations": 50, "seed": 1}}
    with serve(settings) as srv, srv.client() as c:
        for i, n in enumerate(["a", "b"]):
            srv.state.store.put(_draft(random_expert(n, weights, 30 + i)))
        first = c.post("/v1/adaptations", json={"task": "long", **big})
        assert first.status_code == 202, first.text
        err = assert_error_shape(c.post("/v1/adaptations", json={"task": "other", **big}), 429)
        assert err["code"] == "too_many_jobs"
        srv.wait_until(lambda s: s["waiting"] >= 16, timeout=30)  # the search fills the engine's queue
        t0 = time.monotonic()
        user = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "temperature": 0})
        assert user.status_code == 200 and time.monotonic() - t0 < 5
        assert c.get(f"/v1/adaptations/{first.json()['id']}").json()["status"] == "running"
        gone = c.delete(f"/v1/adaptations/{first.json()['id']}").json()
        assert gone["cancelled"] is True and gone["status"] == "failed" and gone["error"] == "cancelled"
        srv.wait_idle(timeout=15)  # its queued and running requests were aborted
        assert "long" not in {m["id"] for m in c.get("/v1/models").json()["data"]}
        again = c.post("/v1/adaptations", json={"task": "short", "experts": ["a", "b"], "examples": EXAMPLES,
                                                "cem": {"population": 4, "generations": 1, "seed": 1}})
        assert again.status_code == 202 and wait_job(c, again.json()["id"])["status"] == "done"
        assert assert_error_shape(c.delete("/v1/adaptations/adapt-nope"), 404)["code"] == "not_found"


def test_task_fitness_judges_each_members_greedy_replies(cem_server, tiny_llama_dir):
    """exact_match fitness with a judge: the judge sees each shot's greedy reply under the member's mixture
    (the merged-weight model's own greedy reply), and the fitness is the judged accuracy, log-likelihood only
    breaking ties."""
    import asyncio

    srv, experts = cem_server
    seen: dict[int, str] = {}

    def judge(i: int, reply: str) -> bool:
        seen[i] = reply
        return i != 1

    spec = FewShotSpec("t", ["a", "b"], [Shot(**e) for e in EXAMPLES], CEMConfig(population=1, generations=1),
                       fitness="exact_match")
    search = FewShotSearch(srv.engine, spec, [experts["a"], experts["b"]], judge=judge, max_tokens=5)
    got = asyncio.run(search.fitness(torch.tensor([[1.0, 0.0]], dtype=torch.float64)))
    assert 2 / 3 - 1e-3 <= float(got[0]) <= 2 / 3 + 1e-3
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = reference_model(tiny_llama_dir, [(experts["a"], 1.0)])
    for i, e in enumerate(EXAMPLES):
        p = prompt_ids(tok, e["prompt"])
        with torch.no_grad():
            out = model.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False,
                                 pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        assert seen[i] and seen[i] == tok.decode(out[0, len(p):], skip_special_tokens=True)
