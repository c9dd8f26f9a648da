"""The rules engine, pure: facts about one instance in, a Decision out. The first matching rule decides."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.uid import UID

from scp.config import CompressSpec, MatchValue, Rule

# Match keys that are facts of the association or the file meta rather than dataset keywords.
_FACT_KEYS = ("modality", "sop_class", "calling_ae", "called_ae", "transfer_syntax")


@dataclass(frozen=True)
class Facts:
    """What rules may look at: the association, the file meta and the dataset header (no pixels)."""

    calling_ae: str
    called_ae: str
    peer_address: str
    transfer_syntax: str
    sop_class_uid: str
    dataset: Dataset = field(repr=False)


@dataclass(frozen=True)
class Decision:
    """What to do with an instance, and the rule that said so."""

    rule: str
    compress: CompressSpec
    destinations: tuple[str, ...]
    reason: str


def decide(rules: Sequence[Rule], facts: Facts) -> Decision:
    """Apply the first rule whose `match` holds (a rule without `match` matches everything)."""
    for rule in rules:
        held = _conditions_held(rule, facts)
        if held is not None:
            why = "; ".join(held) if held else "the rule has no match conditions"
            return Decision(rule.name, rule.compress, tuple(rule.forward), why)
    raise LookupError("no rule matches and no catch-all rule is configured")


def _conditions_held(rule: Rule, facts: Facts) -> list[str] | None:
    """The conditions that held, or None if one failed."""
    held: list[str] = []
    for key, expected in (rule.match or {}).items():
        actual = _fact(facts, key)
        options = expected if isinstance(expected, list) else [expected]
        if actual is None or not any(_equal(actual, option) for option in options):
            return None
        held.append(f"{key} {actual!r} in {options!r}")
    return held


def _fact(facts: Facts, key: str) -> object | None:
    if key in _FACT_KEYS:
        if key == "modality":
            return facts.dataset.get("Modality")
        if key in ("sop_class", "transfer_syntax"):
            return UID(facts.sop_class_uid if key == "sop_class" else facts.transfer_syntax)
        return getattr(facts, key)
    return facts.dataset.get(key)


def _equal(actual: object, option: MatchValue) -> bool:
    if isinstance(option, int | float) and not isinstance(actual, str):
        return actual == option
    text = str(actual)
    return text == str(option) or getattr(actual, "keyword", None) == option
