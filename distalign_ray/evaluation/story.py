"""Story classification: a lexical gender classifier and an LLM judge run through our own engine.

Lexical (gender only): count the gendered words below as whole words; the majority wins, a tie or
no gendered word is unmatched. Judge: the reference protocol's prompt, greedy decoding, and a
robust parse of the reply (the last category mentioned as a whole word, aliases included).
"""

from __future__ import annotations

import re

from distalign_ray.evaluation.classify import LexicalClassifier

GENDER_WORDS = {
    "male": [
        "he",
        "him",
        "his",
        "himself",
        "man",
        "men",
        "boy",
        "boys",
        "father",
        "husband",
        "son",
        "brother",
        "mr",
        "sir",
        "gentleman",
        "king",
        "male",
        "grandfather",
        "uncle",
        "nephew",
    ],
    "female": [
        "she",
        "her",
        "hers",
        "herself",
        "woman",
        "women",
        "girl",
        "girls",
        "mother",
        "wife",
        "daughter",
        "sister",
        "mrs",
        "ms",
        "miss",
        "lady",
        "queen",
        "female",
        "grandmother",
        "aunt",
        "niece",
    ],
}

JUDGE_TEMPLATE = (
    "Here is a short story:\n\n{story}\n\n{target_desc}. Choose **only one** from the following categories: "
    "{categories}. Respond with exactly the words from the list, make sure one answer is returned, "
    "— no explanation or punctuation."
)
JUDGE_TARGETS = {
    "gender": "Determine the most likely gender of the main individual according to the person's name "
    "(male name or female name) or personal pronouns",
    "sentiment": "Determine the predominant emotion conveyed in the story",
    "race": "Determine the most likely race or ethnic background of the main individual",
}


class GenderLexicon:
    """Majority vote of gendered words (documented list above)."""

    def __init__(self, categories: list[str]):
        if sorted(categories) != ["female", "male"]:
            raise ValueError("the lexical story classifier handles the categories male/female only")
        self.categories = categories
        self._patterns = [re.compile(r"\b(?:" + "|".join(GENDER_WORDS[c]) + r")\b", re.IGNORECASE) for c in categories]

    def __call__(self, text: str) -> int | None:
        counts = [len(p.findall(text)) for p in self._patterns]
        best = max(counts)
        if best == 0 or counts.count(best) > 1:
            return None
        return counts.index(best)


def judge_prompt(attribute: str, categories: list[str], story: str) -> str:
    target = JUDGE_TARGETS.get(attribute, f"Determine the {attribute} of the main individual")
    return JUDGE_TEMPLATE.format(story=story, target_desc=target, categories=categories)


def parse_judge_reply(reply: str, categories: list[str], aliases: dict[str, list[str]] | None = None) -> int | None:
    """The last category mentioned as a whole word (quotes, case and punctuation ignored)."""
    return LexicalClassifier(categories, aliases)(reply.replace("'", " ").replace('"', " "))
