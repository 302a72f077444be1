"""Generated reasoning problems with worked solutions and verifiable answers (no dataset is downloaded).

Two families, each in English (``lang="en"``) and Hindi (``lang="hi"``, Devanagari words with ASCII or Devanagari
numerals):

- ``"arithmetic"``: a multi-step word problem. A quantity starts at ``v0`` and ``steps`` operations (+, -, *, /,
  all results positive integers, divisions exact) are applied in story form; the question asks for the final
  value. The worked solution has one line per operation (``Step k: a op b = c``) and then ``Answer: c``.
- ``"countdown"``: "reach the target from these numbers with + - * /, each number at most once". Problems are
  built by construction (``steps + 1`` numbers combined by ``steps`` operations with positive integer
  intermediates), so a solution exists; the worked solution lists the operations and the final line is
  ``Answer: <expression>``. :func:`check_answer` accepts *any* expression that uses only given numbers (each at
  most as often as given) and evaluates exactly (rational arithmetic) to the target.

Difficulty is ``steps`` (the number of operations in the worked solution, 1..8; the issue's "1..4+") and, second,
``digits``: operands are drawn with up to ``digits`` decimal digits and intermediate values stay below
``10 ** (digits + 1)``.

Answer format: the last line of a solution is ``Answer: <value>`` (Hindi ``उत्तर: <value>``). :func:`check_answer`
looks for the *last* ``Answer:`` / ``उत्तर:`` marker in a completion (case-insensitive, markdown ``**`` and a
trailing full stop or danda tolerated, Devanagari digits read as digits).

Splits. Every problem has a ``signature`` (its mathematical identity, independent of wording and language:
the start value and operation sequence, or the sorted numbers and target). A signature is *held out* when the
first 8 bytes of its SHA-256 fall below :data:`HELDOUT_FRACTION`; :func:`generate_problems` never returns a
held-out signature and :func:`heldout_problems` returns only held-out ones, so the two are disjoint in every
language, for every seed and size. :func:`heldout_problems` is fixed (seeded by :data:`HELDOUT_SEED`, one stream
per family, language and step count) and free of duplicates.

Everything is deterministic given its arguments (numpy ``default_rng`` streams).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import re
from collections import Counter
from fractions import Fraction
from typing import Sequence

import numpy as np

__all__ = [
    "FAMILIES",
    "LANGS",
    "HELDOUT_FRACTION",
    "HELDOUT_SEED",
    "MAX_STEPS",
    "FEW_SHOT_STOP",
    "Problem",
    "generate_problems",
    "heldout_problems",
    "is_heldout",
    "check_answer",
    "check_countdown_expression",
    "extract_answer",
    "few_shot_prompt",
    "to_devanagari_digits",
    "to_ascii_digits",
]

FAMILIES: tuple[str, ...] = ("arithmetic", "countdown")
LANGS: tuple[str, ...] = ("en", "hi")
#: Fraction of the signature space that is held out for testing.
HELDOUT_FRACTION = 0.1
#: Seed of the fixed held-out set.
HELDOUT_SEED = 20240610
MAX_STEPS = 8
MAX_DIGITS = 3
_MAX_STALL = 20_000  # held-out draws without a new signature before the space counts as exhausted
#: Blocks of a few-shot prompt are separated by a blank line; a base model's continuation ends there.
FEW_SHOT_STOP = "\n\n"

_DEVANAGARI_DIGITS = "०१२३४५६७८९"
_TO_DEV = str.maketrans("0123456789", _DEVANAGARI_DIGITS)
_TO_ASCII = str.maketrans(_DEVANAGARI_DIGITS, "0123456789")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}


def to_devanagari_digits(text: str) -> str:
    """``text`` with ASCII digits 0-9 replaced by Devanagari digits ०-९."""
    return text.translate(_TO_DEV)


def to_ascii_digits(text: str) -> str:
    """``text`` with Devanagari digits ०-९ replaced by ASCII digits."""
    return text.translate(_TO_ASCII)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One generated problem.

    Attributes:
      family: ``"arithmetic"`` or ``"countdown"``.
      lang: ``"en"`` or ``"hi"``.
      question: the problem text (the user message).
      solution: the worked solution, one ``Step k: ...`` line per operation, ending with the answer line.
      answer: arithmetic: the final value; countdown: the target.
      numbers: arithmetic: the start value then each operand; countdown: the numbers given (in question order).
      steps: operations in the worked solution (the difficulty).
      digits: the operand size the problem was drawn with.
      numerals: ``"ascii"`` or ``"devanagari"`` (the digits the texts are written with).
      signature: the mathematical identity used for the train/held-out split.
    """

    family: str
    lang: str
    question: str
    solution: str
    answer: int
    numbers: tuple[int, ...]
    steps: int
    digits: int
    numerals: str
    signature: str

    @property
    def difficulty(self) -> int:
        """The difficulty label: the number of operations (``steps``)."""
        return self.steps

    def messages(self, system: str | None = None, with_solution: bool = True) -> list[dict[str, str]]:
        """Chat messages: optional system prompt, the question as the user turn and (``with_solution``) the
        worked solution as the assistant turn (for :func:`mani_jax.chat.encode_chat`)."""
        out = [{"role": "system", "content": system}] if system else []
        out.append({"role": "user", "content": self.question})
        if with_solution:
            out.append({"role": "assistant", "content": self.solution})
        return out


# ------------------------------------------------------------------------------------------------- wording
_EN_NAMES = ("Ravi", "Meera", "Asha", "Tom", "Lina", "Omar", "Kabir", "Priya", "Sam", "Nora")
_EN_OBJECTS = (("apple", "apples"), ("marble", "marbles"), ("pencil", "pencils"), ("coin", "coins"),
               ("sticker", "stickers"), ("book", "books"), ("shell", "shells"), ("card", "cards"))
_EN_TEMPLATES = {
    "start": ("{name} has {n} {obj}.", "{name} starts with {n} {obj}."),
    "+": ("{name} gets {n} more {obj}.", "{name} finds {n} more {obj}.", "{name} buys {n} more {obj}."),
    "-": ("{name} gives {n} {obj} away.", "{name} loses {n} {obj}.", "{name} uses up {n} {obj}."),
    "*": ("{name} ends up with {n} times as many {obj}.", "{name}'s number of {obj} is multiplied by {n}."),
    "/": ("{name} splits the {obj} into {n} equal groups and keeps one group.",
          "{name} shares the {obj} equally among {n} people, {name} included, and keeps one share."),
    "question": ("How many {obj} does {name} have now?", "How many {obj} does {name} have at the end?"),
}
_HI_NAMES = ("राम", "सीता", "अनु", "रवि", "मीरा", "आरव", "प्रिया", "कबीर")
# (plural noun, gender): verbs, possessives and "how many" agree with the noun.
_HI_OBJECTS = (("सेब", "m"), ("आम", "m"), ("केले", "m"), ("पेन", "m"), ("गुब्बारे", "m"), ("लड्डू", "m"),
               ("किताबें", "f"), ("टॉफ़ियाँ", "f"), ("पेंसिलें", "f"), ("गेंदें", "f"))
_HI_AGREE = {"m": dict(te="ते", ke="के", kitne="कितने", saare="सारे", e="े"),
             "f": dict(te="ती", ke="की", kitne="कितनी", saare="सारी", e="ी")}
_HI_TEMPLATES = {
    "start": ("{name} के पास {n} {obj} हैं।",),
    "+": ("{name} को {n} {obj} और मिल{te} हैं।", "{name} के पास {n} {obj} और आ जा{te} हैं।"),
    "-": ("{name} {ke} {n} {obj} खो जा{te} हैं।", "{name} {ke} {n} {obj} खर्च हो जा{te} हैं।"),
    "*": ("{name} {ke} {obj} {n} गुना हो जा{te} हैं।",),
    "/": ("{saare} {obj} {n} बराबर हिस्सों में बाँट{e} जा{te} हैं और {name} के पास एक हिस्सा रहता है।",),
    "question": ("अब {name} के पास {kitne} {obj} हैं?", "अंत में {name} के पास {kitne} {obj} हैं?"),
}
_STEP_WORD = {"en": "Step", "hi": "चरण"}
_ANSWER_WORD = {"en": "Answer", "hi": "उत्तर"}
_QUESTION_WORD = {"en": "Problem", "hi": "प्रश्न"}


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _numerals_text(text: str, numerals: str) -> str:
    return to_devanagari_digits(text) if numerals == "devanagari" else text


# ----------------------------------------------------------------------------------------------- arithmetic
def _arithmetic_math(rng: np.random.Generator, steps: int, digits: int):
    """``(v0, [(op, operand, result)])`` with every result a positive integer below ``10 ** (digits + 1)``."""
    hi = 10 ** digits - 1
    cap = 10 ** (digits + 1)
    v = int(rng.integers(2, hi + 1))
    v0, ops = v, []
    for _ in range(steps):
        choices = []
        if v + 1 <= cap:
            choices.append("+")
        if v >= 2:
            choices.append("-")
        if 2 * v <= cap:
            choices.append("*")
        divisors = [d for d in range(2, min(hi, v // 2) + 1) if v % d == 0]
        if divisors:
            choices.append("/")
        op = _pick(rng, choices)  # never empty: v >= 2 allows "-", v == 1 allows "+"
        if op == "+":
            a = int(rng.integers(1, min(hi, cap - v) + 1))
        elif op == "-":
            a = int(rng.integers(1, min(hi, v - 1) + 1))
        elif op == "*":
            a = int(rng.integers(2, min(hi, cap // v) + 1))
        else:
            a = _pick(rng, divisors)
        r = _OPS[op](v, a)
        ops.append((op, a, r))
        v = r
    return v0, ops


def _arith_signature(v0: int, ops) -> str:
    return f"arithmetic|{v0}" + "".join(f"{op}{a}" for op, a, _ in ops)


def _arith_texts(rng: np.random.Generator, lang: str, v0: int, ops) -> tuple[str, str]:
    if lang == "en":
        name = _pick(rng, _EN_NAMES)
        sing, plur = _pick(rng, _EN_OBJECTS)

        def say(kind, n=None):
            obj = sing if n == 1 else plur
            return _pick(rng, _EN_TEMPLATES[kind]).format(name=name, n=n, obj=obj)

        sentences = [say("start", v0)]
        for k, (op, a, _) in enumerate(ops):
            s = say(op, a)
            sentences.append(("Then " + s) if k else s)
        sentences.append(say("question"))
    else:
        name = _pick(rng, _HI_NAMES)
        obj, gender = _pick(rng, _HI_OBJECTS)
        agree = _HI_AGREE[gender]

        def say(kind, n=None):
            return _pick(rng, _HI_TEMPLATES[kind]).format(name=name, n=n, obj=obj, **agree)

        sentences = [say("start", v0)]
        for k, (op, a, _) in enumerate(ops):
            s = say(op, a)
            sentences.append(("फिर " + s) if k else s)
        sentences.append(say("question"))
    question = " ".join(sentences)
    lines, v = [], v0
    for k, (op, a, r) in enumerate(ops, start=1):
        lines.append(f"{_STEP_WORD[lang]} {k}: {v} {op} {a} = {r}")
        v = r
    lines.append(f"{_ANSWER_WORD[lang]}: {v}")
    return question, "\n".join(lines)


# ------------------------------------------------------------------------------------------------ countdown
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _wrap(expr: str, prec: int, parent: int, right_of_noncommutative: bool) -> str:
    return f"({expr})" if prec < parent or (right_of_noncommutative and prec == parent) else expr


def _countdown_math(rng: np.random.Generator, steps: int, digits: int):
    """``(numbers, target, [(a, op, b, result)], expression)`` or ``None`` when this draw is rejected."""
    hi = 10 ** digits - 1
    cap = 10 ** (digits + 1)
    numbers = [int(x) for x in rng.integers(1, hi + 1, size=steps + 1)]
    pool = [(n, str(n), 3) for n in numbers]  # (value, expression, precedence; 3 = atom)
    lines = []
    for _ in range(steps):
        i, j = (int(x) for x in rng.choice(len(pool), size=2, replace=False))
        (a, ea, pa), (b, eb, pb) = pool[i], pool[j]
        if a < b:
            (a, ea, pa), (b, eb, pb) = (b, eb, pb), (a, ea, pa)
        choices = []
        if a + b <= cap:
            choices.append("+")
        if a > b:
            choices.append("-")
        if a >= 2 and b >= 2 and a * b <= cap:
            choices.append("*")
        if b >= 2 and a % b == 0:
            choices.append("/")
        if not choices:
            return None
        op = _pick(rng, choices)
        r = _OPS[op](a, b)
        p = _PREC[op]
        expr = f"{_wrap(ea, pa, p, False)} {op} {_wrap(eb, pb, p, op in '-/')}"
        lines.append((a, op, b, r))
        pool = [x for k, x in enumerate(pool) if k not in (i, j)] + [(r, expr, p)]
    target, expression = pool[0][0], pool[0][1]
    if target in numbers:  # a single given number would already be a solution
        return None
    return numbers, target, lines, expression


def _countdown_signature(numbers, target) -> str:
    return "countdown|" + ",".join(str(n) for n in sorted(numbers)) + f"->{target}"


def _countdown_texts(lang: str, numbers, target, lines, expression) -> tuple[str, str]:
    nums = ", ".join(str(n) for n in numbers)
    if lang == "en":
        question = (f"Use the numbers {nums} to make {target}. You may use +, -, * and /, "
                    "and each number at most once.")
    else:
        question = (f"संख्याओं {nums} से {target} बनाइए। आप +, -, * और / का उपयोग कर सकते हैं, "
                    "और हर संख्या अधिकतम एक बार।")
    out = [f"{_STEP_WORD[lang]} {k}: {a} {op} {b} = {r}" for k, (a, op, b, r) in enumerate(lines, start=1)]
    out.append(f"{_ANSWER_WORD[lang]}: {expression}")
    return question, "\n".join(out)


# ---------------------------------------------------------------------------------------------------- split
def is_heldout(signature: str) -> bool:
    """Whether a problem signature belongs to the held-out test set (first 8 bytes of its SHA-256, read as a
    fraction of ``2**64``, below :data:`HELDOUT_FRACTION`)."""
    h = int.from_bytes(hashlib.sha256(signature.encode("utf-8")).digest()[:8], "big")
    return h < HELDOUT_FRACTION * 2.0 ** 64


def _check_choice(value, allowed, name):
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
    return value


def _check_int_tuple(values, lo, hi, name) -> tuple[int, ...]:
    if isinstance(values, (int, np.integer)) and not isinstance(values, bool):
        values = (values,)
    try:
        out = tuple(values)
    except TypeError:
        raise ValueError(f"{name}: expected an int or a sequence of ints in [{lo}, {hi}], got {values!r}") from None
    if not out or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi
                      for v in out):
        raise ValueError(f"{name}: expected a non-empty sequence of ints in [{lo}, {hi}], got {values!r}")
    return tuple(int(v) for v in out)


def _make_one(rng, family, lang, steps, digits, numerals) -> Problem | None:
    if family == "arithmetic":
        v0, ops = _arithmetic_math(rng, steps, digits)
        sig = _arith_signature(v0, ops)
        question, solution = _arith_texts(rng, lang, v0, ops)
        answer, numbers = ops[-1][2], (v0,) + tuple(a for _, a, _ in ops)
    else:
        made = _countdown_math(rng, steps, digits)
        if made is None:
            return None
        numbers, target, lines, expression = made
        sig = _countdown_signature(numbers, target)
        question, solution = _countdown_texts(lang, numbers, target, lines, expression)
        answer, numbers = target, tuple(numbers)
    if numerals == "mixed":
        numerals = _pick(rng, ("ascii", "devanagari"))
    return Problem(family=family, lang=lang, question=_numerals_text(question, numerals),
                   solution=_numerals_text(solution, numerals), answer=int(answer), numbers=numbers, steps=steps,
                   digits=digits, numerals=numerals, signature=sig)


def _resolve_numerals(lang: str, numerals: str | None) -> str:
    if numerals is None:
        return "ascii" if lang == "en" else "mixed"
    _check_choice(numerals, ("ascii", "devanagari", "mixed"), "numerals")
    if lang == "en" and numerals != "ascii":
        raise ValueError(f"numerals: English problems use ASCII numerals, got {numerals!r} with lang='en'")
    return numerals


def generate_problems(n: int, *, family: str = "arithmetic", lang: str = "en", seed: int = 0,
                      steps: int | Sequence[int] = (1, 2, 3, 4), digits: int | Sequence[int] = (1, 2),
                      numerals: str | None = None) -> list[Problem]:
    """``n`` training problems (never a held-out signature; repeats of a signature are possible).

    Problem ``i`` has ``steps[i % len(steps)]`` operations and ``digits[(i // len(steps)) % len(digits)]``
    digits, so every (steps, digits) cell is equally represented.

    Args:
      n: number of problems (>= 0).
      family: ``"arithmetic"`` or ``"countdown"``.
      lang: ``"en"`` or ``"hi"``.
      seed: any int >= 0; the output is a deterministic function of all the arguments.
      steps: operation counts to cycle through, each in ``[1, MAX_STEPS]``.
      digits: operand sizes to cycle through, each in ``[1, 3]``.
      numerals: ``"ascii"``, ``"devanagari"`` (Hindi only) or ``"mixed"`` (each Hindi problem picks one at
        random); default ASCII for English and mixed for Hindi.

    Returns:
      ``list[Problem]`` of length ``n``.

    Raises:
      ValueError: a bad argument (named in the message).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    _check_choice(family, FAMILIES, "family")
    _check_choice(lang, LANGS, "lang")
    numerals = _resolve_numerals(lang, numerals)
    steps = _check_int_tuple(steps, 1, MAX_STEPS, "steps")
    digits = _check_int_tuple(digits, 1, MAX_DIGITS, "digits")
    rng = np.random.default_rng([int(seed), FAMILIES.index(family), LANGS.index(lang), 1])
    out: list[Problem] = []
    for i in range(int(n)):
        s, d = steps[i % len(steps)], digits[(i // len(steps)) % len(digits)]
        for _ in range(10_000):
            p = _make_one(rng, family, lang, s, d, numerals)
            if p is not None and not is_heldout(p.signature):
                out.append(p)
                break
        else:  # pragma: no cover - the training share of every cell is large
            raise ValueError(f"steps={s}, digits={d}: could not draw a training problem")
    return out


def heldout_problems(n_per_difficulty: int = 50, *, family: str = "arithmetic", lang: str = "en",
                     steps: int | Sequence[int] = (1, 2, 3, 4), digits: int | Sequence[int] = (1, 2),
                     numerals: str | None = None) -> list[Problem]:
    """The fixed held-out test set: ``n_per_difficulty`` distinct held-out problems for each step count.

    Problems of step count ``s`` come from their own stream seeded by ``(HELDOUT_SEED, family, lang, s)``, so
    the set for ``s`` does not depend on which other step counts are asked for, and a larger
    ``n_per_difficulty`` extends a smaller one. Each draw picks its ``digits`` at random from ``digits`` (the
    small-operand space of one-step problems has only tens of held-out signatures; later draws then come
    from larger operands). Signatures are unique within the returned list.

    Args: as :func:`generate_problems` (``n_per_difficulty`` >= 1).

    Returns:
      ``list[Problem]``, grouped by step count in the order of ``steps``.

    Raises:
      ValueError: a bad argument, or fewer than ``n_per_difficulty`` distinct held-out problems exist for a
        step count with these ``digits`` (20000 draws in a row found no new one).
    """
    if isinstance(n_per_difficulty, bool) or not isinstance(n_per_difficulty, (int, np.integer)) \
            or n_per_difficulty < 1:
        raise ValueError(f"n_per_difficulty: expected an int >= 1, got {n_per_difficulty!r}")
    _check_choice(family, FAMILIES, "family")
    _check_choice(lang, LANGS, "lang")
    numerals = _resolve_numerals(lang, numerals)
    steps = _check_int_tuple(steps, 1, MAX_STEPS, "steps")
    digits = _check_int_tuple(digits, 1, MAX_DIGITS, "digits")
    out: list[Problem] = []
    for s in dict.fromkeys(steps):
        rng = np.random.default_rng([HELDOUT_SEED, FAMILIES.index(family), LANGS.index(lang), s])
        seen: set[str] = set()
        stall = 0  # draws since the last new held-out signature
        while len(seen) < n_per_difficulty:
            stall += 1
            if stall > _MAX_STALL:
                raise ValueError(f"n_per_difficulty={n_per_difficulty}: only {len(seen)} distinct held-out "
                                 f"{family} problems found with steps={s}, digits={digits}")
            p = _make_one(rng, family, lang, s, _pick(rng, digits), numerals)
            if p is not None and is_heldout(p.signature) and p.signature not in seen:
                seen.add(p.signature)
                out.append(p)
                stall = 0
    return out


# ------------------------------------------------------------------------------------------------- checking
_MARKER = re.compile(r"(?:answer|उत्तर)\s*\**\s*[:：]([^\n]*)", re.IGNORECASE)
_NUMBER = re.compile(r"[-+−]?\d+(?:\.\d+)?")
_MAX_EXPR_CHARS = 200
_EXPR_CHARS = re.compile(r"[0-9+\-*/() ]+")  # no letters: rules out 0x1F, 1_0, 1e3, names


def extract_answer(completion: str) -> str | None:
    """The text after the last ``Answer:`` / ``उत्तर:`` marker of ``completion`` (to the end of that line), with
    Devanagari digits made ASCII and markdown asterisks, ``$``, spaces and a trailing ``.``/``।`` stripped;
    ``None`` when there is no marker. Raises ``TypeError`` when ``completion`` is not a ``str``."""
    if not isinstance(completion, str):
        raise TypeError(f"completion: expected str, got {type(completion).__name__}")
    matches = _MARKER.findall(completion)
    if not matches:
        return None
    text = to_ascii_digits(matches[-1])
    text = text.strip().strip("*$").strip()
    text = text.rstrip(".।").strip().strip("*$").strip()
    return text


def _check_arithmetic(answer: int, text: str) -> bool:
    if "=" in text:
        text = text.rsplit("=", 1)[1]
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # thousands separators
    found = _NUMBER.findall(text)
    if len(found) != 1:
        return False
    return Fraction(found[0].replace("−", "-")) == answer


def _eval_expression(node, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval_expression(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
        a, b = _eval_expression(node.left, used), _eval_expression(node.right, used)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        return a / b  # ZeroDivisionError is caught by the caller
    raise ValueError(f"not allowed in a countdown expression: {ast.dump(node)[:60]}")


def check_countdown_expression(numbers: Sequence[int], target: int, expression: str) -> bool:
    """Whether ``expression`` (``+ - * /`` and parentheses over integer literals; ``×``, ``÷``, ``−``, ``x`` and
    Devanagari digits accepted) uses only numbers from ``numbers`` — each at most as many times as it is given —
    and evaluates exactly (rational arithmetic, so ``7 / 2 * 2`` is 7) to ``target``. Unary minus, powers,
    floor division, decimals and anything else are rejected (``False``)."""
    text = to_ascii_digits(expression).replace("×", "*").replace("÷", "/").replace("−", "-")
    text = re.sub(r"(?<=[\d)\s])[xX](?=\s*[\d(])", "*", text).strip()
    if not text or len(text) > _MAX_EXPR_CHARS or not _EXPR_CHARS.fullmatch(text):
        return False
    try:
        tree = ast.parse(text, mode="eval")
        used: list[int] = []
        value = _eval_expression(tree, used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return False
    if Counter(used) - Counter(int(n) for n in numbers):  # a number not given, or used too often
        return False
    return value == target


def check_answer(problem: Problem, completion: str) -> bool:
    """Whether ``completion`` ends with a correct answer to ``problem``.

    The answer is the text after the last ``Answer:`` (or ``उत्तर:``) marker, to the end of its line (see
    :func:`extract_answer`). Arithmetic: after the last ``=`` if there is one, the text must contain exactly one
    number (``1,234`` and ``42.0`` are read as numbers; words such as units are ignored) equal to
    ``problem.answer``. Countdown: the text before the first ``=`` must be an expression accepted by
    :func:`check_countdown_expression` for ``problem.numbers`` and ``problem.answer``.

    Raises:
      TypeError: ``problem`` is not a :class:`Problem` or ``completion`` is not a ``str``.
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"problem: expected a Problem, got {type(problem).__name__}")
    text = extract_answer(completion)
    if not text:
        return False
    if problem.family == "arithmetic":
        return _check_arithmetic(problem.answer, text)
    return check_countdown_expression(problem.numbers, problem.answer, text.split("=", 1)[0])


# ------------------------------------------------------------------------------------------------- few-shot
def few_shot_prompt(problem: Problem, shots: Sequence[Problem]) -> str:
    """A plain-text few-shot prompt for a base (non-chat) model.

    Blocks ``"Problem: <question>\\n<solution>"`` (Hindi ``प्रश्न:``) for every shot, separated by a blank line,
    then ``"Problem: <question>\\n"`` for ``problem``. The model continues with its steps and answer line; stop
    generation at :data:`FEW_SHOT_STOP` (solutions contain no blank line) and score with :func:`check_answer`.

    Raises:
      ValueError: a shot has the signature of ``problem`` (it would give the answer away).
      TypeError: ``problem`` or a shot is not a :class:`Problem`.
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"problem: expected a Problem, got {type(problem).__name__}")
    blocks = []
    for i, s in enumerate(shots):
        if not isinstance(s, Problem):
            raise TypeError(f"shots[{i}]: expected a Problem, got {type(s).__name__}")
        if s.signature == problem.signature:
            raise ValueError(f"shots[{i}]: has the same signature as the problem ({s.signature})")
        blocks.append(f"{_QUESTION_WORD[s.lang]}: {s.question}\n{s.solution}")
    blocks.append(f"{_QUESTION_WORD[problem.lang]}: {problem.question}\n")
    return FEW_SHOT_STOP.join(blocks)
