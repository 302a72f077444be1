"""Calculator plugin: spoken Hindi/English arithmetic evaluated safely over Python's ``ast``.

"बारह गुणा सात" -> ``12 * 7`` -> 84. Spoken operators: जोड़/जमा/प्लस/और (+), घटा/माइनस/कम (-),
गुणा/गुणे/x/× (*), भाग/बटा/÷ (/), "X का वर्ग" (X**2), "X का घन" (X**3), "X का वर्गमूल" / "वर्गमूल X"
(X**0.5), "X की घात Y" (X**Y), "X का Y प्रतिशत" (X*Y/100); number words are normalised by
:func:`mani_jax.voice.numbers.normalize_numbers`.

Safety: the text is turned into a small arithmetic string and parsed with ``ast.parse(mode="eval")``; only
number constants, ``+ - * / // % **`` and unary ``+ -`` are evaluated by our own tree walk (never ``eval`` or
``exec``). Names, calls, attributes, subscripts, lambdas, strings, inputs longer than
:data:`MAX_INPUT_CHARS`, exponents above :data:`MAX_EXPONENT` and results or intermediates beyond
:data:`MAX_MAGNITUDE` are rejected with ``ValueError`` (the plugin turns that into a polite Hindi reply).
"""
from __future__ import annotations

import ast
import math
import operator
import re

from mani_jax.voice.nlu import Intent
from mani_jax.voice.numbers import normalize_numbers
from mani_jax.voice.plugins import Plugin, Response

__all__ = ["CalculatorPlugin", "to_arithmetic", "safe_eval", "MAX_INPUT_CHARS", "MAX_EXPONENT", "MAX_MAGNITUDE"]

MAX_INPUT_CHARS = 200
MAX_EXPONENT = 1000
MAX_MAGNITUDE = 1e15

_PHRASES: tuple[tuple[str, str], ...] = (
    (r"\bdivided by\b", " / "), (r"\bmultiplied by\b", " * "), (r"\bto the power of\b", " ** "),
    (r"\bsquare root of\s+(\d+(?:\.\d+)?)", r" ( \1 ** 0.5 ) "), (r"\bsquared\b", " ** 2 "),
    (r"(?:का|की|के) वर्गमूल", " ** 0.5 "), (r"वर्गमूल\s+(\d+(?:\.\d+)?)", r" ( \1 ** 0.5 ) "),
    (r"(?:का|की|के) वर्ग", " ** 2 "), (r"(?:का|की|के) घन", " ** 3 "),
    (r"(?:की|के) (?:घात|पावर)", " ** "), (r"में से", " IN_FROM "),
)
_WORDS: dict[str, str] = {
    "जोड़": "+", "जोड़ो": "+", "जोड़ें": "+", "जमा": "+", "प्लस": "+", "और": "+", "plus": "+", "add": "+",
    "घटा": "-", "घटाओ": "-", "माइनस": "-", "कम": "-", "minus": "-", "less": "-",
    "गुणा": "*", "गुणे": "*", "गुना": "*", "x": "*", "×": "*", "times": "*", "into": "*", "multiply": "*",
    "भाग": "/", "बटा": "/", "डिवाइड": "/", "÷": "/", "over": "/", "by": "/",
    "प्रतिशत": "/ 100", "परसेंट": "/ 100", "फीसदी": "/ 100", "percent": "/ 100", "%": "/ 100",
    "का": "*", "की": "*", "के": "*", "of": "*", "मॉड": "%", "शेषफल": "%", "mod": "%", "^": "**",
}
_TOKEN_RE = re.compile(r"\d+(?:\.\d+)?|\*\*|//|[-+*/()^×÷%]|[^\s\d()+*/^×÷%-]+")
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def to_arithmetic(text: str) -> str:
    """Turn spoken arithmetic into an arithmetic string such as ``"12 * 7"``.

    Raises:
        ValueError: if ``text`` is empty, longer than :data:`MAX_INPUT_CHARS`, has a word that is neither
            a number nor an operator, or contains no number.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    if len(text) > MAX_INPUT_CHARS:
        raise ValueError(f"text is longer than {MAX_INPUT_CHARS} characters")
    s = normalize_numbers(text.strip().lower())
    for pattern, repl in _PHRASES:
        s = re.sub(pattern, repl, s)
    out: list[str] = []
    for token in _TOKEN_RE.findall(s):
        if re.fullmatch(r"\d+(?:\.\d+)?|\*\*|//|[-+*/()]", token):
            out.append(token)
        elif token == "IN_FROM":
            out.append("IN_FROM")
        elif token in _WORDS:
            out.append(_WORDS[token])
        else:
            raise ValueError(f"unknown word in expression: {token!r}")
    # "दस में से तीन घटाओ" -> "10 - 3": "X IN_FROM Y -" becomes "X - Y".
    if "IN_FROM" in out:
        i = out.index("IN_FROM")
        tail = [t for t in out[i + 1:] if t != "-"]
        out = out[:i] + ["-"] + tail
    while out and out[-1] in ("+", "-", "*", "/"):  # trailing verb such as "जोड़ो"
        out.pop()
    if not any(re.fullmatch(r"\d+(?:\.\d+)?", t) for t in out):
        raise ValueError("expression has no number")
    if not any(t in ("+", "-", "*", "/", "//", "%", "**", "/ 100") for t in out):
        raise ValueError("expression has no operator")
    return " ".join(out)


def _check(value: float) -> float:
    if isinstance(value, complex) or not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise ValueError("result is too large")
    return value


def _walk(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _walk(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _check(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _walk(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT:
                raise ValueError("exponent is too large")
            if left == 0 and right < 0:
                raise ZeroDivisionError("0 to a negative power")
            if abs(left) > 1 and right * math.log10(abs(left)) > math.log10(MAX_MAGNITUDE):
                raise ValueError("result is too large")
        return _check(_BINOPS[type(node.op)](left, right))
    raise ValueError(f"{type(node).__name__} is not allowed in an expression")


def safe_eval(expression: str) -> int | float:
    """Evaluate an arithmetic string with numbers, ``+ - * / // % **`` and parentheses only.

    Raises:
        ValueError: for anything else (names, calls, attributes, strings ...), too-long input, exponents
            above :data:`MAX_EXPONENT`, or magnitudes above :data:`MAX_MAGNITUDE`.
        ZeroDivisionError: on division (or modulo) by zero.
    """
    if not isinstance(expression, str):
        raise ValueError(f"expression must be a str, got {type(expression).__name__}")
    if len(expression) > MAX_INPUT_CHARS:
        raise ValueError(f"expression is longer than {MAX_INPUT_CHARS} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {exc.msg}") from None
    value = _walk(tree)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return round(value, 10) if isinstance(value, float) else value


def format_number(value: int | float) -> str:
    """Digits for speech: integers plain, others with up to 4 decimals ("3.1416"), no grouping."""
    if isinstance(value, float):
        text = f"{value:.4f}".rstrip("0").rstrip(".")
        return text if text not in ("-0", "") else "0"
    return str(value)


class CalculatorPlugin(Plugin):
    """Answers ``VaaniCalculate`` (slot ``expression``: the spoken arithmetic)."""

    name = "calculator"
    intents = ("VaaniCalculate",)

    def handle(self, intent: Intent) -> Response:
        text = str(intent.slots.get("expression") or intent.text)
        try:
            expression = to_arithmetic(text)
            value = safe_eval(expression)
        except ZeroDivisionError:
            return self.reply("शून्य से भाग नहीं दिया जा सकता।", ok=False, error="division_by_zero")
        except ValueError as exc:
            too_big = "large" in str(exc) or "longer" in str(exc)
            msg = ("माफ़ कीजिए, यह संख्या बहुत बड़ी है, मैं इसका हिसाब नहीं लगा सकती।" if too_big else
                   "माफ़ कीजिए, मैं यह हिसाब नहीं समझ पाई। संख्याएँ और जोड़, घटा, गुणा या भाग बोलिए।")
            return self.reply(msg, ok=False, error="invalid_expression")
        return self.reply(f"जवाब है {format_number(value)}।", value=value, expression=expression)
