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


def test_the_grammar_backends_refusal_is_a_structure_error(tiny_llama_dir):
    """A structure this engine's compiler takes but vLLM's grammar backend refuses is refused at the edge (a
    StructureError: 400), not inside vLLM (where it would fail the request)."""
    import dataclasses

    import pytest

    from engine.structured import Grammars, StructureError
    from engine.vllm.engine import VLLMGrammars

    seen = []

    def validate(params):
        seen.append(params.structured_outputs)
        if getattr(params.structured_outputs, "regex", None) == "[a-z]+":
            raise ValueError("Grammar error: refused by the backend")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    grammars = VLLMGrammars(Grammars.shared(tok, len(tok)), dataclasses.replace(API, validate_structure=validate))
    grammars.check(Structure("regex", "[0-9]+"))
    with pytest.raises(StructureError, match="refused by the backend"):
        grammars.check(Structure("regex", "[a-z]+"))
    with pytest.raises(StructureError):  # this engine's compiler refuses it first: the backend is not asked
        grammars.check(Structure("json", "{not json"))
    assert [vars(s) for s in seen] == [{"regex": "[0-9]+"}, {"regex": "[a-z]+"}]
    assert VLLMGrammars(grammars.grammars, API).check(Structure("regex", "[a-z]+")) is None  # no backend check
