"""The real embedded model behind the HTTP API answers sensibly (integration: loads SmolLM2-135M)."""
from __future__ import annotations

import openai
import pytest

from server.config import Settings
from tests.support.live import serve

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol_client(smollm2_dir, cache_dir, tmp_path_factory):
    # The run's shared cache: SmolLM2's SVD factors are computed once, not per run; a fresh expert store.
    settings = Settings(model=str(smollm2_dir), served_model_name="smollm2", api_key=None, cache_dir=cache_dir,
                        expert_dir=tmp_path_factory.mktemp("smol-experts"), max_model_len=1024)
    with serve(settings) as srv:
        yield openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=120)


def test_chat_answers_a_fact(smol_client):
    r = smol_client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=30, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


def test_completion_and_stream_agree(smol_client):
    kw = dict(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)
    whole = smol_client.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in smol_client.completions.create(stream=True, **kw))
    assert "Paris" in whole and streamed == whole
