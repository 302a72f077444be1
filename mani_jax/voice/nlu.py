"""Natural-language understanding for VAANI: Hindi/English text -> :class:`Intent`.

Recognition has three layers:

1. **Number normalisation** (:func:`mani_jax.voice.numbers.normalize_numbers`): "पाँच मिनट" -> "5 मिनट",
   "साढ़े सात बजे" -> "7.5 बजे", Devanagari digits -> ASCII.
2. **Template matching with hassil** (https://github.com/home-assistant/hassil, ``hassil.recognize_all``)
   over Home Assistant's Hindi intents (``home_assistant_intents.get_intents("hi")``, the ``hi.json`` of
   https://github.com/home-assistant/intents) merged with VAANI's own templates
   (``mani_jax/voice/templates/vaani_hi.yaml``) for what ``hi.json`` lacks: calculator, unit conversion, notes,
   alarms, local media, system status, English phrasings. Only the HA intents VAANI can serve are kept, and
   HA blocks that need a Home Assistant area/entity ({area}, {name}) are dropped (VAANI is one device).
3. **Fuzzy fallback** (rapidfuzz ``fuzz.ratio``) against the expanded template sentences, for ASR-garbled input;
   the best sentence above :attr:`IntentRecognizer.fuzzy_threshold` is re-parsed by hassil for its slots.

Example::

    rec = IntentRecognizer()
    rec.recognize("पाँच मिनट का टाइमर लगाओ")
    # Intent(name='HassStartTimer', slots={'minutes': 5}, text='पाँच मिनट का टाइमर लगाओ', confidence=1.0,
    #        source='hassil')
"""
from __future__ import annotations

import copy
import itertools
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml
from hassil import Intents
from hassil.intents import TextSlotList, TextSlotValue
from hassil.expression import TextChunk
from hassil.recognize import RecognizeResult, recognize_all
from hassil.sample import sample_intents
from rapidfuzz import fuzz, process

from mani_jax.voice.numbers import normalize_numbers, number_to_hindi_words, words_to_number

__all__ = ["Intent", "IntentRecognizer", "SUPPORTED_HA_INTENTS", "TEMPLATES_PATH"]

TEMPLATES_PATH = Path(__file__).with_name("templates") / "vaani_hi.yaml"

# Home Assistant intents (from hi.json) that a VAANI plugin serves.
SUPPORTED_HA_INTENTS: tuple[str, ...] = (
    "HassGetCurrentTime", "HassGetCurrentDate", "HassStartTimer", "HassCancelTimer", "HassCancelAllTimers",
    "HassTimerStatus", "HassPauseTimer", "HassUnpauseTimer", "HassGetWeather", "HassMediaNext",
    "HassMediaPause", "HassMediaUnpause", "HassNevermind",
)

# Free-text slots whose words are kept as spoken (not number-normalised).
_VERBATIM_SLOTS = frozenset({"note", "query", "expression"})
_PUNCT_RE = re.compile(r"[।॥?!,;:\"“”‘’()\[\]{}]+")


@dataclass
class Intent:
    """A recognised command.

    Attributes:
        name: intent name, HA-style (``HassStartTimer``) or VAANI's own (``VaaniCalculate``).
        slots: slot name -> value (ints/floats for numbers, ``str`` for list values and free text).
        text: the text that was recognised (as given by the caller).
        confidence: 0..1; 1.0 for an exact template match, the fuzzy similarity otherwise.
        source: ``"hassil"`` (template match) or ``"fuzzy"`` (rapidfuzz fallback).
    """

    name: str
    slots: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    confidence: float = 1.0
    source: str = "hassil"

    def to_wyoming(self):
        """Return a ``wyoming.intent.Intent`` (name, ``[Entity(name, value)]``, text) for the event bus."""
        from wyoming.intent import Entity as WyEntity
        from wyoming.intent import Intent as WyIntent

        return WyIntent(name=self.name, entities=[WyEntity(name=k, value=v) for k, v in self.slots.items()],
                        text=self.text)


def _nfc_tree(obj: Any) -> Any:
    """NFC-normalise every string in a JSON/YAML tree (nukta letters become base + U+093C consistently)."""
    if isinstance(obj, str):
        return unicodedata.normalize("NFC", obj)
    if isinstance(obj, list):
        return [_nfc_tree(x) for x in obj]
    if isinstance(obj, dict):
        return {_nfc_tree(k): _nfc_tree(v) for k, v in obj.items()}
    return obj


def _fmt_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _number_list(values: Iterable[float], words: bool = False) -> dict:
    """A hassil text list whose inputs are digits (or Hindi words) and whose outputs are numbers."""
    out = []
    for v in values:
        text = number_to_hindi_words(v) if words else _fmt_number(v)
        out.append({"in": text, "out": int(v) if float(v).is_integer() else v})
    return {"values": out}


def _generated_lists() -> dict[str, dict]:
    fractions = [h + f for h in range(0, 13) for f in (0.25, 0.5, 0.75)]
    clock = [h + f for h in range(0, 24) for f in (0, 0.25, 0.5, 0.75)]
    return {
        "vaani_fraction": _number_list(fractions),
        "vaani_clock_hour": _number_list(clock),
        "vaani_clock_minute": {"range": {"from": 0, "to": 59}},
    }


def _load_ha_hindi() -> dict:
    import home_assistant_intents

    data = copy.deepcopy(home_assistant_intents.get_intents("hi"))
    if not data:
        raise RuntimeError("home_assistant_intents has no Hindi ('hi') intents")
    kept: dict[str, dict] = {}
    for name in SUPPORTED_HA_INTENTS:
        intent = data["intents"].get(name)
        if intent is None:
            continue
        blocks = []
        for block in intent["data"]:
            if any("{area" in s or "{name" in s for s in block["sentences"]):
                continue  # needs Home Assistant areas/entities
            block = {k: v for k, v in block.items() if k not in ("requires_context", "excludes_context")}
            blocks.append(block)
        if blocks:
            kept[name] = {"data": blocks}
    data["intents"] = kept
    data.pop("responses", None)
    return data


def _merge(base: dict, extra: dict) -> dict:
    merged = copy.deepcopy(base)
    for name, intent in extra.get("intents", {}).items():
        merged.setdefault("intents", {}).setdefault(name, {"data": []})["data"].extend(intent["data"])
    merged.setdefault("lists", {}).update(extra.get("lists", {}))
    merged.setdefault("expansion_rules", {}).update(extra.get("expansion_rules", {}))
    return merged


def _result_score(result: RecognizeResult) -> tuple:
    """Same ordering as ``hassil.recognize.recognize_best``: fewer wildcards, more literal text, less
    wildcard text, then intent name."""
    wild = [e for e in result.entities_list if e.is_wildcard]
    return (len(wild), -result.text_chunks_matched, sum(len(e.text or "") for e in wild), result.intent.name)


class IntentRecognizer:
    """Recognise VAANI commands in (ASR) text.

    Args:
        templates_path: YAML file of extra hassil templates (default :data:`TEMPLATES_PATH`).
        fuzzy_threshold: minimum rapidfuzz ratio (0..1) for the fuzzy fallback; below it ``recognize``
            returns ``None``.
        validators: extra ``intent name -> callable(slots) -> bool`` checks (a match failing it is skipped).

    Raises:
        ValueError: if ``fuzzy_threshold`` is outside (0, 1].
        FileNotFoundError: if ``templates_path`` does not exist.
    """

    def __init__(self, templates_path: str | Path | None = None, *, fuzzy_threshold: float = 0.8,
                 validators: dict[str, Callable[[dict], bool]] | None = None):
        if not 0.0 < fuzzy_threshold <= 1.0:
            raise ValueError(f"fuzzy_threshold must be in (0, 1], got {fuzzy_threshold}")
        path = Path(templates_path) if templates_path is not None else TEMPLATES_PATH
        if not path.exists():
            raise FileNotFoundError(f"templates_path does not exist: {path}")
        ours = yaml.safe_load(path.read_text(encoding="utf-8"))
        ours.setdefault("lists", {}).update(_generated_lists())
        self.template_dict: dict = _nfc_tree(_merge(_load_ha_hindi(), ours))
        self.intents: Intents = Intents.from_dict(self.template_dict)
        self.fuzzy_threshold = fuzzy_threshold
        self.validators: dict[str, Callable[[dict], bool]] = dict(_DEFAULT_VALIDATORS)
        self.validators.update(validators or {})
        self._fuzzy_corpus: list[tuple[str, str]] | None = None

    # ----------------------------------------------------------------------------------------------
    @staticmethod
    def _prepare(text: str) -> str:
        text = unicodedata.normalize("NFC", text)
        text = _PUNCT_RE.sub(" ", text)
        return " ".join(text.split()).strip().rstrip(".")

    def _match(self, text: str) -> RecognizeResult | None:
        best, best_score = None, None
        for result in recognize_all(text, self.intents):
            slots = self._slots(result)
            check = self.validators.get(result.intent.name)
            if check is not None and not check(slots):
                continue
            score = _result_score(result)
            if best_score is None or score < best_score:
                best, best_score = result, score
        return best

    @staticmethod
    def _slots(result: RecognizeResult) -> dict[str, Any]:
        slots: dict[str, Any] = {}
        for name, ent in result.entities.items():
            value = ent.value
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if ent.is_wildcard:
                value = ent.text_clean if isinstance(ent.text, str) else str(value)
            elif isinstance(value, str):
                num = words_to_number(value) if re.fullmatch(r"[\d.]+", value) else None
                value = num if num is not None else value
            slots[name] = value
        return slots

    def recognize(self, text: str) -> Intent | None:
        """Recognise ``text``; return an :class:`Intent` or ``None`` when nothing matches well enough.

        Number words are normalised before matching; free-text slots (note text, calculator expression,
        song query) are taken from the un-normalised text when the same intent matches it, so a note
        keeps its words ("एक बात" stays "एक बात").

        Raises:
            TypeError: if ``text`` is not a ``str``.
        """
        if not isinstance(text, str):
            raise TypeError(f"recognize(text): expected str, got {type(text).__name__}")
        clean = self._prepare(text)
        if not clean:
            return None
        normalized = normalize_numbers(clean)
        result = self._match(normalized)
        if result is not None:
            slots = self._slots(result)
            if any(e.is_wildcard for e in result.entities_list) and normalized != clean:
                raw = self._match(clean)
                if raw is not None and raw.intent.name == result.intent.name:
                    for name, ent in raw.entities.items():
                        if ent.is_wildcard and name in _VERBATIM_SLOTS:
                            slots[name] = ent.text_clean
            return Intent(result.intent.name, slots, text, 1.0, "hassil")
        return self._fuzzy(text, normalized)

    # ------------------------------------------------------------------------------- fuzzy fallback
    def _corpus(self) -> list[tuple[str, str]]:
        if self._fuzzy_corpus is None:
            lists = {
                "timer_hours": _text_list(_number_list([1, 5])),
                "timer_minutes": _text_list(_number_list([1, 5, 10])),
                "timer_seconds": _text_list(_number_list([10, 30])),
                "vaani_fraction": _text_list(_number_list([1.5])),
                "vaani_clock_hour": _text_list(_number_list([7, 7.5])),
                "vaani_clock_minute": _text_list(_number_list([15])),
                "volume": _text_list(_number_list([50])),
            }
            seen: dict[str, str] = {}
            for intent_name, sentence in sample_intents(self.intents, slot_lists=lists, expand_ranges=False):
                seen.setdefault(" ".join(sentence.split()), intent_name)
            self._fuzzy_corpus = sorted(seen.items())
        return self._fuzzy_corpus

    def _fuzzy(self, text: str, normalized: str) -> Intent | None:
        if len(normalized) < 6:
            return None
        corpus = self._corpus()
        sentences = [s for s, _ in corpus]
        hit = process.extractOne(normalized, sentences, scorer=fuzz.ratio,
                                 score_cutoff=self.fuzzy_threshold * 100)
        if hit is None:
            return None
        sentence, score, index = hit
        intent_name = corpus[index][1]
        # Carry the user's numbers into the template sentence, then let hassil read the slots.
        user_numbers = re.findall(r"\d+(?:\.\d+)?", normalized)
        template_numbers = re.findall(r"\d+(?:\.\d+)?", sentence)
        candidates = [sentence]
        if user_numbers and len(user_numbers) == len(template_numbers):
            it = iter(user_numbers)
            candidates.insert(0, re.sub(r"\d+(?:\.\d+)?", lambda _m: next(it), sentence))
        for candidate in candidates:
            result = self._match(candidate)
            if result is not None and result.intent.name == intent_name:
                return Intent(intent_name, self._slots(result), text, round(score / 100.0, 4), "fuzzy")
        return Intent(intent_name, {}, text, round(score / 100.0, 4), "fuzzy")

    # ---------------------------------------------------------------------------------- grammar
    def command_sentences(self, limit: int | None = None) -> list[str]:
        """The command grammar expanded to Hindi sentences, numbers spelled in Hindi words.

        Count slots are expanded over 1..60 (seconds, minutes), 1..12 (hours), clock hours 1..12 and
        minutes in steps of 5, volume 0..100 in steps of 10; free-text slots get a few typical fillers.
        The order is deterministic (template order, then slot order); duplicates are removed.
        Used by the ASR for grammar-constrained decoding.

        Args:
            limit: return at most this many sentences (``None`` = all).

        Raises:
            ValueError: if ``limit`` is negative.
        """
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        lists = {
            "timer_hours": _text_list(_number_list(range(1, 13), words=True)),
            "timer_minutes": _text_list(_number_list(range(1, 61), words=True)),
            "timer_seconds": _text_list(_number_list(range(1, 61), words=True)),
            "vaani_fraction": _text_list({"values": [{"in": "डेढ़", "out": 1.5}, {"in": "ढाई", "out": 2.5},
                                                     {"in": "साढ़े तीन", "out": 3.5}]}),
            "vaani_clock_hour": _text_list(_number_list(range(1, 13), words=True)),
            "vaani_clock_minute": _text_list(_number_list((15, 30, 45), words=True)),
            "volume": _text_list(_number_list(range(0, 101, 10), words=True)),
            "expression": _text_list({"values": ["दो जमा दो", "बारह गुणा सात", "सौ भाग पाँच",
                                                 "पच्चीस का वर्ग"]}),
            "value": _text_list({"values": ["एक", "पाँच", "दस", "सौ"]}),
            "note": _text_list({"values": ["दूध खरीदना है", "माँ को फ़ोन करना है"]}),
            "query": _text_list({"values": ["भजन", "पुराना"]}),
        }
        names = set(self.intents.intents) - {"VaaniConvertUnit"}
        out: dict[str, None] = {}
        sampled = sample_intents(self.intents, slot_lists=lists, expand_ranges=False, intent_names=names,
                                 exclude_sentences_with_wildcards=False)
        for sentence in itertools.chain((s for _i, s in sampled), _unit_sentences()):
            s = " ".join(sentence.split())
            if s and not s.isascii():
                out.setdefault(s, None)
            if limit is not None and len(out) >= limit:
                break
        return list(out)

    @staticmethod
    def benchmark_commands() -> list[tuple[str, str, dict]]:
        """~60 commands as people say them: ``(Hindi sentence, expected intent, expected key slots)``.

        Written independently of the templates (numbers as Hindi words or digits), covering all eight
        plugins; deterministic order.
        """
        return [(s, n, dict(slots)) for s, n, slots in _BENCHMARK]


def _text_list(spec: dict) -> TextSlotList:
    values = []
    for item in spec["values"]:
        if isinstance(item, str):
            values.append(TextSlotValue(TextChunk(item), item))
        else:
            values.append(TextSlotValue(TextChunk(item["in"]), item["out"]))
    return TextSlotList(name=None, values=values)


def _unit_sentences() -> Iterable[str]:
    """Unit-conversion commands for every ordered pair of units of the same kind (the template grammar
    would pair every unit with every other, millions of sentences)."""
    from mani_jax.voice.plugins.units import DIMENSIONS, UNIT_NAMES_HI

    for units in DIMENSIONS.values():
        for a in units:
            for b in units:
                if a == b:
                    continue
                ha, hb = UNIT_NAMES_HI[a].removeprefix("डिग्री "), UNIT_NAMES_HI[b].removeprefix("डिग्री ")
                for value in ("एक", "पाँच", "दस", "सौ"):
                    yield f"{value} {ha} में कितने {hb} होते हैं"
                    yield f"{value} {ha} को {hb} में बदलो"


def _valid_expression(slots: dict) -> bool:
    from mani_jax.voice.plugins.calculator import to_arithmetic

    try:
        to_arithmetic(str(slots.get("expression", "")))
    except ValueError:
        return False
    return True


_DEFAULT_VALIDATORS: dict[str, Callable[[dict], bool]] = {
    "VaaniCalculate": _valid_expression,
    "VaaniConvertUnit": lambda s: words_to_number(normalize_numbers(str(s.get("value", "")))) is not None,
    "VaaniAddNote": lambda s: bool(str(s.get("note", "")).strip()),
    "VaaniPlayMedia": lambda s: "query" not in s or bool(str(s["query"]).strip()),
}

_BENCHMARK: tuple[tuple[str, str, dict], ...] = (
    # time / date
    ("अभी कितने बजे हैं", "HassGetCurrentTime", {}),
    ("टाइम क्या हुआ है", "HassGetCurrentTime", {}),
    ("समय बताओ", "HassGetCurrentTime", {}),
    ("आज कौन सा दिन है", "HassGetCurrentDate", {}),
    ("आज की तारीख बताओ", "HassGetCurrentDate", {}),
    ("आज कितनी तारीख है", "HassGetCurrentDate", {}),
    # timers and alarms
    ("पाँच मिनट का टाइमर लगाओ", "HassStartTimer", {"minutes": 5}),
    ("दस मिनट के लिए टाइमर सेट करो", "HassStartTimer", {"minutes": 10}),
    ("पैंतालीस सेकंड का टाइमर लगा दो", "HassStartTimer", {"seconds": 45}),
    ("दो घंटे का टाइमर चालू करो", "HassStartTimer", {"hours": 2}),
    ("डेढ़ घंटे का टाइमर लगाओ", "HassStartTimer", {"hours": 1.5}),
    ("एक घंटे तीस मिनट का टाइमर लगाओ", "HassStartTimer", {"hours": 1, "minutes": 30}),
    ("25 मिनट का टाइमर", "HassStartTimer", {"minutes": 25}),
    ("टाइमर कैंसिल कर दो", "HassCancelTimer", {}),
    ("सारे टाइमर हटा दो", "HassCancelAllTimers", {}),
    ("टाइमर में कितना समय बाकी है", "HassTimerStatus", {}),
    ("सुबह छह बजे का अलार्म लगाओ", "VaaniSetAlarm", {"hour": 6, "period": "morning"}),
    ("साढ़े सात बजे का अलार्म लगा दो", "VaaniSetAlarm", {"hour": 7.5}),
    ("शाम पाँच बजकर बीस मिनट पर अलार्म लगाओ", "VaaniSetAlarm", {"hour": 5, "minute": 20, "period": "evening"}),
    ("अलार्म बंद कर दो", "VaaniCancelAlarm", {}),
    # calculator
    ("बारह गुणा सात कितना होता है", "VaaniCalculate", {}),
    ("पच्चीस जमा सत्रह कितने होते हैं", "VaaniCalculate", {}),
    ("सौ भाग चार कितना होता है", "VaaniCalculate", {}),
    ("हिसाब लगाओ तीन सौ घटा पैंतालीस", "VaaniCalculate", {}),
    ("पंद्रह का वर्ग कितना होता है", "VaaniCalculate", {}),
    ("दो हज़ार का दस प्रतिशत कितना होता है", "VaaniCalculate", {}),
    ("144 का वर्गमूल कितना है", "VaaniCalculate", {}),
    # unit conversion
    ("पाँच किलोमीटर में कितने मील होते हैं", "VaaniConvertUnit", {"value": "5", "from_unit": "km", "to_unit": "mile"}),
    ("दस किलो कितने पाउंड होते हैं", "VaaniConvertUnit", {"from_unit": "kg", "to_unit": "lb"}),
    ("सौ फ़ारेनहाइट को सेल्सियस में बदलो", "VaaniConvertUnit", {"from_unit": "fahrenheit", "to_unit": "celsius"}),
    ("छह फुट कितने मीटर होते हैं", "VaaniConvertUnit", {"from_unit": "ft", "to_unit": "m"}),
    ("ढाई लीटर में कितने मिलीलीटर होते हैं", "VaaniConvertUnit", {"from_unit": "l", "to_unit": "ml"}),
    ("साठ मील प्रति घंटा कितने किलोमीटर प्रति घंटा होते हैं", "VaaniConvertUnit",
     {"from_unit": "mph", "to_unit": "kmh"}),
    # notes
    ("नोट करो दूध खरीदना है", "VaaniAddNote", {"note": "दूध खरीदना है"}),
    ("याद रखना कि कल बिजली का बिल भरना है", "VaaniAddNote", {"note": "कल बिजली का बिल भरना है"}),
    ("एक किलो चीनी लानी है नोट कर लो", "VaaniAddNote", {"note": "एक किलो चीनी लानी है"}),
    ("मेरे नोट्स पढ़ो", "VaaniReadNotes", {}),
    ("सारे नोट्स मिटा दो", "VaaniDeleteNote", {"scope": "all"}),
    ("आखिरी नोट हटा दो", "VaaniDeleteNote", {"scope": "last"}),
    # weather
    ("आज मौसम कैसा है", "HassGetWeather", {}),
    ("मौसम बताओ", "HassGetWeather", {}),
    ("दिल्ली का मौसम कैसा है", "HassGetWeather", {"city": "दिल्ली"}),
    ("मुंबई में आज मौसम कैसा रहेगा", "HassGetWeather", {"city": "मुंबई"}),
    ("बाहर तापमान कितना है", "HassGetWeather", {}),
    # media
    ("गाना चलाओ", "VaaniPlayMedia", {}),
    ("कोई संगीत बजाओ", "VaaniPlayMedia", {}),
    ("गाना रोको", "HassMediaPause", {}),
    ("फिर से चलाओ", "HassMediaUnpause", {}),
    ("अगला गाना चलाओ", "HassMediaNext", {}),
    ("पिछला गाना लगाओ", "HassMediaPrevious", {}),
    ("आवाज़ बढ़ाओ", "HassSetVolumeRelative", {"direction": "up"}),
    ("आवाज कम करो", "HassSetVolumeRelative", {"direction": "down"}),
    ("आवाज़ पचास प्रतिशत कर दो", "HassSetVolume", {"volume": 50}),
    ("गाना बंद करो", "VaaniMediaStop", {}),
    # system
    ("सिस्टम की स्थिति बताओ", "VaaniSystemStatus", {"aspect": "all"}),
    ("मेमोरी कितनी खाली है", "VaaniSystemStatus", {"aspect": "memory"}),
    ("डिस्क में कितनी जगह बची है", "VaaniSystemStatus", {"aspect": "disk"}),
    ("कंप्यूटर कब से चल रहा है", "VaaniSystemStatus", {"aspect": "uptime"}),
    ("प्रोसेसर पर कितना लोड है", "VaaniSystemStatus", {"aspect": "cpu"}),
)
