"""Go encoding/json fidelity of the emulator's encoder (reference §1)."""

from __future__ import annotations

import pytest

from proxy.emulator.gojson import F32, dumps, go_float


@pytest.mark.parametrize("value,bits,expected", [
    (0.5670403838157654, 64, "0.5670403838157654"),
    (3.0, 64, "3"),
    (100.0, 64, "100"),
    (1e21, 64, "1e+21"),
    (1.5e-7, 64, "1.5e-7"),
    (1e-6, 64, "0.000001"),
    (123456789012345680000.0, 64, "123456789012345680000"),
    (-0.0017594862, 32, "-0.0017594862"),
    (0.010071029, 32, "0.010071029"),
    (1e-7, 32, "1e-7"),
    (0.1, 32, "0.1"),
])
def test_floats_as_go_writes_them(value: float, bits: int, expected: str) -> None:
    assert go_float(value, bits) == expected


def test_html_characters_and_line_separators_are_escaped() -> None:
    assert dumps({"response": "<think>a & b</think>\u2028"}) == (
        '{"response":"\\u003cthink\\u003ea \\u0026 b\\u003c/think\\u003e\\u2028"}')


def test_non_ascii_is_utf8_and_controls_are_escaped() -> None:
    assert dumps("22°C\n\t\x01") == '"22°C\\n\\t\\u0001"'


def test_structure_and_order_are_kept() -> None:
    assert dumps({"b": [1, F32(0.25), None, True], "a": {"z": False}}) == (
        '{"b":[1,0.25,null,true],"a":{"z":false}}')


def test_nan_is_refused_like_go() -> None:
    with pytest.raises(ValueError, match="unsupported value"):
        go_float(float("nan"))
