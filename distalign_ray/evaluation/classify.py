"""Whole-word answer classification: the category mentioned last wins; no match is 'unmatched'."""

from __future__ import annotations

import re


class LexicalClassifier:
    """Matches each category's name and aliases as whole words/phrases (case-insensitive), so
    'male' does not match inside 'female'. The category whose last mention starts latest wins."""

    def __init__(self, categories: list[str], aliases: dict[str, list[str]] | None = None):
        self.categories = list(categories)
        self._patterns = []
        for category in self.categories:
            terms = sorted({category, *((aliases or {}).get(category, []))}, key=len, reverse=True)
            alternation = "|".join(re.escape(t) for t in terms)
            self._patterns.append(re.compile(rf"\b(?:{alternation})\b", re.IGNORECASE))

    def __call__(self, text: str) -> int | None:
        best, best_start = None, -1
        for index, pattern in enumerate(self._patterns):
            starts = [m.start() for m in pattern.finditer(text)]
            if starts and starts[-1] > best_start:
                best, best_start = index, starts[-1]
        return best
