"""Unit conversion plugin: length, mass, volume, temperature, time and speed.

Units are the ids produced by the ``vaani_unit`` list in ``templates/vaani_hi.yaml`` (``km``, ``mile``,
``kg``, ``lb``, ``celsius`` ...). Factors are exact SI definitions (1 mile = 1609.344 m, 1 lb =
0.45359237 kg, 1 US gallon = 3.785411784 l, 1 US cup = 236.5882365 ml); Indian units: 1 quintal = 100 kg,
1 tola = 11.6638038 g (the customary 180 grains). Temperature uses offsets (°F = °C × 9/5 + 32,
K = °C + 273.15). Numbers are formatted with Babel ``format_decimal(locale="hi")`` without digit grouping
(so espeak-ng reads them as one number).
"""
from __future__ import annotations

from babel.numbers import format_decimal

from mani_jax.voice.nlu import Intent
from mani_jax.voice.numbers import normalize_numbers, words_to_number
from mani_jax.voice.plugins import Plugin, Response

__all__ = ["UnitsPlugin", "convert", "UNITS", "UNIT_NAMES_HI", "DIMENSIONS"]

# unit id -> (dimension, factor to the dimension's base unit); temperature is handled separately.
UNITS: dict[str, tuple[str, float]] = {
    "km": ("length", 1000.0), "m": ("length", 1.0), "cm": ("length", 0.01), "mm": ("length", 0.001),
    "mile": ("length", 1609.344), "ft": ("length", 0.3048), "inch": ("length", 0.0254),
    "yard": ("length", 0.9144),
    "kg": ("mass", 1.0), "g": ("mass", 0.001), "mg": ("mass", 1e-6), "lb": ("mass", 0.45359237),
    "oz": ("mass", 0.028349523125), "tonne": ("mass", 1000.0), "quintal": ("mass", 100.0),
    "tola": ("mass", 0.0116638038),
    "l": ("volume", 1.0), "ml": ("volume", 0.001), "gallon": ("volume", 3.785411784),
    "cup": ("volume", 0.2365882365),
    "celsius": ("temperature", 1.0), "fahrenheit": ("temperature", 1.0), "kelvin": ("temperature", 1.0),
    "s": ("time", 1.0), "min": ("time", 60.0), "h": ("time", 3600.0), "day": ("time", 86400.0),
    "week": ("time", 604800.0),
    "kmh": ("speed", 1000.0 / 3600.0), "mph": ("speed", 1609.344 / 3600.0), "mps": ("speed", 1.0),
}
UNIT_NAMES_HI: dict[str, str] = {
    "km": "किलोमीटर", "m": "मीटर", "cm": "सेंटीमीटर", "mm": "मिलीमीटर", "mile": "मील", "ft": "फुट",
    "inch": "इंच", "yard": "गज", "kg": "किलो", "g": "ग्राम", "mg": "मिलीग्राम", "lb": "पाउंड", "oz": "औंस",
    "tonne": "टन", "quintal": "क्विंटल", "tola": "तोला", "l": "लीटर", "ml": "मिलीलीटर", "gallon": "गैलन",
    "cup": "कप", "celsius": "डिग्री सेल्सियस", "fahrenheit": "डिग्री फ़ारेनहाइट", "kelvin": "केल्विन",
    "s": "सेकंड", "min": "मिनट", "h": "घंटे", "day": "दिन", "week": "हफ़्ते",
    "kmh": "किलोमीटर प्रति घंटा", "mph": "मील प्रति घंटा", "mps": "मीटर प्रति सेकंड",
}
DIMENSIONS: dict[str, tuple[str, ...]] = {}
for _unit, (_dim, _factor) in UNITS.items():
    DIMENSIONS[_dim] = DIMENSIONS.get(_dim, ()) + (_unit,)


def _to_celsius(value: float, unit: str) -> float:
    if unit == "celsius":
        return value
    if unit == "fahrenheit":
        return (value - 32.0) * 5.0 / 9.0
    return value - 273.15


def _from_celsius(value: float, unit: str) -> float:
    if unit == "celsius":
        return value
    if unit == "fahrenheit":
        return value * 9.0 / 5.0 + 32.0
    return value + 273.15


def convert(value: float, from_unit: str, to_unit: str) -> float:
    """Convert ``value`` from ``from_unit`` to ``to_unit`` (ids from :data:`UNITS`).

    Raises:
        ValueError: if a unit id is unknown (naming the argument) or the units measure different things.
    """
    for arg, unit in (("from_unit", from_unit), ("to_unit", to_unit)):
        if unit not in UNITS:
            raise ValueError(f"{arg}: unknown unit {unit!r}; known: {sorted(UNITS)}")
    dim_from, factor_from = UNITS[from_unit]
    dim_to, factor_to = UNITS[to_unit]
    if dim_from != dim_to:
        raise ValueError(f"cannot convert {dim_from} ({from_unit}) to {dim_to} ({to_unit})")
    if dim_from == "temperature":
        return _from_celsius(_to_celsius(value, from_unit), to_unit)
    return value * factor_from / factor_to


def format_quantity(value: float) -> str:
    """Babel ``format_decimal`` in Hindi locale, ASCII digits, no grouping, at most 3 significant decimals."""
    if abs(value) >= 100:
        pattern = "0.#"
    elif abs(value) >= 1:
        pattern = "0.##"
    else:
        pattern = "0.####"
    return format_decimal(value, format=pattern, locale="hi")


class UnitsPlugin(Plugin):
    """Answers ``VaaniConvertUnit`` (slots ``value`` (text or number), ``from_unit``, ``to_unit``)."""

    name = "units"
    intents = ("VaaniConvertUnit",)

    def handle(self, intent: Intent) -> Response:
        raw = intent.slots.get("value", 1)
        value = raw if isinstance(raw, (int, float)) else words_to_number(normalize_numbers(str(raw)))
        from_unit, to_unit = intent.slots.get("from_unit"), intent.slots.get("to_unit")
        if value is None or from_unit not in UNITS or to_unit not in UNITS:
            return self.reply("माफ़ कीजिए, मैं मात्रा या इकाई नहीं समझ पाई।", ok=False, error="bad_slots")
        try:
            result = convert(float(value), from_unit, to_unit)
        except ValueError:
            return self.reply(f"{UNIT_NAMES_HI[from_unit]} को {UNIT_NAMES_HI[to_unit]} में नहीं बदला जा सकता।",
                              ok=False, error="incompatible_units")
        text = (f"{format_quantity(float(value))} {UNIT_NAMES_HI[from_unit]} बराबर "
                f"{format_quantity(result)} {UNIT_NAMES_HI[to_unit]} होते हैं।")
        return self.reply(text, value=result, from_unit=from_unit, to_unit=to_unit)
