"""Built-in content patterns (content-check-admitter's `preset`), and masking them out of a text
(the audit record's redacted prompt excerpt).

Python's regular expressions try a pattern at every position unless it starts with a literal, which
costs ~20 ns a character per pattern: a few presets over a long prompt would cost more than the pick.
So each preset also says what any match must contain (`anchors`, found with `in` at memory-search
speed, in the lower-cased text for a case-insensitive one; `min_digits`, counted once per text), and its
expression runs only on a text that has it; the expressions start with a literal where they can, and
the edges a lookbehind would test are checked on the match instead (`check`: a card number's Luhn
digit too). `Text` computes the lower-cased text and the digit count once for every rule of a request.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

_DIGITS = "0123456789"
_NOT_DIGITS = bytes(c for c in range(256) if not 48 <= c <= 57)  # bytes.translate deletes these: a C loop


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


Check = Callable[[str, "re.Match[str]"], bool]


@dataclass(slots=True, frozen=True)
class Pattern:
    regex: re.Pattern[str]
    check: Check | None = None  # (text, match): the match counts only when this says so
    anchors: tuple[str, ...] = ()  # every match contains one of these (none: no such prefilter)
    lower: bool = False  # the anchors are lower-case, looked for in the lower-cased text
    min_digits: int = 0  # every match holds at least this many digits

    def _may_match(self, t: Text) -> bool:
        if self.min_digits and t.digits < self.min_digits:
            return False
        if self.anchors:
            hay = t.lower if self.lower else t.text
            return any(a in hay for a in self.anchors)
        return True

    def search(self, t: Text) -> bool:
        if not self._may_match(t):
            return False
        text = t.text
        check = self.check
        if check is None:
            return self.regex.search(text) is not None
        return any(check(text, m) for m in self.regex.finditer(text))

    def mask(self, t: Text, label: str) -> str:
        """The text with this pattern's matches replaced by `[label]`."""
        if not self._may_match(t):
            return t.text
        text = t.text
        check = self.check
        return self.regex.sub(lambda m: f"[{label}]" if check is None or check(text, m) else m.group(0), text)


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


def _alone(text: str, m: re.Match[str], before: str, after: str) -> bool:
    """Whether the match is not part of a longer run: the characters around it are not in `before`/`after`."""
    s, e = m.start(), m.end()
    return (s == 0 or text[s - 1] not in before) and (e == len(text) or text[e] not in after)


def _card(text: str, m: re.Match[str]) -> bool:
    return _alone(text, m, _DIGITS + "-", _DIGITS + "-") and luhn_ok(m.group(0))


def _ssn(text: str, m: re.Match[str]) -> bool:
    # the expression starts at the first dash (a literal: fast); the three digits before it are checked here
    s = m.start()
    return s >= 3 and text[s - 3 : s].isdigit() and (s == 3 or not text[s - 4].isdigit()) and _alone(text, m, "", _DIGITS)


def _word(chars: str) -> Check:
    return lambda text, m: _alone(text, m, chars, chars)


_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" + _DIGITS

PRESETS: dict[str, Pattern] = {
    # 13-19 digits, optionally grouped by spaces or dashes, with a valid Luhn check digit
    "card-number": Pattern(re.compile(r"\d(?:[ -]?\d){12,18}"), _card, min_digits=13),
    "us-ssn": Pattern(re.compile(r"-\d\d-\d{4}"), _ssn, anchors=("-",), min_digits=9),
    "email-address": Pattern(re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"), anchors=("@",)),
    "aws-access-key-id": Pattern(re.compile(r"A(?:KIA|SIA)[A-Z0-9]{16}"), _word(_DIGITS + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
                                 anchors=("AKIA", "ASIA")),  # fmt: skip
    "private-key": Pattern(re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"), anchors=("PRIVATE KEY-----",)),
    "openai-api-key": Pattern(re.compile(r"sk-(?:proj-|svcacct-)?[A-Za-z0-9_-]{20,}"), _word(_ALNUM), anchors=("sk-",)),
    "github-token": Pattern(re.compile(r"gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,}"), _word(_ALNUM),
                            anchors=("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")),  # fmt: skip
    "bearer-token": Pattern(re.compile(r"(?i)bearer\s+[a-z0-9._~+/-]{20,}=*"), _word(_ALNUM), anchors=("bearer",), lower=True),
}


def redact(text: str, extra: Iterable[tuple[str, Pattern]] = ()) -> str:
    """`text` with every preset's matches (and `extra`'s: (label, pattern)) replaced by `[label]`."""
    for label, pattern in (*PRESETS.items(), *extra):
        text = pattern.mask(Text(text), label)
    return text
