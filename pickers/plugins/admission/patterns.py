"""Built-in content patterns (content-check-admitter's `preset`), and masking them out of a text
(the audit record's redacted prompt excerpt). Each preset is a regular expression, some with a check
of the match that cuts false positives (a card number's Luhn digit)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass


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


@dataclass(slots=True, frozen=True)
class Pattern:
    regex: re.Pattern[str]
    check: Callable[[str], bool] | None = None  # a match counts only when this says so

    def search(self, text: str) -> bool:
        if self.check is None:
            return self.regex.search(text) is not None
        check = self.check
        return any(check(m.group(0)) for m in self.regex.finditer(text))

    def mask(self, text: str, label: str) -> str:
        check = self.check
        return self.regex.sub(lambda m: f"[{label}]" if check is None or check(m.group(0)) else m.group(0), text)


PRESETS: dict[str, Pattern] = {
    # 13-19 digits, optionally grouped by spaces or dashes, with a valid Luhn check digit
    "card-number": Pattern(re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"), luhn_ok),
    "us-ssn": Pattern(re.compile(r"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)")),
    "email-address": Pattern(re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")),
    "aws-access-key-id": Pattern(re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")),
    "private-key": Pattern(re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")),
    "openai-api-key": Pattern(re.compile(r"(?<![A-Za-z0-9])sk-(?:proj-|svcacct-)?[A-Za-z0-9_-]{20,}")),
    "github-token": Pattern(re.compile(r"(?<![A-Za-z0-9])(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,})")),
    "bearer-token": Pattern(re.compile(r"(?i)\bbearer\s+[a-z0-9._~+/-]{20,}=*")),
}


def redact(text: str, extra: Iterable[tuple[str, Pattern]] = ()) -> str:
    """`text` with every preset's matches (and `extra`'s: (label, pattern)) replaced by `[label]`."""
    for label, pattern in (*PRESETS.items(), *extra):
        text = pattern.mask(text, label)
    return text
