"""A seeded, template-built assistant corpus whose objectives genuinely conflict.

Every response is assembled from sentence pools of one topic: on-topic facts (relevant, neutral, long),
cautionary facts (relevant but negative), short answers (brief, weakly relevant), curt gloomy remarks (the
briefest, negative), cheerful filler and off-topic chatter (positive but irrelevant and long). A response
*style* picks how many of each, so the best response for positivity (VADER) is not the best for relevance
or brevity, and every pair of objectives conflicts: the most positive answers are long, the briefest are
negative or neutral. A tiny LM can still learn the whole language (about a thousand words) in minutes on a
CPU.

Responses are stored without a leading space; training text is `prompt + " " + response`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PROMPT_TEMPLATE = "\n\nHuman: {question}\n\nAssistant:"
MAX_WORDS = 60


@dataclass(frozen=True)
class Topic:
    """One subject area: its subjects, question templates and sentence pools.

    `{s}` is the subject; `{my}` inside a subject reads "my" in questions and "your" in answers. Facts, quick
    answers and cautions name the subject (relevant), tips and shorts do not (vaguer), chatter is positive small talk
    that other topics' answers drift into (irrelevant).
    """

    name: str
    subjects: tuple[str, ...]
    questions: tuple[str, ...]
    facts: tuple[str, ...]
    tips: tuple[str, ...]
    cautions: tuple[str, ...]
    shorts: tuple[str, ...]
    quick: tuple[str, ...]
    chatter: tuple[str, ...]


def _tuples(value):
    """JSON lists back into the tuples the frozen dataclasses (and the corpus's hashing) use."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _load_pools() -> dict:
    """The sentence pools: text, kept as package data (demo/data/corpus_pools.json) rather than code."""
    import json
    from importlib.resources import files

    return json.loads(files("moalign.demo").joinpath("data/corpus_pools.json").read_text(encoding="utf-8"))


_POOLS = _load_pools()
TOPICS: tuple[Topic, ...] = tuple(
    Topic(**{key: _tuples(value) for key, value in topic.items()}) for topic in _POOLS["topics"]
)
# Situations the asker mentions before the question: (what the asker says, a plain answer to it, a gloomy one
# that restates it). Answers that address more of them cover more of the prompt: more relevant and longer.
CONTEXTS: tuple[tuple[str, str, str], ...] = _tuples(_POOLS["contexts"])
CONTEXTS_PER_PROMPT = 5
CHEERFUL_OPENERS, NEUTRAL_OPENERS, GLOOMY_OPENERS = (
    _tuples(_POOLS[k]) for k in ("cheerful_openers", "neutral_openers", "gloomy_openers")
)
ECHO_OPENERS, ECHO_CLOSERS = _tuples(_POOLS["echo_openers"]), _tuples(_POOLS["echo_closers"])
GLOOMY_ECHOES, GLOOMY_ECHO_CLOSERS = _tuples(_POOLS["gloomy_echoes"]), _tuples(_POOLS["gloomy_echo_closers"])
MILD_FILLER, CHEERFUL_FILLER = _tuples(_POOLS["mild_filler"]), _tuples(_POOLS["cheerful_filler"])
CHATTER_LEADS = _tuples(_POOLS["chatter_leads"])
NEUTRAL_CLOSERS, CHEERFUL_CLOSERS = _tuples(_POOLS["neutral_closers"]), _tuples(_POOLS["cheerful_closers"])
CURT_REMARKS = _tuples(_POOLS["curt_remarks"])  # two or three words: the briefest answers of all, and negative
GLOOMY_CLOSERS = _tuples(_POOLS["gloomy_closers"])
QUESTION_PREFIXES = _tuples(_POOLS["question_prefixes"])


# Response styles and how often each occurs. Terse styles are vague (no subject, no situation), detailed
# ones cover the subject and every situation, cheerful ones trade content for warmth, cautious ones cover
# the question with warnings: that is where the objectives conflict.
STYLES = {
    "short": 0.11,
    "curt": 0.10,
    "upbeat": 0.08,
    "vague": 0.08,
    "direct": 0.12,
    "detailed": 0.13,
    "cautious": 0.10,
    "cheerful": 0.12,
    "chatty": 0.07,
    "warm": 0.12,
    "mixed": 0.05,
}
KINDS = (
    "remark",
    "opener",
    "echo",
    "short",
    "quick",
    "tip",
    "fact",
    "context",
    "caution",
    "mild",
    "filler",
    "chatter",
    "echo_close",
    "closer",
)


def _draw_counts(style: str, rng: random.Random, n_contexts: int) -> dict[str, int]:
    """How many sentences of each kind a response of this style holds."""
    r = rng.randint
    counts = dict.fromkeys(KINDS, 0)
    if style == "short":
        draw = rng.random()  # one or two vague tips, or a vague tip and a specific one
        counts.update(short=1 + int(draw < 0.3), quick=int(draw > 0.65))
    elif style == "curt":  # one gloomy remark: brief and negative
        counts.update(remark=1)
    elif style == "upbeat":  # a cheerful opener on a short answer: brief and positive, a little longer than curt
        counts.update(opener=1, short=1, closer=r(0, 1))
    elif style == "vague":
        counts.update(opener=r(0, 1), tip=r(1, 2), short=r(0, 1), mild=int(rng.random() < 0.3))
    elif style == "direct":
        counts.update(opener=r(0, 1), echo=r(0, 1), quick=r(0, 1), fact=r(1, 2), context=r(0, 3))
        counts.update(mild=int(rng.random() < 0.3))
    elif style == "detailed":
        counts.update(echo=r(0, 1), fact=r(1, 2), context=r(n_contexts - 3, n_contexts), echo_close=r(0, 1))
    elif style == "cautious":
        counts.update(echo=1, caution=r(1, 2), context=r(0, 2))
    elif style == "cheerful":
        counts.update(opener=1, short=r(0, 1), filler=r(3, 6), closer=1)
    elif style == "chatty":
        counts.update(opener=r(0, 1), chatter=r(1, 2), filler=r(0, 2))
    elif style == "warm":
        counts.update(opener=1, fact=r(1, 2), context=r(1, 3), filler=r(1, 3), closer=1)
    else:
        counts.update({kind: r(0, 2) for kind in KINDS}, context=r(0, n_contexts))
        counts.update(opener=r(0, 1), echo=r(0, 1), echo_close=r(0, 1), closer=r(0, 1), chatter=r(0, 1))
    counts["context"] = min(counts["context"], n_contexts)
    return counts


def _pick(pool: tuple[str, ...], k: int, rng: random.Random) -> list[str]:
    return rng.sample(pool, min(k, len(pool)))


@dataclass(frozen=True)
class Question:
    """A question before it is put into a prompt: which topic, template and subject made it."""

    topic: int
    template: int
    subject: int

    def text(self) -> str:
        topic = TOPICS[self.topic]
        question = topic.questions[self.template].format(s=topic.subjects[self.subject].format(my="my"))
        return question[0].upper() + question[1:]


def all_questions() -> list[Question]:
    return [
        Question(t, q, s)
        for t, topic in enumerate(TOPICS)
        for q in range(len(topic.questions))
        for s in range(len(topic.subjects))
    ]


def make_prompt(question: Question, contexts: tuple[int, ...] = (), prefix: str = "") -> str:
    """The HH-style prompt: an optional greeting, the asker's situation, then the question."""
    situation = "".join(CONTEXTS[c][0] + " " for c in contexts)
    return PROMPT_TEMPLATE.format(question=prefix + situation + question.text())


def make_response(question: Question, contexts: tuple[int, ...], rng: random.Random, style: str | None = None) -> str:
    """One response to `question` asked in `contexts`: sentences from the pools in the proportions of a style."""
    topic = TOPICS[question.topic]
    subject = topic.subjects[question.subject].format(my="your")
    if style is None:
        style = rng.choices(list(STYLES), weights=list(STYLES.values()))[0]
    counts = _draw_counts(style, rng, len(contexts))
    gloomy = False
    if counts["filler"] or counts["chatter"] or style == "upbeat":
        openers, closers = CHEERFUL_OPENERS, CHEERFUL_CLOSERS
    elif counts["caution"] > counts["fact"] or counts["remark"]:
        openers, closers, gloomy = GLOOMY_OPENERS, GLOOMY_CLOSERS, True
    else:
        openers, closers = NEUTRAL_OPENERS, NEUTRAL_CLOSERS

    body = _pick(topic.shorts, counts["short"], rng) + _pick(topic.quick, counts["quick"], rng)
    body += _pick(topic.tips, counts["tip"], rng) + _pick(topic.facts, counts["fact"], rng)
    body += _pick(topic.cautions, counts["caution"], rng)
    body += [CONTEXTS[c][2 if gloomy else 1] for c in rng.sample(contexts, counts["context"])]
    rng.shuffle(body)
    extra = _pick(MILD_FILLER, counts["mild"], rng) + _pick(CHEERFUL_FILLER, counts["filler"], rng)
    others = [t for i, t in enumerate(TOPICS) if i != question.topic]
    for _ in range(counts["chatter"]):
        line = rng.choice(rng.choice(others).chatter)
        line = line if line.startswith("I ") else line[0].lower() + line[1:]
        extra.insert(rng.randint(0, len(extra)), f"{rng.choice(CHATTER_LEADS)} {line}")
    if not body and not extra and not counts["remark"]:
        body.append(rng.choice(topic.shorts))
    sentences = (
        _pick(CURT_REMARKS, counts["remark"], rng)
        + [rng.choice(openers)] * counts["opener"]
        + [rng.choice(GLOOMY_ECHOES if gloomy else ECHO_OPENERS)] * counts["echo"]
        + body
        + extra
        + [rng.choice(GLOOMY_ECHO_CLOSERS if gloomy else ECHO_CLOSERS)] * counts["echo_close"]
        + [rng.choice(closers)] * counts["closer"]
    )
    asked = question.text()
    sentences = [sentence.format(s=subject, q=asked) for sentence in sentences]

    # Keep within MAX_WORDS by dropping sentences from the end, but never the whole answer.
    kept: list[str] = []
    words = 0
    for sentence in sentences:
        n = len(sentence.split())
        if kept and words + n > MAX_WORDS:
            break
        kept.append(sentence)
        words += n
    text = " ".join(kept)
    return text[0].upper() + text[1:]


@dataclass
class Corpus:
    """The generated data before scoring: training samples and the held-out test split."""

    prompts: list[str]
    responses: list[str]
    test_prompts: list[str]
    test_responses: list[str]  # one reference response per test prompt, for perplexity

    def texts(self) -> list[str]:
        """Training text of every sample: prompt, one space, response (the EOS token is added later)."""
        return [f"{p} {r}" for p, r in zip(self.prompts, self.responses)]


def build_corpus(n_samples: int = 20000, n_test: int = 300, responses_per_prompt: int = 4, seed: int = 0) -> Corpus:
    """Generate `n_samples` (prompt, response) samples and `n_test` prompts whose questions training never sees.

    Whole questions (topic, template, subject) are held out, so a test prompt asks something new, not the
    same question in a new situation. Each training prompt gets `responses_per_prompt` distinct responses of
    random styles, which is what makes preference pairs possible.
    """
    rng = random.Random(seed)
    questions = all_questions()
    rng.shuffle(questions)
    n_held = max(1, min(len(questions) // 8, n_test))
    held, seen = questions[:n_held], questions[n_held:]

    def situation() -> tuple[int, ...]:
        return tuple(rng.sample(range(len(CONTEXTS)), CONTEXTS_PER_PROMPT))

    n_prompts = -(-n_samples // responses_per_prompt)
    prompts: list[str] = []
    responses: list[str] = []
    for i in range(n_prompts):
        question = seen[i % len(seen)]
        contexts = situation()
        prompt = make_prompt(question, contexts, rng.choice(QUESTION_PREFIXES))
        made: list[str] = []
        for _ in range(responses_per_prompt * 5):  # a few retries so the responses to one prompt are distinct
            if len(made) == responses_per_prompt:
                break
            response = make_response(question, contexts, rng)
            if response not in made:
                made.append(response)
        prompts += [prompt] * len(made)
        responses += made
    prompts, responses = prompts[:n_samples], responses[:n_samples]

    test_prompts: list[str] = []
    test_responses: list[str] = []
    for i in range(n_test):
        question, contexts = held[i % len(held)], situation()
        test_prompts.append(make_prompt(question, contexts, rng.choice(QUESTION_PREFIXES)))
        test_responses.append(make_response(question, contexts, rng))
    return Corpus(prompts, responses, test_prompts, test_responses)
