"""Match conditions of routing rules, compiled once at load time into a tree of tests.

A `match` is a mapping; every key must hold. A key is a fact of the association or file meta (`FACT_FIELDS`) or
a DICOM keyword of the dataset, checked against pydicom's data dictionary and read at its top level only (never in
sequence items). A value is a scalar (equals), a list
(one of), or a mapping naming one operator of `OPERATORS` (`regex`, `glob`, `min`/`max`, `present`). `any:` takes
a list of matches of which one must hold, `not:` a match that must not hold. What each key's values are and which
operators apply to them is data (`Field.kind`, `Operator.kinds`), checked once here, never at run time.
"""

from __future__ import annotations

import difflib
import fnmatch
import ipaddress
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

from pydicom import datadict
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import UID, UID_dictionary

from scp import syntaxes


@dataclass(frozen=True)
class Facts:
    """What rules may look at: the association, the file meta and the dataset header."""

    calling_ae: str
    called_ae: str
    peer_address: str
    transfer_syntax: str
    sop_class_uid: str
    read_header: Callable[[], Dataset] = field(repr=False)
    """Reads the dataset header, once, when a rule first looks at an element of it: most rules never do, and a
    modern CT or MR header with private groups takes pydicom 3-6 ms to parse."""

    @cached_property
    def dataset(self) -> Dataset:
        return self.read_header()


Values = tuple[Any, ...]
"""The values a key has for one instance; () when it is absent or empty."""

PRESENT = "(a value)"
"""What a presence-only element (sequence, binary data) reads as: its value is never loaded."""
UNREADABLE = "(unreadable)"
"""What an element whose value pydicom cannot decode reads as: present, equal to nothing."""


class Condition(Protocol):
    def evaluate(self, facts: Facts) -> tuple[bool, str]:
        """Whether the condition holds, and a sentence saying why (or why not)."""
        ...


# -- the keys -------------------------------------------------------------------------------------------------
# Kinds of values: "text" and "number" compare values; "uid" also matches globs against the UID's keyword;
# "address" is an IP address tested against networks; "presence" (sequences, binary data) can only be present.
TEXT, NUMBER, UID_KIND, ADDRESS, PRESENCE = "text", "number", "uid", "address", "presence"
FILE_META_GROUP = 0x0002
"""PS3.10 7.1: the file meta information, written around the dataset, not in it."""
_NUMERIC_VRS = {"US", "SS", "UL", "SL", "FL", "FD", "IS", "DS", "UV", "SV", "US or SS"}
_PRESENCE_VRS = {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "OB or OW", "US or OW", "US or SS or OW"}
_UNPADDED_VRS = {"AE", "CS", "LO", "PN", "SH"}
"""PS3.5 6.2: leading and trailing spaces of these are not significant; of other text VRs, trailing ones only."""


@dataclass(frozen=True)
class Field:
    """How to read one match key from the facts, and what kind of values it has."""

    read: Callable[[Facts], Values]
    kind: str
    normalise: Callable[[Any], Any]
    """Turns a value written in the YAML into what `read` returns; raises ValueError for a bad one."""


def _text(value: Any) -> str:
    """A text value must be a YAML string: YAML reads `007` as 7, `1.10` as 1.1 and `yes` as true."""
    if not isinstance(value, str):
        raise ValueError(
            f"{value!r} is read by YAML as {type(value).__name__}, not text: quote the value as written "
            "(e.g. '007', '1.10')"
        )
    return value


def ae_title(value: str) -> str:
    """An AE title, stripped (the SCP strips the padding it receives): 1-16 characters of the default repertoire
    (printable ASCII), no backslash, not all spaces (PS3.5 6.2). Every AE title of the configuration, rules' too."""
    if not value.strip() or len(value) > 16 or "\\" in value or not all(" " <= c <= "~" for c in value):
        raise ValueError(f"'{value}' is not a valid AE title (1-16 printable ASCII characters, no backslash)")
    return value.strip()


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number") from None
    if math.isnan(number):
        raise ValueError(f"{value!r} is not a number: NaN equals nothing and bounds a range nothing is within")
    return number


_UIDS = {info[4]: UID(uid) for uid, info in UID_dictionary.items() if info[4]}
_SOP_CLASSES = {keyword: uid for keyword, uid in _UIDS.items() if UID_dictionary[uid][1] == "SOP Class"}


def _uid(value: Any, known: Mapping[str, UID], what: str) -> UID:
    """A dotted UID, or the keyword pydicom gives one of `known` (`CTImageStorage`) turned into its UID."""
    text = _text(value)
    if text in known:
        return known[text]
    if re.fullmatch(r"[0-9]+(\.[0-9]+)+", text) and len(text) <= 64:
        return UID(text)
    close = difflib.get_close_matches(text, known, n=1)
    hint = f" - did you mean '{close[0]}'?" if close else ""
    raise ValueError(f"'{text}' is not {what} keyword pydicom knows nor a dotted UID{hint}")


def _sop_class(value: Any) -> UID:
    return _uid(value, _SOP_CLASSES, "a SOP Class")


def _any_uid(value: Any) -> UID:
    return _uid(value, _UIDS, "a UID")


def _network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(_text(value), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or network (CIDR such as 10.1.0.0/16)") from None


def _unpadding(vr: str) -> Callable[[str], str]:
    """How to drop the spaces of a text value that PS3.5 6.2 calls not significant."""
    if vr in _UNPADDED_VRS:
        return lambda text: text.strip(" ")
    return lambda text: text.rstrip(" ")


Locate = Callable[[Dataset], list[int]]
"""The tags of a key's elements at the top level of a dataset."""


def _single(keyword: str) -> Locate:
    tag = Tag(keyword)
    return lambda dataset: [tag] if tag in dataset else []


def _repeating(mask: str) -> Locate:
    """Every even group of a repeating-group mask of pydicom's dictionary (`60xx3000`: 6000,3000 to 601E,3000 for
    the overlays of PS3.5 7.6); an odd group is private."""
    fixed = int(mask.replace("x", "0"), 16)
    care = int("".join("0" if c == "x" else "F" for c in mask), 16)

    def locate(dataset: Dataset) -> list[int]:
        tags = dataset.keys()  # not the dataset itself: iterating it would convert every element's value
        return [tag for tag in tags if not tag & 0x10000 and (tag ^ fixed) & care == 0]

    return locate


def _dataset_values(locate: Locate, kind: str, unpad: Callable[[str], str]) -> Callable[[Facts], Values]:
    convert: Callable[[Any], Any] = {NUMBER: _number_or_text, UID_KIND: lambda v: UID(str(v))}.get(
        kind, lambda v: unpad(str(v))
    )

    def read(facts: Facts) -> Values:
        tags = locate(facts.dataset)
        if kind == PRESENCE:  # never load the value: it may be deferred pixel data
            return (PRESENT,) if any(_holds_anything(facts.dataset, tag) for tag in tags) else ()
        items = (item for tag in tags for item in _items(facts.dataset, tag))
        values = (item if item is UNREADABLE else convert(item) for item in items)
        return tuple(value for value in values if value != "")  # unpadded to nothing

    return read


def _items(dataset: Dataset, tag: int) -> Values:
    """An element's values, as pydicom reads them: empty ones left out, `UNREADABLE` for a value it cannot read."""
    try:
        value = dataset[tag].value
    except Exception:  # a malformed value must not stop the instance (STYLE rule 6)
        return (UNREADABLE,)
    items = tuple(value) if isinstance(value, MultiValue | list) else (value,)
    return tuple(v for v in items if v is not None and v != "")


def _holds_anything(dataset: Dataset, tag: int) -> bool:
    """Whether a sequence or binary element has an item or a byte, told from its length or item count: an empty
    one (zero length, no items) reads as absent. The value is never loaded."""
    element = dataset.get_item(tag, keep_deferred=True)
    if element is None:
        return False
    if isinstance(element, RawDataElement):
        if element.length != syntaxes.UNDEFINED_LENGTH:
            return element.length > 0  # a sequence of defined, non-zero length holds an item
        return element.value is None or len(element.value) > 0  # None: deferred, so larger than DEFER_SIZE
    try:
        return not element.is_empty
    except Exception:  # a malformed value must not stop the instance (STYLE rule 6)
        return True


class Number(float):
    """A numeric element's value: compares as a float; `written` is the value as the instance holds it (DS `5.0`,
    IS `007`), which glob and regex see."""

    __slots__ = ("written",)
    written: str

    def __new__(cls, value: Any) -> Number:
        number = super().__new__(cls, value)
        number.written = str(getattr(value, "original_string", value)).strip()  # PS3.5 6.2: DS, IS padding
        return number


def _number_or_text(value: Any) -> Any:
    try:
        return Number(value)
    except (TypeError, ValueError):
        return str(value)


_REPEATING = {entry[4]: mask for mask, entry in datadict.RepeatersDictionary.items()}
"""The keywords of pydicom's repeating-group elements (`OverlayData`, `CurveData` …) and their tag masks."""


def _element_field(keyword: str) -> Field:
    """A dataset element's key, from the VR pydicom's dictionary gives it."""
    if keyword in _REPEATING:
        vr, locate = datadict.RepeatersDictionary[_REPEATING[keyword]][0], _repeating(_REPEATING[keyword])
    else:
        vr, locate = datadict.dictionary_VR(keyword), _single(keyword)
    kind = NUMBER if vr in _NUMERIC_VRS else PRESENCE if vr in _PRESENCE_VRS else UID_KIND if vr == "UI" else TEXT
    unpad = _unpadding(vr)
    normalise = {NUMBER: _number, UID_KIND: _any_uid}.get(kind, lambda value: unpad(_text(value)))
    return Field(_dataset_values(locate, kind, unpad), kind, normalise)


FACT_FIELDS: dict[str, Field] = {
    "sop_class": Field(lambda f: (UID(f.sop_class_uid),), UID_KIND, _sop_class),
    "transfer_syntax": Field(lambda f: (UID(f.transfer_syntax),), UID_KIND, lambda v: syntaxes.resolve(_text(v))),
    "modality": _element_field("Modality"),
    "calling_ae": Field(lambda f: (f.calling_ae,), TEXT, lambda v: ae_title(_text(v))),
    "called_ae": Field(lambda f: (f.called_ae,), TEXT, lambda v: ae_title(_text(v))),
    "peer_address": Field(lambda f: (f.peer_address,), ADDRESS, _network),
}


def _field(key: str) -> Field:
    if key in FACT_FIELDS:
        return FACT_FIELDS[key]
    tag = datadict.tag_for_keyword(key)
    if tag is None and key not in _REPEATING:
        close = difflib.get_close_matches(key, [*FACT_FIELDS, *datadict.keyword_dict, *_REPEATING], n=1)
        hint = f" - did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"'{key}' is neither a match key ({', '.join(FACT_FIELDS)}) nor a DICOM keyword{hint}")
    if tag is not None and tag >> 16 == FILE_META_GROUP:
        raise ValueError(
            f"'{key}' is a file meta element (group 0002), not part of the dataset rules look at: match the syntax "
            "the instance arrived in with transfer_syntax, its SOP class with sop_class"
        )
    return _element_field(key)


# -- the tests ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Test:
    """One key against one operator: `holds` sees the key's values for the instance."""

    key: str
    read: Callable[[Facts], Values]
    holds: Callable[[Values], bool]
    yes: str
    no: str

    def evaluate(self, facts: Facts) -> tuple[bool, str]:
        values = self.read(facts)
        result = self.holds(values)
        return result, f"{self.key} {_show(values)} {self.yes if result else self.no}"


def _show(values: Values) -> str:
    if not values:
        return "(absent)"
    shown = [_short(v) for v in values]
    return shown[0] if len(shown) == 1 else f"[{', '.join(shown)}]"


def _short(value: Any) -> str:
    if value in (PRESENT, UNREADABLE):
        return str(value)
    if isinstance(value, Number):
        return value.written
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, UID) and value.keyword:
        return f"{value} ({value.keyword})"
    return repr(value) if isinstance(value, str) else str(value)


def _equals(key: str, spec: Field, wanted: Sequence[Any]) -> Test:
    if spec.kind == PRESENCE:
        raise ValueError(f"{key} holds a sequence or binary data: only {{present: true|false}} applies")
    options = [spec.normalise(v) for v in wanted]
    if not options:
        raise ValueError(f"{key}: an empty list never matches")
    listed = ", ".join(_short(o) for o in options)
    phrase = ("is", "is not") if len(options) == 1 else ("is one of", "is none of")
    if spec.kind == ADDRESS:

        def holds(values: Values) -> bool:
            return any(_in_network(v, net) for v in values for net in options)

        phrase = ("is in", "is not in") if len(options) == 1 else ("is in one of", "is in none of")
    else:

        def holds(values: Values) -> bool:
            return any(v == o for v in values for o in options)

    return Test(key, spec.read, holds, f"{phrase[0]} {listed}", f"{phrase[1]} {listed}")


def _in_network(address: str, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped and network.version == 4:
        ip = ip.ipv4_mapped
    return ip in network


def _names(value: Any, kind: str) -> tuple[str, ...]:
    """The strings a pattern is tried against: a UID also by its keyword."""
    if kind == UID_KIND and isinstance(value, UID) and value.keyword:
        return (str(value), value.keyword)
    return (value.written if isinstance(value, Number) else str(value),)


def _regex(key: str, spec: Field, args: Mapping[str, Any]) -> Test:
    pattern = _text(args["regex"])
    try:
        compiled = re.compile(pattern)
    except (re.error, OverflowError) as exc:  # OverflowError: a repeat count past the compiler's limit
        raise ValueError(f"{key}: bad regular expression {pattern!r}: {exc}") from None

    def holds(values: Values) -> bool:
        return any(compiled.search(name) for v in values for name in _names(v, spec.kind))

    return Test(key, spec.read, holds, f"matches /{pattern}/", f"does not match /{pattern}/")


def _glob(key: str, spec: Field, args: Mapping[str, Any]) -> Test:
    pattern = _text(args["glob"])

    def holds(values: Values) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for v in values for name in _names(v, spec.kind))

    return Test(key, spec.read, holds, f"matches glob {pattern!r}", f"does not match glob {pattern!r}")


def _range(key: str, spec: Field, args: Mapping[str, Any]) -> Test:
    low = _number(args.get("min", -math.inf))
    high = _number(args.get("max", math.inf))
    if low > high:
        raise ValueError(f"{key}: min {low:g} is greater than max {high:g}")
    shown = f"[{_short(low)}, {_short(high)}]".replace("-inf", "-∞").replace("inf", "∞")

    def holds(values: Values) -> bool:
        return any(isinstance(v, float) and low <= v <= high for v in values)

    return Test(key, spec.read, holds, f"is within {shown}", f"is not within {shown}")


def _present(key: str, spec: Field, args: Mapping[str, Any]) -> Test:
    wanted = args["present"]
    if not isinstance(wanted, bool):
        raise ValueError(f"{key}: present takes true or false, got {wanted!r}")

    def holds(values: Values) -> bool:
        return bool(values) == wanted

    yes, no = ("is present", "is absent") if wanted else ("is absent as required", "is present")
    return Test(key, spec.read, holds, yes, no)


@dataclass(frozen=True)
class Operator:
    """A mapping value's operator: its keys, the kinds of values it applies to, and how to build its test."""

    keys: frozenset[str]
    kinds: frozenset[str]
    build: Callable[[str, Field, Mapping[str, Any]], Test]


_COMPARABLE = frozenset({TEXT, NUMBER, UID_KIND})
OPERATORS: tuple[Operator, ...] = (
    Operator(frozenset({"regex"}), _COMPARABLE, _regex),
    Operator(frozenset({"glob"}), _COMPARABLE, _glob),
    Operator(frozenset({"min", "max"}), frozenset({NUMBER}), _range),
    Operator(frozenset({"present"}), frozenset({TEXT, NUMBER, UID_KIND, PRESENCE}), _present),
)


def _test(key: str, value: Any) -> Test:
    spec = _field(key)
    if isinstance(value, Mapping):
        given = set(value)
        for operator in OPERATORS:
            if given and given <= operator.keys:
                if spec.kind not in operator.kinds:
                    raise ValueError(f"{key}: {'/'.join(sorted(given))} does not apply to {spec.kind} values")
                return operator.build(key, spec, value)
        known = ", ".join("/".join(sorted(op.keys)) for op in OPERATORS)
        raise ValueError(f"{key}: unknown operator {', '.join(sorted(map(str, given))) or '{}'}; known: {known}")
    return _equals(key, spec, value if isinstance(value, list) else [value])


# -- combining ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class All:
    """Every part must hold (the keys of one `match` mapping)."""

    parts: tuple[Condition, ...]

    def evaluate(self, facts: Facts) -> tuple[bool, str]:
        said = []
        for part in self.parts:
            result, why = part.evaluate(facts)
            if not result:
                return False, why
            said.append(why)
        return True, "; ".join(said) if said else "the rule has no match conditions"


@dataclass(frozen=True)
class AnyOf:
    """At least one part must hold (`any:`)."""

    parts: tuple[Condition, ...]

    def evaluate(self, facts: Facts) -> tuple[bool, str]:
        failed = []
        for part in self.parts:
            result, why = part.evaluate(facts)
            if result:
                return True, f"any: {why}"
            failed.append(why)
        return False, f"none of any: {' | '.join(failed)}"


@dataclass(frozen=True)
class Not:
    """The part must not hold (`not:`)."""

    part: Condition

    def evaluate(self, facts: Facts) -> tuple[bool, str]:
        result, why = self.part.evaluate(facts)
        return (not result), (f"{why} (excluded by not:)" if result else why)


def compile_match(match: Mapping[str, Any] | None, where: str = "match") -> Condition:
    """Compile a `match` mapping; raise ValueError naming the key path of every problem, one a line."""
    if match is None:
        return All(())
    if not isinstance(match, Mapping):
        raise ValueError(f"{where}: must be a mapping of keys to conditions, got {match!r}")
    return All(tuple(_compile_all([(f"{where}.{key}", key, value) for key, value in match.items()])))


def _compile_all(items: list[tuple[str, Any, Any]]) -> list[Condition]:
    """Compile each (path, key, value) of a match; raise ValueError with the problems of all of them."""
    parts: list[Condition] = []
    problems: list[str] = []
    for path, key, value in items:
        try:
            parts.append(_part(path, key, value))
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError("\n".join(problems))
    return parts


def _part(path: str, key: Any, value: Any) -> Condition:
    """One key of a match: `any:` (a list of matches), `not:` (a match) or a test of a fact or element."""
    if key == "any":
        if not isinstance(value, list) or not value:
            raise ValueError(f"{path}: must be a non-empty list of matches")
        return AnyOf(tuple(_compile_all([(f"{path}.{i}", None, m) for i, m in enumerate(value)])))
    if key is None:  # an item of `any:`
        return _nested(value, path)
    if key == "not":
        return Not(_nested(value, path))
    try:
        return _test(str(key), value)
    except ValueError as exc:
        message = str(exc)
        raise ValueError(
            message.replace(f"{key}: ", f"{path}: ", 1) if message.startswith(f"{key}: ") else f"{path}: {message}"
        ) from None


def _nested(match: Any, where: str) -> Condition:
    """A match under `any:` or `not:`: an empty one (always true) is surely a mistake, so it is refused."""
    if match is None or match == {}:
        raise ValueError(f"{where}: an empty match always holds; give at least one key")
    return compile_match(match, where)
