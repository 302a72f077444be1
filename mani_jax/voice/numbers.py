"""Hindi (and English) number words <-> digits for VAANI.

Spoken Hindi numbers are irregular for every value from 11 to 99 (पैंतीस = 35, अट्ठानवे = 98), so this
module carries the full 0-100 table (standard Hindi forms as in common grammars and the CLDR ``hi`` spell-out
rules) together with the spelling variants ASR systems emit: chandrabindu/anusvara (पाँच/पांच), nukta or
none (ड़/ड, ढ़/ढ, ज़/ज), ब/व (अट्ठानबे/अट्ठानवे), and common colloquial forms (छः, छे, चवालीस).

Composition follows the Indian system: सौ (100), हज़ार (1,000), लाख (100,000), करोड़ (10,000,000);
fractions डेढ़ (1.5), ढाई (2.5), आधा (0.5) and the prefixes साढ़े (+0.5), सवा (+0.25), पौने (-0.25) apply to
the number they precede ("साढ़े तीन सौ" = 350, "पौने दो" = 1.75, "सवा सौ" = 125). Devanagari digits
(०-९) and ASCII digits are accepted anywhere; English number words (``twenty five``, ``two hundred``,
``three point five``) are supported as well.

Public functions: :func:`words_to_number`, :func:`normalize_numbers`, :func:`number_to_hindi_words`.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Iterable

__all__ = ["words_to_number", "normalize_numbers", "number_to_hindi_words", "HINDI_NUMBERS"]

# Canonical spoken form for 0..100 (index = value).
HINDI_NUMBERS: tuple[str, ...] = (
    "शून्य", "एक", "दो", "तीन", "चार", "पाँच", "छह", "सात", "आठ", "नौ",
    "दस", "ग्यारह", "बारह", "तेरह", "चौदह", "पंद्रह", "सोलह", "सत्रह", "अठारह", "उन्नीस",
    "बीस", "इक्कीस", "बाईस", "तेईस", "चौबीस", "पच्चीस", "छब्बीस", "सत्ताईस", "अट्ठाईस", "उनतीस",
    "तीस", "इकतीस", "बत्तीस", "तैंतीस", "चौंतीस", "पैंतीस", "छत्तीस", "सैंतीस", "अड़तीस", "उनतालीस",
    "चालीस", "इकतालीस", "बयालीस", "तैंतालीस", "चौवालीस", "पैंतालीस", "छियालीस", "सैंतालीस", "अड़तालीस", "उनचास",
    "पचास", "इक्यावन", "बावन", "तिरेपन", "चौवन", "पचपन", "छप्पन", "सत्तावन", "अट्ठावन", "उनसठ",
    "साठ", "इकसठ", "बासठ", "तिरेसठ", "चौंसठ", "पैंसठ", "छियासठ", "सड़सठ", "अड़सठ", "उनहत्तर",
    "सत्तर", "इकहत्तर", "बहत्तर", "तिहत्तर", "चौहत्तर", "पचहत्तर", "छिहत्तर", "सतहत्तर", "अठहत्तर", "उन्यासी",
    "अस्सी", "इक्यासी", "बयासी", "तिरासी", "चौरासी", "पचासी", "छियासी", "सत्तासी", "अट्ठासी", "नवासी",
    "नब्बे", "इक्यानबे", "बानबे", "तिरानबे", "चौरानबे", "पचानबे", "छियानबे", "सत्तानबे", "अट्ठानबे", "निन्यानबे",
    "सौ",
)

# Extra spellings seen in text and ASR output (lookup also ignores nukta and chandrabindu/anusvara).
_VARIANTS: dict[str, int] = {
    "छः": 6, "छे": 6, "छ": 6, "पन्द्रह": 15, "सत्तरह": 17, "अट्ठारह": 18, "उन्नीस": 19,
    "इकत्तीस": 31, "तेंतीस": 33, "तेतीस": 33, "उन्तालीस": 39, "बियालीस": 42, "तेतालीस": 43, "चवालीस": 44,
    "चौंवालीस": 44, "छयालीस": 46, "उनन्चास": 49, "इकावन": 51, "इक्कावन": 51, "तिरपन": 53, "त्रेपन": 53,
    "चव्वन": 54, "चौव्वन": 54, "सतावन": 57, "अठावन": 58, "अट्ठावन": 58, "तिरसठ": 63, "त्रेसठ": 63,
    "सरसठ": 67, "सड़सठ": 67, "इकहतर": 71, "बहात्तर": 72, "बहतर": 72, "तिहतर": 73, "चौहतर": 74,
    "पचहतर": 75, "छियत्तर": 76, "सतत्तर": 77, "अठत्तर": 78, "उनासी": 79, "उनयासी": 79, "बियासी": 82,
    "नव्वासी": 89, "नवासी": 89, "नब्बे": 90, "सैकड़ा": 100, "एक सौ": 100,
}
# 91..99 are said with both -नबे and -नवे endings.
for _n in range(91, 100):
    _VARIANTS[HINDI_NUMBERS[_n][:-2] + "वे"] = _n

_MULTIPLIERS: dict[str, int] = {
    "सौ": 100, "सैकड़ा": 100, "हज़ार": 1000, "हजार": 1000, "लाख": 100_000, "करोड़": 10_000_000,
    "hundred": 100, "thousand": 1000, "lakh": 100_000, "lac": 100_000, "lakhs": 100_000,
    "crore": 10_000_000, "crores": 10_000_000, "million": 1_000_000, "billion": 1_000_000_000,
}
_FRACTIONS: dict[str, float] = {"डेढ़": 1.5, "डेढ": 1.5, "ढाई": 2.5, "अढ़ाई": 2.5, "आधा": 0.5, "आधे": 0.5,
                                "half": 0.5}
_PREFIX_OFFSETS: dict[str, float] = {"साढ़े": 0.5, "सवा": 0.25, "पौने": -0.25}
_DECIMAL_POINT = {"दशमलव", "point", "पॉइंट", "प्वाइंट"}

_ENGLISH_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                  "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                  "nineteen"]
_ENGLISH_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
                 "eighty": 80, "ninety": 90}

_DEVANAGARI_DIGITS = str.maketrans("०१२३४५६७८९", "0123456789")
_DIGITS_RE = re.compile(r"^[+-]?\d+(?:\.\d+)?$")


def _key(word: str) -> str:
    """Lookup key for a word: NFC, lower-case, nukta / chandrabindu / anusvara / visarga folded away."""
    word = unicodedata.normalize("NFD", word.strip().lower())
    word = word.replace("\u093c", "")  # nukta
    word = word.replace("\u0901", "").replace("\u0902", "")  # chandrabindu, anusvara
    return unicodedata.normalize("NFC", word)


def _build_units() -> dict[str, int]:
    table: dict[str, int] = {}
    for value, word in enumerate(HINDI_NUMBERS[:100]):
        table[_key(word)] = value
    for word, value in _VARIANTS.items():
        if value < 100:
            table.setdefault(_key(word), value)
    for value, word in enumerate(_ENGLISH_UNITS):
        table[word] = value
    table.update(_ENGLISH_TENS)
    return table


_UNITS = _build_units()
_MULT = {_key(w): v for w, v in _MULTIPLIERS.items()}
_FRAC = {_key(w): v for w, v in _FRACTIONS.items()}
_PREFIX = {_key(w): v for w, v in _PREFIX_OFFSETS.items()}
_POINT = {_key(w) for w in _DECIMAL_POINT}
_FILLERS = {"and"}  # "two hundred and five"

# "दो" is also the imperative of देना ("लगा दो", "कर दो"): after these verb stems it is not a number.
_VERB_STEMS = {_key(w) for w in (
    "कर", "लगा", "बता", "हटा", "मिटा", "चला", "बजा", "सुना", "दिखा", "बढ़ा", "जगा", "उठा", "बदल", "दे", "ले",
    "रख", "रोक", "बैठा", "समझा", "भेज", "खोल", "जला", "बुझा", "पढ़", "लिख", "सेट", "चालू", "शुरू", "बंद",
    "जोड़", "डाल", "बना", "गिरा", "दिला", "दोहरा", "सुन", "बोल", "छोड़", "कैंसिल", "रद्द", "साफ", "ऑन", "ऑफ",
    "धीमा", "धीमी", "तेज़", "ऊँचा", "ऊँची", "ज्यादा", "ज़्यादा", "हल्का", "उठ", "जाने", "आने", "कम")}
_DO = _key("दो")


def _token_kind(token: str) -> tuple[str, float] | None:
    """Classify one token as ('unit'|'mult'|'frac'|'prefix'|'point'|'digit'|'filler', value) or None."""
    t = token.translate(_DEVANAGARI_DIGITS).replace(",", "")
    if _DIGITS_RE.match(t):
        return ("digit", float(t) if "." in t else int(t))
    k = _key(token)
    if k in _UNITS:
        return ("unit", _UNITS[k])
    if k in _MULT:
        return ("mult", _MULT[k])
    if k in _FRAC:
        return ("frac", _FRAC[k])
    if k in _PREFIX:
        return ("prefix", _PREFIX[k])
    if k in _POINT:
        return ("point", 0)
    if k in _FILLERS:
        return ("filler", 0)
    return None


def _tokens(text: str) -> list[str]:
    # English "twenty-five" -> "twenty five"; keep Devanagari marks intact.
    return re.sub(r"(?<=[a-z])-(?=[a-z])", " ", text.lower()).split()


def _clean(value: float) -> int | float:
    return int(value) if float(value).is_integer() else round(value, 6)


class _Parser:
    """Greedy parser of one number from a token list; returns (value, tokens consumed)."""

    def __init__(self, kinds: list[tuple[str, float] | None], tokens: list[str]):
        self.kinds = kinds
        self.tokens = tokens

    def parse(self, start: int) -> tuple[int | float, int] | None:
        kinds = self.kinds
        total = 0.0          # completed groups (>= 1000)
        current = 0.0        # group under construction (< 1000 before its multiplier)
        have_value = False   # something numeric is pending in `current`
        last = None          # kind of the last accepted token
        pending_offset = None  # साढ़े/सवा/पौने waiting for its number
        last_mult = None
        i = start
        while i < len(kinds):
            kind = kinds[i]
            if kind is None:
                break
            k, v = kind
            if k == "prefix":
                if last not in (None, "mult") or pending_offset is not None:
                    break
                pending_offset = v
            elif k in ("unit", "digit", "frac"):
                if last in ("unit", "digit", "frac"):
                    # English "twenty five": tens followed by a unit.
                    if not (last == "unit" and k == "unit" and current % 10 == 0 and 20 <= current <= 90
                            and v < 10 and self.tokens[i - 1].isascii()):
                        break
                if last == "prefix" and k == "frac":
                    break
                if last == "mult" and last_mult is not None and v >= last_mult and k != "digit":
                    break
                current += v
                if pending_offset is not None:
                    current += pending_offset
                    pending_offset = None
                have_value = True
            elif k == "mult":
                if last == "prefix":  # "सवा सौ", "पौने सौ": the prefix applies to one unit of the multiplier
                    current = 1 + pending_offset
                    pending_offset = None
                    have_value = True
                if not have_value and last is None:
                    current = 1.0  # a bare "सौ" / "hundred" / "हज़ार"
                    have_value = True
                if last == "mult" and v >= (last_mult or 0):
                    # "दो सौ हज़ार": multiply the whole so far.
                    current = (total + current) * v
                    total = 0.0
                elif v >= 1000:
                    total += (current if have_value else 1) * v
                    current = 0.0
                    have_value = False
                else:
                    current = (current if have_value else 1) * v
                    have_value = True
                last_mult = v
            elif k == "point":
                if last not in ("unit", "digit") or i + 1 >= len(kinds) or kinds[i + 1] is None:
                    break
                digits = []
                j = i + 1
                while j < len(kinds) and kinds[j] is not None and kinds[j][0] in ("unit", "digit") \
                        and kinds[j][1] < 10 and float(kinds[j][1]).is_integer():
                    digits.append(str(int(kinds[j][1])))
                    j += 1
                if not digits:
                    break
                value = total + current + float("0." + "".join(digits))
                return _clean(value), j - start
            elif k == "filler":
                if last != "mult" or i + 1 >= len(kinds) or kinds[i + 1] is None \
                        or kinds[i + 1][0] not in ("unit", "digit"):
                    break
                i += 1
                continue
            last = k
            i += 1
        if pending_offset is not None:
            i -= 1  # a trailing साढ़े with nothing after it is not part of the number
        consumed = i - start
        if consumed <= 0:
            return None
        return _clean(total + current), consumed


def words_to_number(text: str) -> int | float | None:
    """Parse ``text`` that is entirely one number into an ``int`` (or ``float`` for fractions).

    Accepts Hindi words ("तीन सौ पैंतालीस" -> 345, "डेढ़ हज़ार" -> 1500, "साढ़े तीन" -> 3.5), English
    words ("twenty five" -> 25), ASCII or Devanagari digits ("१२" -> 12) and mixtures ("2 हज़ार").
    Returns ``None`` when ``text`` is empty or is not exactly one number.

    Raises:
        TypeError: if ``text`` is not a ``str``.
    """
    if not isinstance(text, str):
        raise TypeError(f"words_to_number(text): expected str, got {type(text).__name__}")
    tokens = _tokens(text)
    if not tokens:
        return None
    kinds = [_token_kind(t) for t in tokens]
    if any(k is None for k in kinds):
        return None
    parsed = _Parser(kinds, tokens).parse(0)
    if parsed is None or parsed[1] != len(tokens):
        return None
    return parsed[0]


def _format(value: int | float) -> str:
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".")
    return str(value)


def normalize_numbers(text: str) -> str:
    """Replace every number-word span and Devanagari digit run in ``text`` with ASCII digits.

    Example: ``"पाँच मिनट का टाइमर"`` -> ``"5 मिनट का टाइमर"``, ``"साढ़े तीन सौ रुपये"`` -> ``"350 रुपये"``.
    Tokens are whitespace-separated; other words are kept verbatim (lower-cased only for English text).
    Adjacent separate numbers ("पाँच छह") stay separate ("5 6").

    Raises:
        TypeError: if ``text`` is not a ``str``.
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_numbers(text): expected str, got {type(text).__name__}")
    raw = re.sub(r"(?<=[A-Za-z])-(?=[A-Za-z])", " ", text).split()
    kinds = [_token_kind(t) for t in raw]
    out: list[str] = []
    parser = _Parser(kinds, raw)
    i = 0
    while i < len(raw):
        kind = kinds[i]
        if _key(raw[i]) == _DO and i > 0 and _is_verb_do(raw, kinds, i):
            out.append(raw[i])
            i += 1
            continue
        if kind is not None and kind[0] not in ("point", "filler"):
            parsed = parser.parse(i)
            if parsed is not None and parsed[1] > 0:
                value, consumed = parsed
                if consumed == 1 and kind[0] == "prefix":
                    out.append(raw[i])
                    i += 1
                    continue
                out.append(_format(value))
                i += consumed
                continue
        out.append(raw[i])
        i += 1
    return " ".join(out)


def _is_verb_do(raw: list[str], kinds: list, i: int) -> bool:
    """True when the token "दो" at ``i`` is the verb ("कर दो"), not the number two."""
    prev = _key(raw[i - 1])
    if prev in _VERB_STEMS:
        return True
    # "आवाज़ घटा दो" (verb) vs "दस घटा दो" (10 - 2): a verb when घटा does not follow a number.
    return prev == _key("घटा") and i == len(raw) - 1 and (i < 2 or kinds[i - 2] is None)


def _below_hundred(n: int) -> str:
    return HINDI_NUMBERS[n]


def number_to_hindi_words(n: int | float) -> str:
    """Spell ``n`` in Hindi words with the Indian grouping (लाख, करोड़).

    Integers of any size below 10**14 are supported, negatives get "माइनस", and non-integers are spoken
    with "दशमलव" followed by digit words ("3.25" -> "तीन दशमलव दो पाँच"); 1.5 and 2.5 keep their digit form
    ("एक दशमलव पाँच") so that the output round-trips through :func:`words_to_number`.

    Raises:
        TypeError: if ``n`` is not an int or float (bools are rejected).
        ValueError: if ``n`` is not finite or ``abs(n) >= 10**14``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        raise TypeError(f"number_to_hindi_words(n): expected int or float, got {type(n).__name__}")
    if isinstance(n, float):
        if n != n or n in (float("inf"), float("-inf")):
            raise ValueError(f"number_to_hindi_words(n): n must be finite, got {n}")
        if n.is_integer():
            n = int(n)
    if abs(n) >= 10**14:
        raise ValueError(f"number_to_hindi_words(n): abs(n) must be < 10**14, got {n}")
    if n < 0:
        return "माइनस " + number_to_hindi_words(-n)
    if isinstance(n, float):
        whole, frac = f"{n:.6f}".rstrip("0").split(".")
        return number_to_hindi_words(int(whole)) + " दशमलव " + " ".join(HINDI_NUMBERS[int(d)] for d in frac)
    if n <= 100:
        return HINDI_NUMBERS[n]
    parts: list[str] = []
    for size, word in ((10_000_000, "करोड़"), (100_000, "लाख"), (1000, "हज़ार"), (100, "सौ")):
        if n >= size:
            count, n = divmod(n, size)
            parts.append(f"{number_to_hindi_words(count)} {word}")
    if n:
        parts.append(_below_hundred(n))
    return " ".join(parts)


def iter_hindi_numbers(values: Iterable[int]) -> list[tuple[int, str]]:
    """Return ``[(value, number_to_hindi_words(value)), ...]`` for grammar expansion."""
    return [(v, number_to_hindi_words(v)) for v in values]
