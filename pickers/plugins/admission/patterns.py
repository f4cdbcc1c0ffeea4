"""Built-in content patterns (content-check-admitter's `preset`), and masking them out of a text
(the audit record's redacted prompt excerpt).

Python's regular expressions try a pattern at every position unless it starts with a literal, which
costs 20-50 ns a character: a few presets over a long prompt would cost more than the pick. So each
preset's expression starts with a literal (the `@` of an address, the first dash of an SSN) and its
`span` finds the whole match around it and says whether it counts (the digits before the dash, the
address's local part, a card number's Luhn digit, not inside a longer word); and each preset names
what a text must contain for it to match at all (`first`: one character, found at memchr speed;
`anchors`: one of these strings; `min_digits`), so its expression runs only on a text that has it.
`Text` computes the lower-cased text and the digit count once for every rule of a request.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

_DIGITS = "0123456789"
_NOT_DIGITS = bytes(c for c in range(256) if not 48 <= c <= 57)  # bytes.translate deletes these: a C loop
_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ALNUM = _UPPER + _UPPER.lower() + _DIGITS


class Text:
    """One text being checked, with what the prefilters need computed at most once."""

    __slots__ = ("text", "_lower", "_digits")

    def __init__(self, text: str) -> None:
        self.text = text
        self._lower: str | None = None
        self._digits = -1

    @property
    def lower(self) -> str:
        if self._lower is None:
            self._lower = self.text.lower()
        return self._lower

    @property
    def digits(self) -> int:
        if self._digits < 0:  # UTF-8 keeps ASCII digits as they are, and makes no others
            self._digits = len(self.text.encode("utf-8", "surrogatepass").translate(None, _NOT_DIGITS))
        return self._digits


# (text, match of the expression) -> the span of the whole match, or None when it does not count
Span = Callable[[str, "re.Match[str]"], "tuple[int, int] | None"]


@dataclass(slots=True, frozen=True)
class Pattern:
    regex: re.Pattern[str]
    span: Span | None = None  # None: the expression's match is the match
    first: str = ""  # a character every match contains
    anchors: tuple[str, ...] = ()  # every match contains one of these (none: no such prefilter)
    lower: bool = False  # the anchors are lower-case, looked for in the lower-cased text
    min_digits: int = 0  # every match holds at least this many digits

    def _may_match(self, t: Text) -> bool:
        if self.first and self.first not in t.text:
            return False
        if self.min_digits and t.digits < self.min_digits:
            return False
        if self.anchors:
            hay = t.lower if self.lower else t.text
            for a in self.anchors:
                if a in hay:
                    return True
            return False
        return True

    def spans(self, t: Text) -> Iterable[tuple[int, int]]:
        if not self._may_match(t):
            return
        text = t.text
        span = self.span
        for m in self.regex.finditer(text):
            s = m.span() if span is None else span(text, m)
            if s is not None:
                yield s

    def search(self, t: Text) -> bool:
        if self.span is None:
            return self._may_match(t) and self.regex.search(t.text) is not None
        return next(iter(self.spans(t)), None) is not None

    def mask(self, t: Text, label: str) -> str:
        """The text with this pattern's matches replaced by `[label]`."""
        text = t.text
        out: list[str] = []
        at = 0
        for s, e in self.spans(t):
            if s < at:  # overlaps the previous match (a span that reached back)
                continue
            out.append(text[at:s])
            out.append(f"[{label}]")
            at = e
        if not out:
            return text
        out.append(text[at:])
        return "".join(out)


def luhn_ok(text: str) -> bool:
    """Whether the digits of `text` (spaces and dashes ignored) pass the Luhn check of card numbers."""
    digits = [ord(c) - 48 for c in text if "0" <= c <= "9"]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _alone(before: str, after: str) -> Span:
    """The match, when the characters around it are not in `before` / `after` (not part of a longer run)."""

    def span(text: str, m: re.Match[str]) -> tuple[int, int] | None:
        s, e = m.span()
        if (s and text[s - 1] in before) or (e < len(text) and text[e] in after):
            return None
        return s, e

    return span


_card_alone = _alone(_DIGITS + "-", _DIGITS + "-")


def _card(text: str, m: re.Match[str]) -> tuple[int, int] | None:
    s = _card_alone(text, m)
    return s if s is not None and luhn_ok(m.group(0)) else None


def _ssn(text: str, m: re.Match[str]) -> tuple[int, int] | None:
    # the expression starts at the first dash; the three digits before it are checked here
    s, e = m.span()
    if s < 3 or not text[s - 3 : s].isdigit() or (s > 3 and text[s - 4].isdigit()) or (e < len(text) and text[e].isdigit()):
        return None
    return s - 3, e


_LOCAL = frozenset(_ALNUM + "._%+-")


def _email(text: str, m: re.Match[str]) -> tuple[int, int] | None:
    # the expression starts at the @; the local part is the run of address characters before it
    s = m.start()
    while s and text[s - 1] in _LOCAL:
        s -= 1
    return None if s == m.start() else (s, m.end())


PRESETS: dict[str, Pattern] = {
    # 13-19 digits, optionally grouped by spaces or dashes, with a valid Luhn check digit
    "card-number": Pattern(re.compile(r"\d(?:[ -]?\d){12,18}"), _card, min_digits=13),
    "us-ssn": Pattern(re.compile(r"-\d\d-\d{4}"), _ssn, first="-"),
    "email-address": Pattern(re.compile(r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"), _email, first="@"),
    "aws-access-key-id": Pattern(re.compile(r"A[KS]IA[A-Z0-9]{16}"), _alone(_UPPER + _DIGITS, _UPPER + _DIGITS), first="A"),
    "private-key": Pattern(re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"), first="-", anchors=("PRIVATE KEY-----",)),
    "openai-api-key": Pattern(re.compile(r"sk-(?:proj-|svcacct-)?[A-Za-z0-9_-]{20,}"), _alone(_ALNUM, _ALNUM), first="-",
                              anchors=("sk-",)),  # fmt: skip
    "github-token": Pattern(re.compile(r"gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,}"), _alone(_ALNUM, _ALNUM),
                            first="_", anchors=("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")),  # fmt: skip
    "bearer-token": Pattern(re.compile(r"(?i)bearer\s+[a-z0-9._~+/-]{20,}=*"), _alone(_ALNUM, _ALNUM), anchors=("bearer",),
                            lower=True),  # fmt: skip
}


def redact(text: str, extra: Iterable[tuple[str, Pattern]] = ()) -> str:
    """`text` with every preset's matches (and `extra`'s: (label, pattern)) replaced by `[label]`."""
    for label, pattern in (*PRESETS.items(), *extra):
        text = pattern.mask(Text(text), label)
    return text
