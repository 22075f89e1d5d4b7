"""The pass-1 classification prompt: which kind of request is this?

The request is placed in a chat whose system message lists one guideline per category, and the answer
is opened as ``\\boxed{``. Instead of letting the model write an answer and parsing it, every category
is scored by the log-probability of its label's first token right there: one prefill, no generation,
and an answer that is always one of the categories. The tokens before the request are identical for
every request, so their KV is computed once (the engine's prefix cache).
"""
from __future__ import annotations

from dataclasses import dataclass

# One line per category, as the reference prompt does; a category without a line gets a generic one.
DEFAULT_GUIDELINES = {
    "code": "programming: writing, fixing or explaining code",
    "math": "mathematics: arithmetic, algebra, word problems that need calculation",
    "reasoning": "reasoning: science and commonsense questions, multiple-choice questions",
    "other": "anything else",
}
DEFAULT_SYSTEM = (
    "Classify the user's request into exactly one of these categories:\n{guidelines}\n"
    "Reply with only the category name inside \\boxed{{}}."
)
ANSWER_OPENING = "\\boxed{"
_SLOT = "\u0000REQUEST\u0000"  # stands for the request while the template is rendered


@dataclass(frozen=True)
class ClassifierPrompt:
    labels: tuple[str, ...]  # categories, "other" last
    label_ids: tuple[int, ...]  # first token of each label: the scored tokens
    prefix_ids: tuple[int, ...]  # everything before the request (shared by all requests)
    suffix_ids: tuple[int, ...]  # end of the user turn, the assistant opening and "\boxed{"

    def ids_for(self, tokenizer, text: str, max_request_tokens: int = 1024) -> list[int]:
        """Prompt ids for one request; a long request keeps its head and tail (enough to classify)."""
        req = tokenizer.encode(text, add_special_tokens=False)
        if len(req) > max_request_tokens:
            half = max_request_tokens // 2
            req = req[:half] + req[-half:]
        return list(self.prefix_ids) + req + list(self.suffix_ids)


def build_classifier_prompt(tokenizer, categories: list[str], guidelines: dict[str, str] | None = None,
                            system_template: str | None = None) -> ClassifierPrompt:
    labels = [c for c in dict.fromkeys(categories) if c != "other"] + ["other"]
    lines = {**DEFAULT_GUIDELINES, **(guidelines or {})}
    text_lines = "\n".join(f"- {c}: {lines.get(c, c)}" for c in labels)
    system = (system_template or DEFAULT_SYSTEM).format(guidelines=text_lines)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": _SLOT}]
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # a base model without a template: a plain-text layout
        rendered = f"{system}\n\nRequest: {_SLOT}\n\nCategory: "
    before, after = rendered.split(_SLOT)
    label_ids = []
    for label in labels:
        ids = tokenizer.encode(label, add_special_tokens=False)
        label_ids.append(ids[0])
    if len(set(label_ids)) != len(label_ids):
        clash = [l for l, i in zip(labels, label_ids) if label_ids.count(i) > 1]
        raise ValueError(f"categories {clash} start with the same token; rename one so pass 1 can tell them apart")
    return ClassifierPrompt(tuple(labels), tuple(label_ids),
                            tuple(tokenizer.encode(before, add_special_tokens=False)),
                            tuple(tokenizer.encode(after + ANSWER_OPENING, add_special_tokens=False)))
