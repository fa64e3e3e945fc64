"""The objective interface and the registry that builds objectives from short specs.

A spec is `KIND` or `KIND:ARGUMENT`, optionally followed by `?key=value&key=value` options, e.g.
`vader`, `hf:Ray2333/gpt2-large-harmless-reward_model?logit=0&pair=true`, `python:mypkg.rewards:fn`.
In YAML an objective may also be a mapping `{spec: ..., name: ..., <option>: ...}`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from moalign.errors import MoalignError, first_line


class Objective:
    """Scores a batch of (prompt, response) pairs: one float per pair, higher is better."""

    spec: str = ""
    name: str = ""

    @property
    def cache_key(self) -> str:
        """What identifies this objective's scores in the score cache (the spec, by default)."""
        return self.spec

    def _score(self, prompts: list[str], responses: list[str]) -> Sequence[float]:
        raise NotImplementedError

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Score the pairs and check the result: one finite float per pair."""
        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses):
            raise MoalignError(f"objective {self.name}: {len(prompts)} prompts but {len(responses)} responses")
        if not responses:
            return np.zeros(0)
        # An image response (objectives.image.ImageResponse) is scored as the image it carries.
        payloads = [getattr(response, "image", response) for response in responses]
        try:
            raw = self._score(prompts, payloads)
        except MoalignError:
            raise
        except Exception as error:  # a user's scorer: name it and say what it raised, in one line
            raise MoalignError(f"objective {self.name} failed: {type(error).__name__}: {first_line(error)}") from None
        try:
            values = np.asarray(raw, dtype=float).reshape(-1)
        except (TypeError, ValueError):
            raise MoalignError(
                f"objective {self.name} returned {type(raw).__name__} values that are not numbers; "
                "it must return one float per sample"
            ) from None
        if values.size != len(responses):
            raise MoalignError(
                f"objective {self.name} returned {values.size} scores for {len(responses)} samples; "
                "it must return one per sample"
            )
        if not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).sum())
            raise MoalignError(f"objective {self.name} returned {bad} NaN or infinite scores; fix the scorer")
        return values


@dataclass(frozen=True)
class ObjectiveKind:
    factory: Callable[..., Objective]
    summary: str
    needs: str


REGISTRY: dict[str, ObjectiveKind] = {}


def register(kind: str, summary: str, needs: str = "nothing extra"):
    """Class or function decorator adding a factory `factory(argument, **options)` under `kind`."""

    def wrap(factory):
        REGISTRY[kind] = ObjectiveKind(factory, summary, needs)
        return factory

    return wrap


def _coerce(value: str):
    lowered = value.lower()
    if lowered in {"true", "yes"}:
        return True
    if lowered in {"false", "no"}:
        return False
    if re.fullmatch(r"[+-]?\d+", value):
        return int(value)
    try:
        return float(value)
    except ValueError:
        return value


def parse_spec(spec: str) -> tuple[str, str, dict]:
    """'hf:path?logit=1' -> ('hf', 'path', {'logit': 1})."""
    body, _, query = spec.partition("?")
    kind, _, argument = body.partition(":")
    options = {}
    for part in filter(None, query.split("&")):
        key, sep, value = part.partition("=")
        if not sep:
            raise MoalignError(f"objective spec {spec!r}: option {part!r} must be key=value")
        options[key.strip()] = _coerce(value.strip())
    return kind.strip(), argument.strip(), options


def build(spec: str | dict) -> Objective:
    """Build an objective from a spec string (or a YAML mapping with a `spec` key)."""
    if isinstance(spec, dict):
        options = dict(spec)
        text = options.pop("spec", None)
        if not isinstance(text, str):
            raise MoalignError(f"objective {spec!r} needs a 'spec' string")
        kind, argument, query = parse_spec(text)
        options = {**query, **options}
    else:
        text = spec
        kind, argument, options = parse_spec(spec)
    if kind not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise MoalignError(f"unknown objective {text!r}; available kinds: {known} (see `moalign objectives`)")
    name = options.pop("name", None)
    try:
        objective = REGISTRY[kind].factory(argument, **options)
    except TypeError as error:
        raise MoalignError(f"objective {text!r}: bad option ({error})") from None
    objective.spec = text
    objective.name = str(name or objective.name or kind)
    return objective


def build_all(specs: Sequence[str | dict] | str) -> list[Objective]:
    """Build several objectives from a list or a comma-separated string."""
    if isinstance(specs, str):
        specs = [part for part in specs.split(",") if part.strip()]
    objectives = [build(spec.strip() if isinstance(spec, str) else spec) for spec in specs]
    names = [objective.name for objective in objectives]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise MoalignError(f"objective names must be unique; give `?name=...` to tell apart: {duplicated}")
    if not objectives:
        raise MoalignError("no objectives given")
    return objectives
