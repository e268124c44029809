"""What you write is what you read: the exact list of types a state may hold.

orjson converts several Python types silently (a UUID to a string, an Enum member to
its value, a dataclass to an object, a datetime to a string); a state that stored them
would read back something else. Each type orjson handles natively is listed here as
accepted (reads back as the same JSON type) or refused (StateSerializationError, the
file untouched), through a real commit and read, on both encoder paths (orjson, and
the stdlib path taken for integers beyond 64 bits).
"""

from __future__ import annotations

import collections
import dataclasses
import decimal
import enum
import fractions
import re
import uuid
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import pytest

from pipeline_common import PipelineState, StateSerializationError, _json

_DOCS = Path(__file__).resolve().parent.parent / "docs" / "errors.md"


class Colour(enum.Enum):
    RED = "red"


class Level(enum.Enum):
    LOW = 1


class Ratio(enum.Enum):
    HALF = 0.5


class Status(str, enum.Enum):
    DONE = "done"


class Priority(enum.IntEnum):
    HIGH = 3


class Name(str):
    pass


class Count(int):
    pass


class Score(float):
    pass


class Attrs(dict):  # type: ignore[type-arg]
    pass


class Items(list):  # type: ignore[type-arg]
    pass


class Point(NamedTuple):
    x: int
    y: int


@dataclasses.dataclass
class Job:
    name: str


# value written -> value read back (compared with ==, and by exact type)
_ACCEPTED: dict[str, tuple[Any, Any]] = {
    "dict": ({"a": 1}, {"a": 1}),
    "list": ([1, "x"], [1, "x"]),
    "tuple (as a list)": ((1, "x"), [1, "x"]),
    "str": ("é✓", "é✓"),
    "int": (-(2**63), -(2**63)),
    "float": (1.5, 1.5),
    "bool": (True, True),
    "None": (None, None),
    "str subclass": (Name("n"), "n"),
    "int subclass": (Count(7), 7),
    "str Enum member": (Status.DONE, "done"),
    "IntEnum member": (Priority.HIGH, 3),
    "dict subclass": (Attrs(a=1), {"a": 1}),
    "OrderedDict": (collections.OrderedDict(a=1), {"a": 1}),
    "defaultdict": (collections.defaultdict(int, a=1), {"a": 1}),
    "Counter": (collections.Counter(a=2), {"a": 2}),
    "list subclass": (Items([1]), [1]),
}

_REFUSED: dict[str, Any] = {
    "UUID": uuid.UUID("63b135a8-c39b-4a51-9997-1bed894a90da"),
    "Enum member (str value)": Colour.RED,
    "Enum member (int value)": Level.LOW,
    "Enum member (float value)": Ratio.HALF,
    "datetime": datetime(2024, 1, 1, tzinfo=timezone.utc),
    "date": date(2024, 1, 1),
    "time": time(12, 30),
    "timedelta": timedelta(seconds=1),
    "dataclass": Job("x"),
    "Decimal": decimal.Decimal("1.10"),
    "Fraction": fractions.Fraction(1, 3),
    "float subclass (like numpy.float64)": Score(1.5),
    "namedtuple": Point(1, 2),
    "set": {1},
    "frozenset": frozenset({1}),
    "bytes": b"x",
    "bytearray": bytearray(b"x"),
    "memoryview": memoryview(b"x"),
    "complex": 1j,
    "orjson.Fragment": orjson.Fragment(b"[1]"),
    "range": range(2),
    "Path": Path("x"),
    "object": object(),
}

_REFUSED_KEYS: dict[str, Any] = {
    "str subclass key": {Name("k"): 1},
    "str Enum key": {Status.DONE: 1},
    "int key": {1: 1},
    "UUID key": {uuid.UUID(int=1): 1},
}


def _places(value: Any) -> list[tuple[str, dict[str, Any]]]:
    """``value`` at the top level, nested, inside a list, and beside a 65-bit integer
    (which sends the document to the stdlib encoder)."""
    return [
        ("top", {"v": value}),
        ("nested", {"a": {"b": value}}),
        ("in a list", {"a": [1, value]}),
        ("stdlib path", {"big": 2**70, "v": value}),
    ]


@pytest.mark.parametrize("name", list(_ACCEPTED))
def test_accepted_types_read_back_as_the_same_json_type(tmp_path: Path, name: str) -> None:
    """Each accepted type commits and reads back equal, as its base JSON type."""
    written, expected = _ACCEPTED[name]
    for where, data in _places(written):
        state = PipelineState(tmp_path / f"{where.replace(' ', '_')}.json")
        state.write(data)
        got = state.read()
        value = (
            got["a"]["b"]
            if where == "nested"
            else got["a"][1]
            if where == "in a list"
            else got["v"]
        )
        assert value == expected, (where, value)
        assert type(value) is type(expected), (where, type(value))


@pytest.mark.parametrize("name", list(_REFUSED))
def test_converted_types_are_refused_and_nothing_is_written(tmp_path: Path, name: str) -> None:
    """Each refused type raises StateSerializationError naming the type and where it is;
    the file keeps its previous bytes."""
    value = _REFUSED[name]
    state = PipelineState(tmp_path / "pipeline.json")
    state.write({"v": "before"})
    before = state.path.read_bytes()
    for where, data in _places(value):
        with pytest.raises(StateSerializationError) as info:
            state.write(data)
        message = str(info.value)
        assert type(value).__qualname__ in message, (where, message)
        assert state.path.read_bytes() == before, where
        with pytest.raises(StateSerializationError), state.transaction() as txn:
            txn.data["v"] = value


@pytest.mark.parametrize("name", list(_REFUSED_KEYS))
def test_keys_that_are_not_exactly_str_are_refused(tmp_path: Path, name: str) -> None:
    """A key must be a str (not a subclass: it would read back as another key type)."""
    state = PipelineState(tmp_path / "pipeline.json")
    for _, data in _places(_REFUSED_KEYS[name]):
        with pytest.raises(StateSerializationError):
            state.write(data)
    assert not state.path.exists()


def test_the_uuid_of_the_issue_reads_back_or_is_refused(tmp_path: Path) -> None:
    """Defect 9: a UUID was stored as a string and read back as ``str``."""
    state = PipelineState(tmp_path / "u.json")
    with pytest.raises(StateSerializationError, match=r"uuid\.UUID at /id .*str\(value\)"):
        state.write({"id": uuid.uuid4()})
    assert not state.path.exists()


def test_the_documented_list_is_the_accepted_tuple() -> None:
    """docs/errors.md lists exactly the types in _json.ACCEPTED, and every refused
    type this module tests is named there as refused."""
    text = _DOCS.read_text(encoding="utf-8")
    section = text.split("### Accepted types", 1)[1].split("\n## ", 1)[0]
    accepted = re.search(r"Accepted: (.*?)\.\n", section, re.S)
    assert accepted is not None
    listed = set(re.findall(r"`([A-Za-z]+)`", accepted.group(1)))
    assert listed == {"dict", "list", "tuple", "str", "int", "float", "bool", "None"}
    assert {t.__name__ if t is not type(None) else "None" for t in _json.ACCEPTED} == listed
    refused = section.split("Refused", 1)[1]
    for word in (
        "UUID",
        "Enum",
        "datetime",
        "date",
        "time",
        "timedelta",
        "dataclass",
        "Decimal",
        "Fraction",
        "float subclass",
        "namedtuple",
        "set",
        "frozenset",
        "bytes",
        "bytearray",
        "memoryview",
        "complex",
        "Fragment",
        "numpy",
    ):
        assert word in refused, word
