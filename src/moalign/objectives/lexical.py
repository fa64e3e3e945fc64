"""Scorers from well-kept text libraries: sentiment (VADER), readability, profanity, length."""

from __future__ import annotations

import re
from functools import cache

from moalign.errors import MoalignError
from moalign.objectives.base import Objective, register

_WORD = re.compile(r"[A-Za-z0-9']+")
_SENTENCE_END = re.compile(r"[.!?]+")


@register("vader", "positivity of the response: VADER compound sentiment in [-1, 1]", "vaderSentiment")
class Vader(Objective):
    name = "vader"

    def __init__(self, argument: str = ""):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def _score(self, prompts, responses):
        return [self.analyzer.polarity_scores(text)["compound"] for text in responses]


@cache
def _hyphenator():
    import pyphen

    return pyphen.Pyphen(lang="en_US")


def flesch_reading_ease(text: str) -> float:
    """Flesch reading ease, 206.835 − 1.015·words/sentences − 84.6·syllables/words.

    Syllables come from pyphen's bundled dictionaries: textstat ≥ 0.7.9 downloads NLTK's cmudict at
    first use, which fails offline.
    """
    words = _WORD.findall(text)
    if not words:
        return 0.0
    sentences = max(1, len([s for s in _SENTENCE_END.split(text) if s.strip()]))
    hyphenator = _hyphenator()
    syllables = sum(len(hyphenator.positions(word.lower())) + 1 for word in words)
    return 206.835 - 1.015 * len(words) / sentences - 84.6 * syllables / len(words)


@register("readability", "Flesch reading ease of the response (higher is easier)", "pyphen")
class Readability(Objective):
    name = "readability"

    def __init__(self, argument: str = ""):
        pass

    def _score(self, prompts, responses):
        return [flesch_reading_ease(text) for text in responses]


@register("profanity", "share of words in the response that are not profane, in [0, 1]", "better-profanity")
class CleanWords(Objective):
    name = "profanity"

    def __init__(self, argument: str = ""):
        from better_profanity import profanity

        profanity.load_censor_words()
        self.profanity = profanity

    def _score(self, prompts, responses):
        scores = []
        for text in responses:
            words = _WORD.findall(text)
            dirty = sum(self.profanity.contains_profanity(word) for word in words)
            scores.append(1.0 - dirty / len(words) if words else 1.0)
        return scores


class _Length(Objective):
    sign = 1.0

    def __init__(self, argument: str = "", unit: str = "words", tokenizer: str | None = None):
        if unit not in {"words", "tokens"}:
            raise MoalignError(f"{self.name}: unit must be 'words' or 'tokens', got {unit!r}")
        if unit == "tokens" and not tokenizer:
            raise MoalignError(f"{self.name}?unit=tokens needs tokenizer=PATH_OR_HUB_ID")
        self.unit = unit
        self.tokenizer = None
        if tokenizer:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)

    def _score(self, prompts, responses):
        if self.tokenizer is not None:
            counts = [len(ids) for ids in self.tokenizer(responses, add_special_tokens=False)["input_ids"]]
        else:
            counts = [len(text.split()) for text in responses]
        return [self.sign * count for count in counts]


@register("length", "length of the response in words (or tokens with unit=tokens&tokenizer=...)")
class Length(_Length):
    name = "length"


@register("brevity", "minus the length of the response in words (or tokens): shorter is better")
class Brevity(_Length):
    name = "brevity"
    sign = -1.0
