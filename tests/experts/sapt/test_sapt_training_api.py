"""SAPT training as a job through the HTTP API: the server starts ``train sapt`` as a child process,
reports its progress, puts the bundle into its own store and serves it with the ``sapt`` strategy; bad
requests get clear 4xx errors, a second training waits its turn (409), and cancelling stops the child."""
import os
import time

import pytest

from server.config import Settings
from tests.support.live import assert_error_shape, serve, wait_training_phase

TINY = {"steps": 3, "batch_size": 4, "micro_batch": 2, "lr": 0.05, "generator_steps": 2, "train_limit": 32,
        "test_limit": 4, "eval_every_task": 1}


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("training-api")
    settings = Settings(model=str(tiny_llama_dir), served_model_name="tiny", cache_dir=tmp / "cache",
                        expert_dir=tmp / "store", adapt_targets="attn", api_key=None, admin_api_key=None,
                        max_model_len=1024, max_num_seqs=4, threads=1, shipped_experts=False)
    with serve(settings) as srv:
        yield srv


def wait_done(c, job_id: str, timeout: float = 240.0) -> tuple[dict, list[dict]]:
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/training/{job_id}").json()
        seen.append(job["progress"])
        if job["status"] in ("done", "failed"):
            return job, seen
        time.sleep(0.2)
    raise TimeoutError(job)


@pytest.mark.slow  # a whole SAPT training run in a child process (~35 s on 2 cores)
def test_a_training_job_stores_a_bundle_that_the_server_serves(server):
    with server.client() as c:
        r = c.post("/v1/training/sapt", json={"name": "skills", "tasks": ["reverse", "upper"], **TINY})
        assert r.status_code == 202, r.text
        job, seen = wait_done(c, r.json()["id"])
        assert job["status"] == "done", job["error"]
        done = [p["steps_done"] for p in seen if "steps_done" in p]
        assert done == sorted(done) and done[-1] == 2 * TINY["steps"]  # progress moved forward to the end
        assert job["progress"]["phase"] == "evaluated" and set(job["progress"]["scores"]) == {"reverse", "upper"}
        res = job["result"]
        assert res["expert"] == "skills" and res["tasks"] == ["reverse", "upper"] and res["version"] == 1
        assert set(res["matrix"][1]) == {"reverse", "upper"}  # a_ij row after the second task
        listed = {e["id"]: e for e in c.get("/v1/experts").json()["data"]}
        assert listed["skills"]["kind"] == "sapt" and listed["skills"]["spec"]["num_tasks"] == 2
        r = c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Write these letters as capitals: a b c d"}], "max_tokens": 4,
            "temperature": 0, "adaptation": {"strategy": "sapt", "experts": ["skills"]}})
        assert r.status_code == 200, r.text
        weights = r.json()["adaptation"]["weights"]
        assert set(weights) == {"task0", "task1"} and abs(sum(weights.values()) - 1) < 1e-5


def test_bad_requests_get_clear_errors(server):
    with server.client() as c:
        def post(**body):
            return c.post("/v1/training/sapt", json={"name": "x", "tasks": ["reverse"], **body})

        assert assert_error_shape(post(tasks=["nope"]), 400)["code"] == "unknown_task"
        assert assert_error_shape(post(tasks=["gsm8k"]), 400)["code"] == "no_training_data"
        assert "twice" in assert_error_shape(post(tasks=["reverse", "reverse"]), 400)["message"]
        # this server adapts attention matrices only: a bundle on the MLP could never be served
        assert assert_error_shape(post(lora_targets="up_proj"), 400)["code"] == "targets_not_adapted"
        assert assert_error_shape(post(steps=0), 400)["param"] is not None
        assert assert_error_shape(post(name="../evil"), 400)
        err = assert_error_shape(post(name="tiny"), 400)  # the served model's name
        assert err["param"] == "name" and err["code"] == "invalid_name" and "served model" in err["message"]
        assert assert_error_shape(post(device="cuda"), 400)  # unknown fields are refused, not ignored
        assert assert_error_shape(c.get("/v1/training/adapt-nope"), 404)["code"] == "not_found"
        assert assert_error_shape(c.delete("/v1/training/adapt-nope"), 404)["code"] == "not_found"


def test_one_training_at_a_time_and_cancel_stops_the_child(server):
    with server.client() as c:
        r = c.post("/v1/training/sapt", json={"name": "long", "tasks": ["reverse"], **TINY, "steps": 100_000})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        wait_training_phase(c, job_id)
        second = c.post("/v1/training/sapt", json={"name": "other", "tasks": ["upper"], **TINY})
        assert assert_error_shape(second, 409)["code"] == "job_running"
        pids = _children()
        assert pids, "no training process"
        r = c.delete(f"/v1/training/{job_id}")
        assert r.status_code == 200 and r.json()["cancelled"] is True
        job = c.get(f"/v1/training/{job_id}").json()
        assert job["status"] == "failed" and job["error"] == "cancelled"
        assert not [p for p in pids if _alive(p)]  # the child is gone
        assert "long" not in {e["id"] for e in c.get("/v1/experts").json()["data"]}
        assert c.delete(f"/v1/training/{job_id}").json()["cancelled"] is False  # already ended


def test_concurrent_starts_start_one_training(server):
    """Four POSTs at the same moment: exactly one training starts (the check and the start are one step),
    the others get 409; cancelling it leaves no child behind."""
    import concurrent.futures as cf

    body = {"tasks": ["reverse"], **TINY, "steps": 100_000}
    with server.client() as c, cf.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: c.post("/v1/training/sapt", json={"name": f"race{i}", **body}), range(4)))
        assert sorted(r.status_code for r in answers) == [202, 409, 409, 409], [r.text for r in answers]
        started = next(r.json()["id"] for r in answers if r.status_code == 202)
        assert c.delete(f"/v1/training/{started}").json()["cancelled"] is True
        deadline = time.monotonic() + 30
        while _children() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _children() == []


def _children() -> list[int]:
    """Our child processes running ``experts.train sapt``."""
    me, out = os.getpid(), []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = open(f"/proc/{pid}/stat").read().split()
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if int(stat[3]) == me and b"experts.train" in cmd and b"sapt" in cmd:
            out.append(int(pid))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = open(f"/proc/{pid}/stat").read().split()
    except OSError:
        return False
    return stat[2] != "Z"
