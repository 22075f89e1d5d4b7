"""Pull the answer out of a model's free-form text, one pure function per answer kind.

- ``last_number``: GSM8K style, the last number in the text ("1,200", "-3.5", "$40").
- ``boxed``: the content of the last ``\\boxed{...}`` (braces balanced), MATH style.
- ``normalize_math`` / ``math_equal``: compare two LaTeX answers after light normalisation, and
  numerically when both sides are plain numbers or simple fractions.
- ``choice_letter``: the choice a multiple-choice answer picks (ARC).
- ``extract_code``: the Python program inside a reply (fenced block, or the code-looking tail).
All are tolerant: they return None (or the input) instead of raising on odd text.
"""
from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def parse_number(text: str) -> Fraction | None:
    """'1,200' -> 1200, '-3.50' -> -7/2, '.5' -> 1/2; None if ``text`` is not a plain number."""
    t = text.strip().replace(",", "").rstrip(".")
    if t.startswith("$"):
        t = t[1:]
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def last_number(text: str) -> Fraction | None:
    """The last number written in ``text`` (commas as thousands separators), or None."""
    found = _NUMBER.findall(text)
    for raw in reversed(found):
        n = parse_number(raw)
        if n is not None:
            return n
    return None


def boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), nested braces kept; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0 or text[start:i].strip() not in ("\\boxed", "\\fbox"):
        m = re.match(r"\\boxed\s+([^\s$]+)", text[start:])  # "\boxed 5"
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None  # unbalanced: the reply was cut off inside the box


_DROP = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\displaystyle", "$", "^\\circ", "^{\\circ}",
         "\\%", "%", "\\$")


def _unwrap(s: str, command: str) -> str:
    """'\\text{cm}' -> 'cm' for one command, every occurrence (braces balanced)."""
    while True:
        i = s.find(command + "{")
        if i < 0:
            return s
        depth, j = 0, i + len(command)
        for j in range(i + len(command), len(s)):
            depth += {"{": 1, "}": -1}.get(s[j], 0)
            if depth == 0:
                break
        s = s[:i] + s[i + len(command) + 1:j] + s[j + 1:]


def normalize_math(answer: str) -> str:
    """A canonical string for a LaTeX answer: spacing, \\left/\\right, dfrac, degrees, \\text{} wrappers,
    a leading 'x =' and a trailing period removed; thousands separators dropped."""
    s = answer.strip()
    for cmd in ("\\text", "\\textbf", "\\mathrm", "\\mbox"):
        s = _unwrap(s, cmd)
    for d in _DROP:
        s = s.replace(d, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\ ", "")
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"^[a-zA-Z]=", "", s)  # "x=5" -> "5"
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # "\frac12" -> "\frac{1}{2}"
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def _as_number(s: str) -> Fraction | None:
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if m:
        try:
            v = Fraction(int(m.group(2)), int(m.group(3)))
        except ZeroDivisionError:
            return None
        return -v if m.group(1) else v
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    return parse_number(s) if re.fullmatch(r"-?\d+(\.\d+)?", s) else None


def math_equal(predicted: str | None, gold: str) -> bool:
    """True if two LaTeX answers agree as normalised strings, or as numbers (0.5 == \\frac{1}{2})."""
    if predicted is None:
        return False
    p, g = normalize_math(predicted), normalize_math(gold)
    if p == g:
        return True
    a, b = _as_number(p), _as_number(g)
    return a is not None and b is not None and a == b


def choice_letter(text: str, labels: list[str], choices: list[str] | None = None) -> str | None:
    """The label of the choice ``text`` picks, or None.

    In order: an explicit "answer is B" / "Answer: (B)"; a reply that starts with the label ("B.",
    "(B)", "B"); the first "(B)" / "B)" / "B." in the text; the one choice whose text appears.
    """
    alt = "|".join(re.escape(x) for x in labels)
    rules = (
        rf"(?i:answer)(?:\s+is)?\s*[:\-]?\s*(?:(?i:option|choice)\s*)?\(?({alt})\)?(?![A-Za-z0-9])",
        rf"^\s*\(?({alt})\)?(?:[.):]|\s*$)",
        rf"\(({alt})\)|(?<![A-Za-z0-9])({alt})[.)](?:\s|$)",
    )
    for pattern in rules:  # labels are matched case-sensitively: "a" is an article, "A" a choice
        m = re.search(pattern, text)
        if m:
            return next(g for g in m.groups() if g)
    if choices:
        low = text.lower()
        hits = [lab for lab, c in zip(labels, choices) if c.strip() and c.strip().lower() in low]
        if len(hits) == 1:
            return hits[0]
    return None


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
_CODE_START = re.compile(r"^(def |class |import |from |@|[A-Za-z_][A-Za-z0-9_]* *=)", re.MULTILINE)


def extract_code(text: str) -> str:
    """The program in a reply: the first fenced block that defines something (else the first block);
    without fences, everything from the first line that looks like code."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    if blocks:
        py = [b for lang, b in blocks if lang in ("python", "py", "python3", "")]
        pool = py or [b for _, b in blocks]
        with_def = [b for b in pool if "def " in b or "class " in b]
        return (with_def or pool)[0]
    m = _CODE_START.search(text)
    return text[m.start():] if m else text
