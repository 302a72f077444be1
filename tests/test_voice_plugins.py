"""VAANI plugins: each plugin's intents and Hindi replies, safety of the calculator and notes, isolation."""
import json
from datetime import datetime, timedelta
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from mani_jax.voice.nlu import Intent, IntentRecognizer
from mani_jax.voice.plugins import APOLOGY, NOT_UNDERSTOOD, PluginHost, Response
from mani_jax.voice.plugins.calculator import CalculatorPlugin, safe_eval, to_arithmetic
from mani_jax.voice.plugins.units import convert

FIXED = datetime(2025, 3, 14, 15, 5)  # a Friday afternoon


class Clock:
    def __init__(self):
        self.t = 1000.0
        self.wall = FIXED

    def mono(self):
        return self.t

    def now(self):
        return self.wall

    def advance(self, seconds):
        self.t += seconds
        self.wall += timedelta(seconds=seconds)


@pytest.fixture(scope="module")
def rec():
    return IntentRecognizer()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def host(tmp_path, clock):
    music = tmp_path / "music"
    music.mkdir()
    for name in ("a_bhajan.mp3", "b_ghazal.wav", "c_raag.flac", "notes.txt"):
        (music / name).write_bytes(b"x")
    return PluginHost(tmp_path / "state", now=clock.now, monotonic=clock.mono, config={"media_dir": str(music)})


def say(host, rec, text):
    return host.handle(rec.recognize(text))


def test_entry_points_list_the_eight_plugins(host):
    names = {e.name for e in entry_points(group="mani_jax.voice.plugins")}
    assert names == {"time", "timer", "calculator", "units", "notes", "weather", "media", "system"}
    assert set(host.plugins) == names and host.load_errors == {}


def test_time_and_date(host, rec):
    r = say(host, rec, "अभी कितने बजे हैं")
    assert r.ok and r.plugin == "time" and r.text == "अभी दोपहर के 3 बजकर 5 मिनट हुए हैं।"
    r = say(host, rec, "आज कौन सा दिन है")
    assert r.text == "आज शुक्रवार, 14 मार्च 2025 है।" and r.data["weekday"] == "शुक्रवार"


def test_timer_lifecycle(host, rec, clock):
    fired = []
    timer = host.plugins["timer"]
    timer.add_listener(fired.append)
    r = say(host, rec, "पाँच मिनट का टाइमर लगाओ")
    assert r.ok and r.text == "5 मिनट का टाइमर लगा दिया।"
    clock.advance(70)
    r = say(host, rec, "टाइमर में कितना समय बाकी है")
    assert "3 मिनट 50 सेकंड बाकी" in r.text
    assert say(host, rec, "डेढ़ घंटे का टाइमर लगाओ").text == "1 घंटे 30 मिनट का टाइमर लगा दिया।"
    clock.advance(230)
    assert [t.label for t in timer.poll()] == ["5 मिनट"] and [t.label for t in fired] == ["5 मिनट"]
    assert say(host, rec, "टाइमर कैंसिल कर दो").text == "1 घंटे 30 मिनट का टाइमर बंद कर दिया।"
    r = say(host, rec, "टाइमर कैंसिल कर दो")
    assert not r.ok and "कोई टाइमर नहीं" in r.text


def test_alarm(host, rec, clock):
    r = say(host, rec, "सुबह छह बजे का अलार्म लगाओ")
    assert r.ok and r.text == "कल सुबह के 6 बजे का अलार्म लगा दिया।"
    assert r.data["at"] == "2025-03-15T06:00:00"
    r = say(host, rec, "शाम पाँच बजकर बीस मिनट पर अलार्म लगाओ")
    assert r.text == "शाम के 5 बजकर 20 मिनट का अलार्म लगा दिया।"
    clock.advance(r.data["seconds"])
    assert [t.kind for t in host.plugins["timer"].poll()] == ["alarm"]
    assert say(host, rec, "अलार्म बंद कर दो").text == "अलार्म हटा दिया।"


def test_calculator(host, rec):
    r = say(host, rec, "बारह गुणा सात कितना होता है")
    assert r.ok and r.data["value"] == 84 and r.text == "जवाब है 84।"
    assert say(host, rec, "दो हज़ार का दस प्रतिशत कितना होता है").data["value"] == 200
    assert say(host, rec, "144 का वर्गमूल कितना है").data["value"] == 12
    assert say(host, rec, "साढ़े तीन जमा ढाई कितना होता है").data["value"] == 6
    assert safe_eval("-(2 + 3) * 4 // 3 % 5") == (-(2 + 3) * 4 // 3) % 5
    assert to_arithmetic("बारह गुणा सात") == "12 * 7"


@pytest.mark.parametrize("text", [
    "__import__('os').system('ls')", "().__class__.__bases__[0]", "9**9**9", "2 ** 5000", "10 ** 20",
    "x + 1", "open('f')", "lambda: 1", "[1, 2][0]", "1" * 300, "'a' * 3", "os.system",
])
def test_calculator_rejects_injection(tmp_path, text):
    plugin = CalculatorPlugin(PluginHost(tmp_path).ctx)
    r = plugin.handle(Intent("VaaniCalculate", {"expression": text}, text))
    assert not r.ok and r.text.startswith("माफ़ कीजिए") and "value" not in r.data
    with pytest.raises(ValueError):
        safe_eval(text)


def test_calculator_division_by_zero(host, rec):
    r = say(host, rec, "दस भाग शून्य कितना होता है")
    assert not r.ok and "शून्य से भाग" in r.text


def test_units(host, rec):
    r = say(host, rec, "पाँच किलोमीटर में कितने मील होते हैं")
    assert r.ok and r.text == "5 किलोमीटर बराबर 3.11 मील होते हैं।"
    assert say(host, rec, "सौ फ़ारेनहाइट को सेल्सियस में बदलो").data["value"] == pytest.approx(37.7778, abs=1e-3)
    assert convert(0, "celsius", "fahrenheit") == pytest.approx(32)
    assert convert(300, "kelvin", "celsius") == pytest.approx(26.85)
    assert convert(1, "quintal", "kg") == 100 and convert(60, "mph", "kmh") == pytest.approx(96.56064)
    r = say(host, rec, "पाँच किलो कितने मीटर होते हैं")
    assert not r.ok and "नहीं बदला जा सकता" in r.text
    with pytest.raises(ValueError, match="from_unit"):
        convert(1, "furlong", "m")


def test_notes_persist_and_store_sql_verbatim(tmp_path, rec, clock):
    tricky = ["'; DROP TABLE notes; --", 'उसने कहा "हाँ" 100% _पक्का_', "दूध खरीदना है"]
    host = PluginHost(tmp_path, now=clock.now)
    for text in tricky:
        r = host.handle(Intent("VaaniAddNote", {"note": text}, text))
        assert r.ok and r.text == f"नोट कर लिया: {text}"
    assert say(host, rec, "नोट करो माँ को फ़ोन करना है").ok
    again = PluginHost(tmp_path, now=clock.now)  # restart
    r = say(again, rec, "मेरे नोट्स पढ़ो")
    assert r.data["notes"] == tricky + ["माँ को फ़ोन करना है"] and "आपके 4 नोट हैं" in r.text
    assert (tmp_path / "notes.sqlite3").exists()
    r = say(again, rec, "आखिरी नोट हटा दो")
    assert r.data["deleted"] == "माँ को फ़ोन करना है"
    assert say(again, rec, "सारे नोट्स मिटा दो").data["count"] == 3
    assert say(again, rec, "मेरे नोट्स पढ़ो").text == "अभी कोई नोट नहीं है।"


def test_weather_cache(host, rec, clock):
    r = say(host, rec, "आज मौसम कैसा है")
    assert not r.ok and "उपलब्ध नहीं" in r.text
    cache = host.data_dir / "weather.json"
    cache.write_text("{not json", encoding="utf-8")
    assert not say(host, rec, "मौसम बताओ").ok
    cache.write_text(json.dumps({
        "दिल्ली": {"temp_c": 31.4, "condition_hi": "धूप", "humidity": 40, "updated": "2025-03-14T14:00:00"},
        "मुंबई": {"temp_c": 29, "condition_hi": "बादल", "humidity": 80, "updated": "2025-03-13T08:00:00"},
    }, ensure_ascii=False), encoding="utf-8")
    r = say(host, rec, "दिल्ली का मौसम कैसा है")
    assert r.ok and r.text == "दिल्ली में तापमान 31 डिग्री सेल्सियस है, मौसम धूप है, नमी 40 प्रतिशत।"
    r = say(host, rec, "मुंबई में आज मौसम कैसा रहेगा")
    assert r.data["stale"] and r.text.startswith("यह जानकारी 31 घंटे पुरानी है।")
    r = say(host, rec, "मौसम बताओ")  # two cities, no default: ask politely
    assert not r.ok
    host.ctx.config["default_city"] = "दिल्ली"
    assert say(host, rec, "मौसम बताओ").data["city"] == "दिल्ली"


def test_media(host, rec):
    media = host.plugins["media"]
    assert [p.name for p in media.state.playlist] == ["a_bhajan.mp3", "b_ghazal.wav", "c_raag.flac"]
    r = say(host, rec, "गाना चलाओ")
    assert r.ok and r.text == "चला रही हूँ: a bhajan।" and media.state.playing
    assert say(host, rec, "गाना रोको").text == "गाना रोक दिया।" and media.state.paused
    assert say(host, rec, "फिर से चलाओ").ok and not media.state.paused
    assert say(host, rec, "अगला गाना चलाओ").text == "अगला गाना: b ghazal।"
    assert say(host, rec, "पिछला गाना लगाओ").data["index"] == 0
    assert say(host, rec, "पिछला गाना लगाओ").data["index"] == 2
    assert say(host, rec, "आवाज़ पचास प्रतिशत कर दो").data["volume"] == 50
    assert say(host, rec, "आवाज़ बढ़ाओ").text == "आवाज़ 60 प्रतिशत कर दी।"
    assert say(host, rec, "गाना बंद करो").ok and not media.state.playing
    r = host.handle(Intent("VaaniPlayMedia", {"query": "ghazal"}, "ghazal गाना चलाओ"))
    assert r.data["index"] == 1


def test_media_without_files(tmp_path, rec):
    r = say(PluginHost(tmp_path), rec, "गाना चलाओ")
    assert not r.ok and "कोई गाना नहीं" in r.text


def test_system(host, rec):
    r = say(host, rec, "सिस्टम की स्थिति बताओ")
    assert r.ok and "कोर" in r.text and r.data["cpu_count"] >= 1
    assert "जीबी" in say(host, rec, "डिस्क में कितनी जगह बची है").text
    if Path("/proc/meminfo").exists():
        assert say(host, rec, "मेमोरी कितनी खाली है").data["mem_total"] > 0
    if Path("/proc/uptime").exists():
        assert "से चल रहा है" in say(host, rec, "कंप्यूटर कब से चल रहा है").text


def test_plugin_exception_becomes_apology(host, rec, monkeypatch):
    def boom(intent):
        raise RuntimeError("secret internal detail /etc/passwd")

    monkeypatch.setattr(host.plugins["calculator"], "handle", boom)
    r = say(host, rec, "बारह गुणा सात कितना होता है")
    assert r == Response(APOLOGY, "calculator", False, {"reason": "plugin_error"})
    assert "secret" not in r.text


def test_plugin_load_failure_is_isolated(tmp_path):
    from mani_jax.voice.plugins.time_date import TimeDatePlugin

    class Broken(TimeDatePlugin):
        name = "broken"

        def __init__(self, ctx):
            raise OSError("disk on fire")

    host = PluginHost(tmp_path, plugins=[Broken, CalculatorPlugin])
    assert "Broken" in host.load_errors and set(host.plugins) == {"calculator"}
    assert host.handle(Intent("HassGetCurrentTime", {}, "समय")).text == NOT_UNDERSTOOD


def test_unhandled_and_none(host, rec):
    assert host.handle(None).text == NOT_UNDERSTOOD
    assert host.handle(Intent("HassTurnOn", {}, "x")).ok is False
    assert host.handle(rec.recognize("छोड़ो")).text == "ठीक है।"


def test_fallback_used_when_nothing_recognized(host, rec):
    host.fallback = lambda text: "मुझे नहीं पता, पर मैं सीख रही हूँ।"
    r = host.handle_text("भारत की राजधानी क्या है", rec)
    assert r.ok and r.plugin == "fallback"
    assert host.handle_text("बारह गुणा सात कितना होता है", rec).data["value"] == 84


GGUF = Path(__file__).resolve().parents[1] / "runs/chimera-default/chimera-tiny-q8_0.gguf"


@pytest.mark.skipif(not GGUF.exists(), reason="no local chat GGUF")
def test_llm_fallback_smoke():
    pytest.importorskip("llama_cpp")
    from mani_jax.voice.plugins.llm import LLMFallback

    with pytest.raises(FileNotFoundError, match="gguf_path"):
        LLMFallback("/nonexistent.gguf")
    fallback = LLMFallback(GGUF, max_tokens=8, n_ctx=256)
    answer = fallback("2+3=?")
    assert answer is None or isinstance(answer, str)
