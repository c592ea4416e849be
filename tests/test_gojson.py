"""Go encoding/json fidelity of the emulator's encoder (reference §1), and the proxy's encoder on values
nested deeper than orjson writes."""

from __future__ import annotations

import json
import time
from typing import Any

import orjson
import pytest

from proxy import gojson as proxy_gojson
from proxy.emulator.gojson import F32, dumps, go_float
from proxy.errors import InvalidRequest


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


# The proxy's encoder (proxy/gojson.py) on values nested deeper than orjson writes ------------------------

def _nested(depth: int, leaf: Any = None) -> Any:
    value: Any = [] if leaf is None else leaf
    for _ in range(depth):
        value = [value]
    return value


def _fastest(call: Any, runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def test_a_deep_value_beside_a_large_flat_one_costs_one_orjson_call_for_the_flat_one() -> None:
    """One branch 300 deep made the encoder walk the WHOLE value in Python, one orjson call per number
    (3.2 s on the event loop for a 6 MB body): only the deep part is opened in Python now."""
    flat = [1] * 1_000_000
    value = {"model": "m", "junk": flat, "format": _nested(300), "after": {"a": [1.5, "x"]}}
    encoded = proxy_gojson.dumps(value)
    assert encoded == json.dumps(value, separators=(",", ":")).encode()
    ratio = _fastest(lambda: proxy_gojson.dumps(value)) / _fastest(lambda: orjson.dumps(flat))
    assert ratio < 30, ratio  # ~3 here (an extra orjson pass over the flat part); ~230 walked in Python
    assert proxy_gojson.DeepStats.scanned < 2_000  # the root and the 300 levels, not the million


def test_a_deep_spine_with_a_large_array_at_every_level_is_not_written_again_and_again() -> None:
    """The adversarial shape for "try orjson at every level of the deep part": each failing try
    writes the arrays of the next 254 levels before it fails. Failed tries here stay a few per byte."""
    value: Any = []
    for _ in range(990):
        value = [[7] * 2_000, value]
    expected = b"[[" + b",".join([b"7"] * 2_000) + b"],"
    assert proxy_gojson.dumps(value) == expected * 990 + b"[]" + b"]" * 990
    flat = [[7] * 2_000] * 991
    ratio = _fastest(lambda: proxy_gojson.dumps(value)) / _fastest(lambda: orjson.dumps(flat))
    assert ratio < 40, ratio  # ~10 here; 254 tries per level would be ~250


def test_only_the_nesting_refusal_takes_the_deep_writer() -> None:
    """Other refusals of orjson propagate: the fallback turned `{1: [[[]]]}` into the invalid JSON
    `{1:[[[]]]}`."""
    with pytest.raises(orjson.JSONEncodeError, match="Dict key must be str"):
        proxy_gojson.dumps({1: [[[]]]})
    with pytest.raises(orjson.JSONEncodeError, match="Dict key must be str"):
        proxy_gojson.dumps({"deep": _nested(300), "x": {1: [1]}})  # past the nesting refusal
    with pytest.raises(orjson.JSONEncodeError, match="Dict key must be str"):
        proxy_gojson.dumps({"deep": _nested(300), 2: [[1]]})
    with pytest.raises(orjson.JSONEncodeError):
        proxy_gojson.dumps({"deep": _nested(300), "x": {1, 2}})


def test_deep_values_are_written_as_orjson_would_without_its_limit() -> None:
    """Key order, duplicate keys (the last value, at the first key's place), numbers kept as text,
    tuples, objects beside arrays at every depth."""
    raw = (b'{"b":1,"a":' + b'[{"k":' * 400 + b"1e400" + b"}]" * 400
           + b',"b":2,"n":' + b"9" * 30 + b',"s":"\\ud800\xff"}')
    value, slow = proxy_gojson.loads(raw)
    assert slow
    encoded = proxy_gojson.dumps(value)
    assert encoded == (b'{"b":2,"a":' + b'[{"k":' * 400 + b"1e400" + b"}]" * 400 + b',"n":'
                       + b"9" * 30 + b',"s":"\xef\xbf\xbd\xef\xbf\xbd"}')
    mixed = {"t": (1, _nested(260, ({"x": [None, True]},))), "z": [0.1, {"y": _nested(255)}, "e"]}
    assert proxy_gojson.dumps(mixed) == json.dumps(mixed, separators=(",", ":")).encode()


def test_a_deep_value_too_large_to_open_is_refused_as_a_bad_request() -> None:
    value = {"format": [_nested(300), *([1] * (proxy_gojson.DEEP_BUDGET + 1))]}
    with pytest.raises(proxy_gojson.GoJSONError, match="nests deeper than 254 levels") as raised:
        proxy_gojson.dumps(value)
    assert isinstance(raised.value, InvalidRequest) and raised.value.status == 400
    assert raised.value.code == "invalid_request"


@pytest.mark.parametrize(("raw", "options"), [
    (b'{"options":{"num_ctx":1,"seed":2},"options":{"seed":3}}', {"num_ctx": 1, "seed": 3}),
    (b'{"options":{"num_ctx":1},"Options":{"seed":3}}', {"num_ctx": 1, "seed": 3}),
    (b'{"options":{"num_ctx":1},"\\u006fptions" :{"seed":3}}', {"num_ctx": 1, "seed": 3}),
    (b'{"options":{"num_ctx":1},"options":null}', None),  # null sets the map to nil
    (b'{"options":{"num_ctx":1},"x":"\\"options\\":"}', {"num_ctx": 1}),  # a lookalike in a string
])
def test_a_map_field_written_twice_merges_as_in_go(raw: bytes, options: object) -> None:
    value, slow = proxy_gojson.loads(raw)
    assert proxy_gojson.request_view(value, raw, slow)["options"] == options


def test_openai_messages_written_twice_are_read_into_the_earlier_elements() -> None:
    """[]openai.Message is a slice of plain structs: a later array is decoded into the elements already
    there (fields it leaves out keep their values, elements past its length are cut); the native
    api.Message replaces each element whole (its UnmarshalJSON), so native views keep the last array."""
    raw = (b'{"messages":[{"role":"user","content":"long","name":"a"},{"role":"user","content":"x"}],'
           b'"Messages":[{"ROLE":"assistant"}]}')
    value, slow = proxy_gojson.loads(raw)
    openai = proxy_gojson.request_view(value, raw, slow, proxy_gojson.REUSED_ELEMENTS["openai"])
    assert openai["messages"] == [{"role": "assistant", "content": "long", "name": "a"}]
    assert proxy_gojson.request_view(value, raw, slow)["messages"] == [{"role": "assistant"}]
