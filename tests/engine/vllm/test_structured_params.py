"""What vLLM receives for each structured-output kind (its StructuredOutputsParams fields)."""
from __future__ import annotations

from engine.contract import Structure
from engine.vllm.engine import vllm_structure
from tests.support.fake_vllm import API


def test_each_kind_maps_to_vllms_field():
    assert vllm_structure(API, None) is None
    got = {k: vars(vllm_structure(API, st)) for k, st in {
        "json": Structure("json", '{"type": "object"}'), "object": Structure("json_object"),
        "regex": Structure("regex", "[a-z]+"), "choice": Structure("choice", ("a", "b")),
        "grammar": Structure("grammar", 'root ::= "x"')}.items()}
    assert got == {"json": {"json": '{"type": "object"}', "disable_any_whitespace": True},
                   "object": {"json_object": True, "disable_any_whitespace": True},
                   "regex": {"regex": "[a-z]+"}, "choice": {"choice": ["a", "b"]}, "grammar": {"grammar": 'root ::= "x"'}}
