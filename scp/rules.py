"""The rules engine, pure: facts about one instance in, a Decision out.

Rules are tried top to bottom and the first whose `match` holds decides; when none does, the default rule does
(never a silent drop). Which syntax each destination gets is decided here too (`candidates`), from the rule's
target and the destination's `accept` list, so the processor and `explain` cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.uid import UID

from scp import syntaxes
from scp.config import CompressSpec, Rule
from scp.matching import Facts

__all__ = ["Decision", "Delivery", "Facts", "candidates", "decide"]


@dataclass(frozen=True)
class Delivery:
    """One destination of a decision and the target the rule gives it."""

    destination: str
    compress: CompressSpec


@dataclass(frozen=True)
class Decision:
    """What to do with an instance, the rule that said so and why."""

    rule: str
    action: str
    """forward, drop or quarantine."""
    compress: CompressSpec
    deliveries: tuple[Delivery, ...]
    reason: str
    skipped: tuple[tuple[str, str], ...] = ()
    """The rules tried before it, each with why it did not match."""

    @property
    def destinations(self) -> tuple[str, ...]:
        return tuple(delivery.destination for delivery in self.deliveries)


def decide(rules: Sequence[Rule], default: Rule, facts: Facts) -> Decision:
    """Apply the first rule whose `match` holds, else `default`."""
    skipped: list[tuple[str, str]] = []
    for rule in rules:
        held, why = rule.condition.evaluate(facts)
        if held:
            return _decision(rule, why, skipped)
        skipped.append((rule.name, why))
    return _decision(default, "no rule matched", skipped)


def _decision(rule: Rule, why: str, skipped: list[tuple[str, str]]) -> Decision:
    deliveries = tuple(Delivery(r.destination, r.compress or rule.compress) for r in rule.forward)
    return Decision(rule.name, rule.action, rule.compress, deliveries, why, tuple(skipped))


def candidates(spec: CompressSpec, source_syntax: str, accept: Sequence[str] | None) -> list[CompressSpec]:
    """The targets to try for one destination, best first; `syntax=None` means: send the source as it is.

    The rule's target when the destination takes it (or declares nothing); then, or else, each other syntax of
    its `accept` list in order: the source's own syntax as it is, or a lossless syntax we encode. The fallbacks
    count when the target cannot be made for this instance (a lossy source, no pixel data). A lossy syntax is
    produced only when a rule asks for it with its parameters, never chosen on a destination's behalf.
    """
    wanted = spec.syntax or UID(source_syntax)
    if accept is None or (spec.syntax is None and wanted in accept):
        return [spec]  # sending the source as it is cannot fail
    found: list[CompressSpec] = []
    if wanted in accept:
        found.append(spec)
        if wanted == source_syntax:
            found.append(CompressSpec())  # the encoder declines what is already in the target syntax: send it so
    for syntax in accept:
        if syntax == wanted:
            continue
        if syntax == source_syntax:
            found.append(CompressSpec())
        elif syntaxes.is_lossless(syntax):
            found.append(CompressSpec(syntax=syntax, verify=spec.verify))
    return found
