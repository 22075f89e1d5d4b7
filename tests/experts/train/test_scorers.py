"""Every task's scorer on known right and wrong replies, and the answer parsers under them."""
from __future__ import annotations

from fractions import Fraction

import pytest
from transformers import AutoTokenizer

from experts.tasks import TASKS, get_task
from experts.tasks.answers import boxed, choice_letter, extract_code, last_number, math_equal
from tests.support.train_data import write_all


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_all(tmp_path_factory.mktemp("data"))


def test_last_number():
    assert last_number("3 + 4 = 7 apples.\nThe answer is 7.") == 7
    assert last_number("She earns $2,500.00 in total") == 2500
    assert last_number("the change is -3.5 degrees") == Fraction(-7, 2)
    assert last_number("no digits here") is None


def test_boxed_and_math_equal():
    assert boxed("so $\\boxed{\\frac{3}{4}}$ and done") == "\\frac{3}{4}"
    assert boxed("first \\boxed{1} then \\boxed{\\sqrt{2}}") == "\\sqrt{2}"
    assert boxed("cut off \\boxed{\\frac{1}{") is None
    assert math_equal("\\dfrac{3}{4}", "\\frac{3}{4}")
    assert math_equal("0.75", "\\frac{3}{4}")
    assert math_equal("x = 5", "5")
    assert math_equal("90^\\circ", "90")
    assert math_equal("\\text{(B)}", "(B)")
    assert math_equal("10,000", "10000")
    assert not math_equal("\\frac{4}{3}", "\\frac{3}{4}")
    assert not math_equal(None, "5")


def test_choice_letter():
    labels, choices = list("ABCD"), ["heat", "light energy", "wind", "sound"]
    assert choice_letter("The answer is B.", labels) == "B"
    assert choice_letter("Answer: (C)", labels) == "C"
    assert choice_letter("B. light energy", labels) == "B"
    assert choice_letter("I think (D) fits best", labels) == "D"
    assert choice_letter("A plant needs light energy to grow.", labels, choices) == "B"  # "A" is an article
    assert choice_letter("no idea", labels, choices) is None


def test_extract_code():
    reply = "Here you go:\n```python\ndef f(x):\n    return x\n```\nDone."
    assert extract_code(reply) == "def f(x):\n    return x\n"
    assert extract_code("Sure.\ndef g():\n    pass") == "def g():\n    pass"
    assert "def h" in extract_code("```python\ndef h():\n    return 1")  # unclosed fence: to the end


def test_gsm8k(data):
    task = get_task("gsm8k")
    ex = next(e for e in task.load(data, "test") if e.answer == "120")
    assert task.score(ex, "10 boxes of 12 pens make 120 pens.\n120")
    assert not task.score(ex, "There are 12 pens in each box, so 22 pens.")
    assert task.score(ex, ex.reference)
    train = task.load(data, "train") + task.load(data, "val")
    sara = next(e for e in train if "Sara" in e.question)
    assert sara.answer == "2500" and task.score(sara, "She earns $2,500.")


def test_arc_both_sets(data):
    for name in ("arc-easy", "arc-challenge"):
        task = get_task(name)
        ex = task.load(data, "train")[0]
        assert task.score(ex, "The answer is B.") and not task.score(ex, "The answer is A.")
    numeric = get_task("arc-easy").load(data, "test")[-1]  # labels 1-4 are shown and scored as A-D
    assert numeric.answer == "B" and "B. eight" in numeric.question
    assert get_task("arc-easy").score(numeric, "B") and not get_task("arc-easy").score(numeric, "D")


def test_arc_in_the_choices_own_words(data):
    """The text form lists the choices without letters; a reply scores when the one choice it names is right."""
    for name in ("arc-easy-text", "arc-challenge-text"):
        task = get_task(name)
        ex = task.load(data, "train")[0]  # plants: heat, light energy, wind, sound; B
        assert "- light energy\n" in ex.question and "B." not in ex.question and ex.reference == "light energy"
        assert task.score(ex, "Light energy.") and task.score(ex, "Plants need light energy from the Sun.")
        assert not task.score(ex, "heat") and not task.score(ex, "plants")  # a wrong choice, none
        assert not task.score(ex, "- heat\n- light energy\n- wind")  # several choices named: no answer
        assert task.parse(ex, "light energy") == "B" and task.parse(ex, "wind or sound") is None
    numeric = get_task("arc-easy-text").load(data, "test")[-1]  # labels 1-4: the answer is still the choice
    assert get_task("arc-easy-text").score(numeric, "eight") and not get_task("arc-easy-text").score(numeric, "six")


def test_a_choice_inside_another_named_choice_does_not_count():
    from experts.tasks.arc import named_choice

    assert named_choice("It is heat transfer.", ["heat", "heat transfer", "cold"]) == 1
    assert named_choice("heat and cold", ["heat", "heat transfer", "cold"]) is None
    assert named_choice("The sun's light!", ["the Sun's light", "wind"]) == 0  # case and punctuation ignored
    assert named_choice("sunlight", ["light", "wind"]) is None  # a word, not a part of one
    assert named_choice("The offspring is Rr.", ["R", "rr", "Rr", "RR"]) == 2  # choices that differ in case only
    assert named_choice("It is 1.0 x 10^-3.", ["1.0 x 10^3", "1.0 x 10^-3"]) == 1  # or in signs


def test_math500(data):
    task = get_task("math500")
    frac, five = task.load(data, "test")
    assert task.score(frac, "Adding gives $\\boxed{\\dfrac{3}{4}}$.")
    assert task.score(five, "so \\boxed{x=5}")
    assert not task.score(frac, "Adding gives $\\boxed{\\frac{2}{6}}$.")
    assert not task.score(five, "the answer is 5")  # no box, no credit


@pytest.mark.usefixtures("isolation")
def test_mbpp_runs_tests_in_sandbox(data):
    task = get_task("mbpp")
    ex = task.load(data, "test")[0]
    right = "```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    hangs = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
    assert task.score_many([ex, ex, ex], [right, wrong, "I cannot write code."]) == [True, False, False]
    assert [e.id for e in task.load(data, "train")] == ["mbpp/700"]
    assert [e.id for e in task.load(data, "val")] == ["mbpp/520"]
    task.limits = type(task.limits)(timeout_s=2.0)
    try:
        assert task.score(ex, hangs) is False
    finally:
        del task.limits


@pytest.mark.usefixtures("isolation")
def test_humaneval_body_or_whole_function(data):
    task = get_task("humaneval")
    ex = task.load(data, "test")[0]
    assert task.score(ex, "```python\n    return 3 * x\n```")  # the body continues the prompt
    assert task.score(ex, "```python\ndef triple(x):\n    return x * 3\n```")
    assert not task.score(ex, "```python\ndef triple(x):\n    return x + 3\n```")
    assert task.score(ex, ex.reference)


def test_cls(data, smollm2_dir):
    task = get_task("classifier")
    train = task.load(data, "train")
    assert sorted(e.answer for e in train) == ["code", "math", "reasoning"]  # balanced: one each here
    ex = next(e for e in train if e.answer == "math")
    assert task.score(ex, "math}") and task.score(ex, " Math}\n") and task.score(ex, "\\boxed{math}")
    assert not task.score(ex, "code}") and not task.score(ex, "mathematics}") and not task.score(ex, "}")
    test = task.load(data, "test")
    assert {e.meta["source"] for e in test} == {"math500", "humaneval", "arc-challenge"}
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = tok.decode(task.prompt_ids(tok, ex))  # the serving-time pass-1 prompt, opened at \boxed{
    assert text.endswith("\\boxed{") and ex.question in text and "- reasoning:" in text


def test_every_task_scores_its_reference(data):
    for name, task in TASKS.items():
        for split in task.splits:
            exs = task.load(data, split)
            assert all(task.score_many(exs, [e.reference for e in exs])), (name, split)
