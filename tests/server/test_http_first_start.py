"""First start: the server answers base requests while the SVD of the adapted matrices runs in the background;
/health says how far it is; adapted requests wait up to a bound, then get 503 with Retry-After; once the
layers are in, adapted requests are served, exactly as by an engine that prepared them before starting."""
from __future__ import annotations

import threading
import time

import pytest
import torch

import engine.native.async_engine as async_engine
from tests.support.experts import post_json, random_z
from tests.support.live import assert_error_shape, serve

EXPERT = {"adaptation": {"experts": ["e1"]}}


@pytest.fixture
def slow_svd(monkeypatch):
    """The SVD held until the test releases it (its progress reported halfway first)."""
    gate = threading.Event()
    real = async_engine.load_or_compute

    def held(model, found, svd_dir, progress=False, on_progress=None):
        if on_progress is not None:
            on_progress(len(found) // 2, len(found))
        assert gate.wait(60)
        return real(model, found, svd_dir, progress=progress, on_progress=on_progress)

    monkeypatch.setattr(async_engine, "load_or_compute", held)
    return gate


def test_base_requests_are_served_while_the_svd_runs_and_adapted_ones_wait_then_get_503(expert_settings, slow_svd,
                                                                                        base_mlp, tmp_path):
    settings = expert_settings(adaptation_wait_s=0.5, cache_dir=tmp_path / "cache")  # nothing cached yet
    with serve(settings) as srv, srv.client() as c:
        assert post_json(c, "e1", random_z(base_mlp, 1), key=None).status_code in (200, 201)
        health = c.get("/health").json()
        assert health["status"] == "ok" and health["adaptation"]["phase"] == "svd"
        assert health["adaptation"]["percent"] == pytest.approx(50, abs=5)
        body = {"prompt": "2 + 2 =", "max_tokens": 4, "temperature": 0}
        t0 = time.monotonic()
        assert c.post("/v1/completions", json=body).status_code == 200  # base: served now
        r = c.post("/v1/completions", json={**body, **EXPERT})
        err = assert_error_shape(r, 503)
        assert err["code"] == "adaptation_not_ready" and int(r.headers["Retry-After"]) >= 1
        assert time.monotonic() - t0 < 10
        # a request that arrives before the layers are in and is still waiting when they are gets served
        result: dict = {}
        waiter = threading.Thread(target=lambda: result.update(r=srv.client().post(
            "/v1/completions", json={**body, **EXPERT})))
        waiter.start()
        time.sleep(0.1)  # it waits in the resolver (up to adaptation_wait_s) ...
        slow_svd.set()  # ... while the layers come in
        waiter.join(60)
        assert result["r"].status_code == 200, result["r"].text
        deadline = time.monotonic() + 30
        while c.get("/health").json()["adaptation"]["phase"] != "ready" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.get("/health").json()["adaptation"]["phase"] == "ready"
        adapted = c.post("/v1/completions", json={**body, **EXPERT}).json()["choices"][0]["text"]
    with serve(settings) as ref, ref.client() as c:  # the layers from the SVD cache, before any request
        assert c.post("/v1/completions", json={**body, **EXPERT}).json()["choices"][0]["text"] == adapted


def test_adapted_requests_sent_to_the_engine_early_wait_inside_it(tiny_settings, slow_svd):
    from engine.contract import GenerationRequest, SamplingParams
    from engine.native.async_engine import AsyncEngine

    settings = tiny_settings()
    engine = AsyncEngine.from_spec(settings.engine_spec())
    engine.start()
    try:
        from adapters import Adaptation, SVFExpert

        t = engine.runtime.targets[0]
        a = Adaptation.expert(SVFExpert("e", {t.name: torch.randn(t.rank)}))
        engine.runtime.validate(a)  # the targets are known before their layers exist
        import asyncio

        async def run(req):
            return [o async for o in engine.generate(req)]

        async def main():
            base = asyncio.create_task(run(GenerationRequest("b", [1, 2, 3], SamplingParams(max_tokens=3))))
            adapted = asyncio.create_task(run(GenerationRequest("a", [1, 2, 3], SamplingParams(max_tokens=3), a)))
            outs = await base
            assert outs[-1].finished and not adapted.done() and engine.adaptation["phase"] == "svd"
            slow_svd.set()
            outs = await asyncio.wait_for(adapted, 60)
            return outs

        outs = asyncio.run(main())
        assert outs[-1].finished and outs[-1].error is None and engine.adaptation["phase"] == "ready"
    finally:
        slow_svd.set()
        asyncio_run_shutdown(engine)


def asyncio_run_shutdown(engine):
    import asyncio

    asyncio.run(engine.shutdown())
