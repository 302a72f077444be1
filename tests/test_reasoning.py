"""Generated reasoning problems (mani_jax.data.reasoning): worked solutions are right, the checker accepts them and
rejects wrong or malformed answers, the held-out split is disjoint and fixed, generation is deterministic."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from mani_jax.data.reasoning import (
    FAMILIES,
    FEW_SHOT_STOP,
    LANGS,
    Problem,
    check_answer,
    check_countdown_expression,
    extract_answer,
    few_shot_prompt,
    generate_problems,
    heldout_problems,
    is_heldout,
    to_ascii_digits,
)

_STEP = re.compile(r"^(?:Step|चरण) (\d+): (\d+) ([-+*/]) (\d+) = (\d+)$")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_DEV = re.compile("[०-९]")


def _sample():
    out = []
    for fam in FAMILIES:
        for lang in LANGS:
            out += generate_problems(120, family=fam, lang=lang, seed=7, steps=(1, 2, 3, 4, 6), digits=(1, 2, 3))
    return out


@pytest.fixture(scope="module")
def problems():
    return _sample()


def _steps(p: Problem) -> list[tuple[int, str, int, int]]:
    lines = to_ascii_digits(p.solution).split("\n")
    out = []
    for k, line in enumerate(lines[:-1], start=1):
        m = _STEP.match(line)
        assert m, line
        assert int(m.group(1)) == k
        out.append((int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(5))))
    return out


def test_worked_solutions_are_correct(problems):
    for p in problems:
        steps = _steps(p)
        for a, op, b, r in steps:  # every step is true arithmetic with positive integers
            if op == "/":
                assert b != 0 and a % b == 0 and a // b == r, p.solution
            else:
                assert _OPS[op](a, b) == r, p.solution
            assert r >= 1
        last = to_ascii_digits(p.solution.split("\n")[-1])
        if p.family == "arithmetic":
            # one chain from the start value through the operands to the answer
            assert steps[0][0] == p.numbers[0] and [s[2] for s in steps] == list(p.numbers[1:])
            assert all(steps[k][0] == steps[k - 1][3] for k in range(1, len(steps)))
            assert steps[-1][3] == p.answer and last.split(": ")[1] == str(p.answer)
        else:
            # the listed operations consume each given number once (intermediates are reused once) ...
            pool = Counter(p.numbers)
            for a, _, b, r in steps:
                for x in (a, b):
                    assert pool[x] > 0, (p.numbers, steps)
                    pool[x] -= 1
                pool[r] += 1
            assert +pool == Counter([p.answer])
            # ... and the final expression is independently valid
            assert check_countdown_expression(p.numbers, p.answer, last.split(": ", 1)[1])
        # the question states the numbers
        q = to_ascii_digits(p.question)
        assert all(str(n) in q for n in p.numbers)


def test_checker_accepts_every_generated_solution(problems):
    held = [p for fam in FAMILIES for lang in LANGS for p in heldout_problems(10, family=fam, lang=lang)]
    for p in problems + held:
        assert check_answer(p, p.solution), p
        # also as a model might print it: after some chatter, with a markdown answer line
        word, value = p.solution.split("\n")[-1].split(": ", 1)
        assert check_answer(p, "Let me think.\n" + _replace_last_line(p.solution, f"**{word}:** {value}"))


def _replace_last_line(solution: str, new: str) -> str:
    return "\n".join(solution.split("\n")[:-1] + [new])


def test_checker_rejects_perturbed_answers(problems):
    rng = np.random.default_rng(0)
    for p in problems:
        word = p.solution.split("\n")[-1].split(":")[0]
        if p.family == "arithmetic":
            for delta in (1, -1, int(rng.integers(2, 50))):
                assert not check_answer(p, _replace_last_line(p.solution, f"{word}: {p.answer + delta}"))
        else:
            given = Counter(p.numbers)
            missing = next(n for n in range(1, 1000) if n not in given)
            expr = p.solution.split("\n")[-1].split(": ", 1)[1]
            bad = [
                f"{expr} + {missing}",  # a number that is not given
                f"{to_ascii_digits(expr)} * 1" if 1 not in given else f"{expr} + {missing}",
                f"({expr}) + 1 - 1" if 1 not in given else f"{expr} - {missing}",
                f"{p.answer}",  # the target itself is never a given number
                f"({expr}) + {p.numbers[0]} - {p.numbers[0]}",  # right value, first number used 3 times
            ]
            for b in bad:
                assert not check_answer(p, _replace_last_line(p.solution, f"{word}: {b}")), (p.numbers, b)


def test_countdown_checker_rules():
    nums = (3, 7, 25)
    assert check_countdown_expression(nums, 46, "25 + 7 * 3")
    assert check_countdown_expression(nums, 46, "3 * 7 + 25")  # any valid expression, not only ours
    assert check_countdown_expression(nums, 46, "(3×7)+25") and check_countdown_expression(nums, 46, "३ x ७ + २५")
    assert check_countdown_expression(nums, 28, "25 + 3")  # unused numbers are allowed
    assert not check_countdown_expression(nums, 46, "25 + 7 * 3 + 0")  # 0 is not given
    assert not check_countdown_expression(nums, 49, "25 + 7 * 3 + 3")  # 3 used twice
    assert check_countdown_expression((3, 3, 7, 25), 49, "25 + 7 * 3 + 3")  # ... unless given twice
    assert not check_countdown_expression(nums, 47, "25 + 7 * 3")  # wrong value
    assert check_countdown_expression((7, 2, 2), 7, "7 / 2 * 2")  # exact rational arithmetic
    assert not check_countdown_expression((7, 2), 3, "7 / 2")  # 3.5 is not 3 (no floor division)
    for bad in ("-3 + 25", "25 ** 2", "25 // 7", "2.5 * 2", "0x19", "1_0", "abs(-3)", "__import__('os')", "",
                "3 +", "25 / (7 - 7)", "(3", "3 7"):
        assert not check_countdown_expression((3, 7, 25, 7, 10, 2, 5), 22, bad), bad
    assert not check_countdown_expression(nums, 46, "1 + " * 100 + "1")  # too long


@pytest.mark.parametrize("text,ok", [
    ("Answer: 42", True), ("answer:42", True), ("**Answer:** 42", True), ("**Answer: 42**", True),
    ("Answer: 42.", True), ("Answer: 42 apples", True), ("The final answer: $42$", True), ("Answer: 42.0", True),
    ("Answer: 20 + 22 = 42", True), ("उत्तर: ४२।", True), ("उत्तर: 42", True), ("Answer: 43\nAnswer: 42", True),
    ("Step 1: 40 + 2 = 42", False), ("Answer: 42\nAnswer: 43", False), ("Answer: forty-two", False),
    ("Answer: 42 or 43", False), ("Answer: 42.5", False), ("Answer:", False), ("Answer: -42", False),
    ("Answer: 4 2", False), ("", False), ("Answers: 42", False),
])
def test_arithmetic_answer_extraction(text, ok):
    p = generate_problems(1, seed=0)[0]
    p = Problem(**{**p.__dict__, "answer": 42})
    assert check_answer(p, text) is ok
    assert (extract_answer(text) is None) == (text in ("Step 1: 40 + 2 = 42", "", "Answers: 42"))


def test_thousands_separators_and_types():
    p = Problem(**{**generate_problems(1, seed=0)[0].__dict__, "answer": 1234})
    assert check_answer(p, "Answer: 1,234") and check_answer(p, "Answer: 1234")
    assert not check_answer(p, "Answer: 1,23")
    with pytest.raises(TypeError, match="completion"):
        check_answer(p, None)
    with pytest.raises(TypeError, match="problem"):
        check_answer("x", "Answer: 1")


def test_splits_are_disjoint_and_heldout_is_fixed():
    held = {fam: {lang: heldout_problems(30, family=fam, lang=lang) for lang in LANGS} for fam in FAMILIES}
    held_sigs = {p.signature for fam in held for lang in held[fam] for p in held[fam][lang]}
    for fam in FAMILIES:
        for lang in LANGS:
            hs = [p.signature for p in held[fam][lang]]
            assert len(hs) == len(set(hs)) == 30 * 4 and all(is_heldout(s) for s in hs)
            assert Counter(p.steps for p in held[fam][lang]) == {1: 30, 2: 30, 3: 30, 4: 30}
            for seed in (0, 1):
                train = generate_problems(1500, family=fam, lang=lang, seed=seed)
                assert not any(is_heldout(p.signature) for p in train)
                assert not {p.signature for p in train} & held_sigs
    # the held-out set of a step count depends on nothing else, and a larger set extends a smaller one
    a = heldout_problems(8, steps=(2,))
    b = [p for p in heldout_problems(12, steps=(3, 1, 2)) if p.steps == 2]
    assert a == b[:8]
    # the split is about the mathematics: an English and a Hindi problem with one signature share its side
    assert is_heldout("arithmetic|12+5") == is_heldout("arithmetic|12+5")
    share = np.mean([is_heldout(f"x{i}") for i in range(20000)])
    assert 0.09 < share < 0.11


def test_deterministic():
    for fam in FAMILIES:
        a = generate_problems(50, family=fam, lang="hi", seed=11)
        assert a == generate_problems(50, family=fam, lang="hi", seed=11)
        assert a != generate_problems(50, family=fam, lang="hi", seed=12)
        assert heldout_problems(5, family=fam) == heldout_problems(5, family=fam)
    # a prefix of a longer run is the shorter run
    assert generate_problems(20, seed=4) == generate_problems(40, seed=4)[:20]


def test_difficulty_labels(problems):
    by = {}
    for p in problems:
        assert p.difficulty == p.steps == len(_steps(p))  # the label counts the worked steps
        by.setdefault((p.family, p.difficulty), []).append(len(p.solution))
    for fam in FAMILIES:
        levels = sorted(d for f, d in by if f == fam)
        assert levels == [1, 2, 3, 4, 6]
        means = [np.mean(by[(fam, d)]) for d in levels]
        assert all(x < y for x, y in zip(means, means[1:])), means  # longer reasoning at higher difficulty
    # operand size: the largest operand grows with digits
    for d in (1, 2, 3):
        ps = generate_problems(60, seed=2, steps=2, digits=d)
        assert max(max(p.numbers) for p in ps) < 10 ** d
        assert max(max(p.numbers) for p in ps) >= 10 ** (d - 1)


def test_hindi_split():
    dev = generate_problems(40, lang="hi", seed=1, numerals="devanagari")
    asc = generate_problems(40, lang="hi", seed=1, numerals="ascii")
    mix = generate_problems(40, lang="hi", seed=1)
    for p in dev:
        assert not re.search("[0-9]", p.question + p.solution) and _DEV.search(p.solution)
        assert "उत्तर" in p.solution and re.search("[ऀ-ॿ]{3}", p.question)
    for p in asc:
        assert not _DEV.search(p.question + p.solution) and re.search("[ऀ-ॿ]{3}", p.question)
    assert {p.numerals for p in mix} == {"ascii", "devanagari"}
    for p in dev + mix:
        assert check_answer(p, p.solution)
        assert check_answer(p, f"Answer: {p.answer}") == (p.family == "arithmetic")


def test_messages_and_few_shot():
    p, *shots = generate_problems(4, seed=5)
    assert p.messages() == [{"role": "user", "content": p.question}, {"role": "assistant", "content": p.solution}]
    assert p.messages(system="S", with_solution=False) == [{"role": "system", "content": "S"},
                                                           {"role": "user", "content": p.question}]
    prompt = few_shot_prompt(p, shots)
    blocks = prompt.split(FEW_SHOT_STOP)
    assert len(blocks) == 4 and blocks[-1] == f"Problem: {p.question}\n"
    assert blocks[0] == f"Problem: {shots[0].question}\n{shots[0].solution}"
    assert all(FEW_SHOT_STOP not in s.solution for s in shots)
    # a base model that continues the pattern is scored by the checker
    assert check_answer(p, (prompt + p.solution).split(FEW_SHOT_STOP)[-1])
    with pytest.raises(ValueError, match="same signature"):
        few_shot_prompt(p, [shots[0], p])
    hi = generate_problems(1, lang="hi", seed=5)[0]
    assert few_shot_prompt(hi, []).startswith("प्रश्न: ")


def test_bad_arguments():
    with pytest.raises(ValueError, match="family"):
        generate_problems(1, family="algebra")
    with pytest.raises(ValueError, match="lang"):
        generate_problems(1, lang="fr")
    with pytest.raises(ValueError, match="steps"):
        generate_problems(1, steps=(0, 1))
    with pytest.raises(ValueError, match="digits"):
        generate_problems(1, digits=4)
    with pytest.raises(ValueError, match="numerals"):
        generate_problems(1, numerals="devanagari")
    with pytest.raises(ValueError, match="n:"):
        generate_problems(-1)
    with pytest.raises(ValueError, match="seed"):
        generate_problems(1, seed=-3)
    with pytest.raises(ValueError, match="n_per_difficulty"):
        heldout_problems(0)
    with pytest.raises(ValueError, match="only .* distinct held-out"):
        heldout_problems(200, steps=1, digits=1)  # the 1-step, 1-digit space is small
