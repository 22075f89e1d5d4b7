"""The generated tasks of the Transformer² miniature: fixed and seeded splits, answers right, scorers reading
what a reply commits to, and the classification task built from them."""
from __future__ import annotations

import re

import pytest

from experts.tasks import get_task
from experts.tasks.miniature import CATEGORIES, SPECS, TRAINED, UNSEEN, read_letter, read_number, read_wrapped


@pytest.mark.parametrize("name", list(SPECS))
def test_splits_are_fixed_sized_and_answers_right(name):
    task = get_task(name)
    test = task.load(None, "test")
    assert len(test) == 500 and test == get_task(name).load(None, "test")  # identical on every call
    for ex in test[:50]:
        nums = [int(n) for n in re.findall(r"\d+", ex.question)]
        if name in ("mini-mul",):
            assert int(ex.answer) == nums[0] * nums[1]
        elif name in ("mini-add", "mini-add2"):
            assert int(ex.answer) == nums[0] + nums[1]
        elif name == "mini-muladd":
            assert int(ex.answer) == nums[0] * nums[1] + nums[2]
        elif name in ("mini-bracket", "mini-paren"):
            word = re.search(r'"([a-z]+)"', ex.question).group(1)
            assert ex.answer == (f"[{word}]" if "square" in ex.question else f"({word})")
        else:
            word = re.search(r'"([a-z]+)"', ex.question).group(1)
            assert ex.answer == (word[0] if "first" in ex.question else word[-1])
        assert task.score(ex, ex.reference) and not task.score(ex, "I do not know.")


def test_the_test_seed_draws_a_fresh_test_set_and_leaves_training_alone():
    task = get_task("mini-last")
    fresh = task.seeded(7)
    assert fresh.load(None, "test") != task.load(None, "test")
    assert fresh.load(None, "test") == task.seeded(7).load(None, "test")
    assert fresh.load(None, "train") == task.load(None, "train") and task.test_seed == 0
    questions = {e.question for e in task.load(None, "train")}
    assert len(questions & {e.question for e in task.load(None, "test")}) < 100  # pseudo-words: few repeats


def test_trained_tasks_have_training_data_and_unseen_ones_do_not():
    for name in TRAINED:
        assert "train" in get_task(name).splits
    for name in UNSEEN:
        task = get_task(name)
        assert "train" not in task.splits and task.category in CATEGORIES and len(task.load(None, "val")) == 200


@pytest.mark.parametrize("reply, want", [
    ("To add 59 and 8, you simply add them together: 59 + 8 = 67.", "67"),
    ("The answer is 1,024.", "1024"),
    ("7 times 8 is 56.0", "56"),
    ("I cannot compute that.", None),
])
def test_read_number(reply, want):
    assert read_number(reply) == want


@pytest.mark.parametrize("reply, want", [
    ('The last letter of the word "garden" is "n".', "n"),
    ("The first letter is **G**.", "g"),
    ("It is a letter: t", "t"),
    ("The word ends with a vowel.", None),
])
def test_read_letter(reply, want):
    assert read_letter(reply) == want


@pytest.mark.parametrize("reply, opening, closing, want", [
    ("Bread: [BREAD]", "[", "]", "[bread]"),
    ("[a] then [kite]", "[", "]", "[kite]"),
    ("The word (kite) in brackets: [kite", "[", "]", None),
    ("(zebra)", "(", ")", "(zebra)"),
    ("[ocean]", "(", ")", None),
])
def test_read_wrapped(reply, opening, closing, want):
    assert read_wrapped(reply, opening, closing) == want


def test_the_classification_task_labels_each_skill():
    cls = get_task("mini-cls")
    train, test = cls.load(None, "train"), cls.load(None, "test")
    assert {e.answer for e in train} == set(CATEGORIES) == {e.answer for e in test}
    counts = {c: sum(e.answer == c for e in train) for c in CATEGORIES}
    assert len(set(counts.values())) == 1  # balanced
    assert {e.meta["source"] for e in test} == set(UNSEEN)
    assert cls.score(train[0], f"{train[0].answer}}}") and cls.categories == tuple(sorted(CATEGORIES))
