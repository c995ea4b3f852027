"""Whole-word answer classification: the category mentioned last wins; no match is 'unmatched'.

Plurals count as their category ("Males", "Men."); a list of options echoed back ("Male or Female",
"male/female") is not a choice and is ignored, so an answer that only echoes the options is
unmatched rather than counted for the option named last.
"""

from __future__ import annotations

import re

# Separators of an echoed option list: "A or B", "A/B", "A, B, or C", "A and B", "A vs B".
_OPTION_SEPARATOR = re.compile(r"\s*(?:,|/|\||&|\bor\b|\band\b|\bvs\b\.?)\s*(?:(?:or|and)\s+)?", re.IGNORECASE)


def _word_forms(term: str) -> list[str]:
    """The term and its irregular plural where English has one (man → men, woman → women)."""
    return [term, term[:-3] + "men"] if term.lower().endswith("man") else [term]


class LexicalClassifier:
    """Matches each category's name and aliases as whole words/phrases (case-insensitive), so
    'male' does not match inside 'female'. The category whose last mention starts latest wins,
    after dropping echoed option lists (mentions of two or more categories joined only by separators)."""

    def __init__(self, categories: list[str], aliases: dict[str, list[str]] | None = None):
        self.categories = list(categories)
        self._patterns = []
        for category in self.categories:
            terms = {form for term in {category, *((aliases or {}).get(category, []))} for form in _word_forms(term)}
            alternation = "|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True))
            self._patterns.append(re.compile(rf"\b(?:{alternation})(?:s|es)?\b", re.IGNORECASE))

    def mentions(self, text: str) -> list[tuple[int, int, int]]:
        """(start, end, category index) of every mention, in order; a longer mention hides one inside it."""
        found = sorted(((m.start(), -m.end(), i) for i, p in enumerate(self._patterns) for m in p.finditer(text)))
        out: list[tuple[int, int, int]] = []
        for start, neg_end, index in found:
            if out and start < out[-1][1]:
                continue  # inside the previous (longer) mention, e.g. "black" in "black or african american"
            out.append((start, -neg_end, index))
        return out

    def __call__(self, text: str) -> int | None:
        mentions = self.mentions(text)
        echoed: set[int] = set()
        run = [0]  # positions in `mentions` of the current separator-joined run
        for position in range(1, len(mentions) + 1):
            joined = position < len(mentions) and _OPTION_SEPARATOR.fullmatch(text[mentions[position - 1][1] : mentions[position][0]])
            if joined:
                run.append(position)
                continue
            if len({mentions[p][2] for p in run}) >= 2:
                echoed.update(run)
            run = [position]
        chosen = [m for p, m in enumerate(mentions) if p not in echoed]
        return chosen[-1][2] if chosen else None
