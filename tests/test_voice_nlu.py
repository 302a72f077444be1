"""VAANI natural-language understanding: benchmark commands, HA hi.json intents, numbers, fuzzy fallback."""
import random

import pytest

from mani_jax.voice.nlu import Intent, IntentRecognizer
from mani_jax.voice.numbers import HINDI_NUMBERS, normalize_numbers, number_to_hindi_words, words_to_number


@pytest.fixture(scope="module")
def rec():
    return IntentRecognizer()


def test_benchmark_commands_recognized(rec):
    commands = rec.benchmark_commands()
    assert 40 <= len(commands) <= 80
    assert commands == rec.benchmark_commands()
    failures = []
    for sentence, name, slots in commands:
        got = rec.recognize(sentence)
        if got is None or got.name != name or any(got.slots.get(k) != v for k, v in slots.items()):
            failures.append((sentence, name, slots, got))
    assert not failures, failures


@pytest.mark.parametrize("text,name,slots", [
    ("अभी का समय क्या है", "HassGetCurrentTime", {}),
    ("आज की तारीख क्या है", "HassGetCurrentDate", {}),
    ("पाँच मिनट का टाइमर लगाओ", "HassStartTimer", {"minutes": 5}),
    ("टाइमर लगाओ 3 घंटे का", "HassStartTimer", {"hours": 3}),
    ("मौसम कैसा है", "HassGetWeather", {}),
    ("गाना रोक दो", "HassMediaPause", {}),
    ("अगला ट्रैक चलाओ", "HassMediaNext", {}),
    ("छोड़ो", "HassNevermind", {}),
    ("what time is it", "HassGetCurrentTime", {}),
    ("set a timer for ten minutes", "HassStartTimer", {"minutes": 10}),
])
def test_ha_and_english_intents(rec, text, name, slots):
    got = rec.recognize(text)
    assert got is not None and got.name == name and got.source == "hassil" and got.confidence == 1.0
    for k, v in slots.items():
        assert got.slots[k] == v


def test_intent_to_wyoming(rec):
    got = rec.recognize("पाँच मिनट का टाइमर लगाओ")
    wy = got.to_wyoming()
    assert wy.name == "HassStartTimer" and wy.text == "पाँच मिनट का टाइमर लगाओ"
    assert [(e.name, e.value) for e in wy.entities] == [("minutes", 5)]
    assert isinstance(got, Intent)


def test_note_text_kept_verbatim(rec):
    got = rec.recognize("नोट करो एक किलो आटा और दो दर्जन अंडे लाने हैं")
    assert got.name == "VaaniAddNote" and got.slots["note"] == "एक किलो आटा और दो दर्जन अंडे लाने हैं"


def test_irregular_numbers_round_trip():
    for n in range(0, 101):
        assert words_to_number(number_to_hindi_words(n)) == n, n
        assert normalize_numbers(number_to_hindi_words(n)) == str(n)
    assert len(set(HINDI_NUMBERS)) == 101


@pytest.mark.parametrize("text,value", [
    ("पैंतीस", 35), ("अट्ठानवे", 98), ("अट्ठानबे", 98), ("निन्यानवे", 99), ("पांच", 5), ("पाँच", 5),
    ("उनतालीस", 39), ("सड़सठ", 67), ("सडसठ", 67), ("तीन सौ पैंतालीस", 345), ("डेढ़ हज़ार", 1500),
    ("डेढ हजार", 1500), ("साढ़े तीन", 3.5), ("ढाई", 2.5), ("सवा सौ", 125), ("पौने दो", 1.75),
    ("पौने दो सौ", 175), ("साढ़े सात हज़ार", 7500), ("दो लाख पचास हज़ार", 250000), ("तीन करोड़", 30000000),
    ("एक हज़ार एक", 1001), ("१२", 12), ("२०२५", 2025), ("2 हज़ार", 2000), ("तीन दशमलव पाँच", 3.5),
    ("twenty five", 25), ("two hundred and five", 205), ("three point five", 3.5), ("सौ", 100),
])
def test_words_to_number(text, value):
    assert words_to_number(text) == value


def test_words_to_number_rejects():
    assert words_to_number("") is None
    assert words_to_number("मौसम") is None
    assert words_to_number("पाँच मिनट") is None
    with pytest.raises(TypeError, match="text"):
        words_to_number(5)


def test_normalize_numbers():
    assert normalize_numbers("पाँच मिनट का टाइमर लगाओ") == "5 मिनट का टाइमर लगाओ"
    assert normalize_numbers("साढ़े सात बजे") == "7.5 बजे"
    assert normalize_numbers("टाइमर लगा दो") == "टाइमर लगा दो"  # the verb दो is not "two"
    assert normalize_numbers("दस घटा दो") == "10 घटा 2"
    assert normalize_numbers("पाँच छह") == "5 6"
    assert normalize_numbers("कमरा नंबर ४०४") == "कमरा नंबर 404"


def test_number_to_hindi_words():
    assert number_to_hindi_words(345) == "तीन सौ पैंतालीस"
    assert number_to_hindi_words(12345678) == "एक करोड़ तेईस लाख पैंतालीस हज़ार छह सौ अठहत्तर"
    assert number_to_hindi_words(-7) == "माइनस सात"
    assert words_to_number(number_to_hindi_words(3.25)) == 3.25
    for n in random.Random(0).sample(range(100, 10**9), 300):
        assert words_to_number(number_to_hindi_words(n)) == n
    with pytest.raises(TypeError, match="n"):
        number_to_hindi_words("5")
    with pytest.raises(ValueError, match="n"):
        number_to_hindi_words(10**15)


@pytest.mark.parametrize("text,name", [
    ("पांच मिनत का टाइमार लगाओ", "HassStartTimer"),
    ("आज मोसम कैसा हे", "HassGetWeather"),
    ("अगला गाना चलायो", "HassMediaNext"),
    ("सिस्टम की स्थिती बताओ", "VaaniSystemStatus"),
    ("मेमोरी कितनी खाली हे", "VaaniSystemStatus"),
])
def test_fuzzy_fallback(rec, text, name):
    got = rec.recognize(text)
    assert got is not None and got.name == name and got.source == "fuzzy"
    assert rec.fuzzy_threshold <= got.confidence < 1.0


def test_fuzzy_keeps_user_number(rec):
    got = rec.recognize("सात मिनत का टाइमार लगाओ")
    assert got.name == "HassStartTimer" and got.slots == {"minutes": 7}


@pytest.mark.parametrize("text", [
    "तुम कैसे हो", "आज मैंने खाना खाया", "तुम्हारा नाम क्या है", "मुझे एक कहानी सुनाओ",
    "भारत की राजधानी क्या है", "क्रिकेट का स्कोर क्या है", "मेरा दोस्त कल आएगा", "", "   ",
    "तुम्हारी उम्र कितनी है",
])
def test_unrelated_returns_none(rec, text):
    assert rec.recognize(text) is None


def test_recognize_type_error(rec):
    with pytest.raises(TypeError, match="text"):
        rec.recognize(None)
    with pytest.raises(ValueError, match="fuzzy_threshold"):
        IntentRecognizer(fuzzy_threshold=0)


def test_command_sentences(rec):
    first = rec.command_sentences(limit=500)
    assert len(first) == 500 and first == rec.command_sentences(limit=500)
    everything = rec.command_sentences()
    assert everything[:500] == first and len(everything) == len(set(everything)) > 10000
    assert "पाँच मिनट का टाइमर लगाओ" in everything
    assert not any(ch.isdigit() for s in everything[:2000] for ch in s)
    for sentence in random.Random(1).sample(everything, 200):
        got = rec.recognize(sentence)
        assert got is not None and got.source == "hassil", sentence
