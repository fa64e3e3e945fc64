"""Everything that scores (prompt, response) pairs, built from short specs by a registry."""

from moalign.objectives import hf, image, lexical, preference, python, relevance  # noqa: F401  (registers the kinds)
from moalign.objectives.base import REGISTRY, Objective, build, build_all, parse_spec, register

__all__ = ["REGISTRY", "Objective", "build", "build_all", "parse_spec", "register", "describe"]


def describe() -> str:
    """The table `moalign objectives` prints."""
    rows = [f"{'kind':<12} {'what it scores':<70} needs"]
    for kind in sorted(REGISTRY):
        entry = REGISTRY[kind]
        rows.append(f"{kind:<12} {entry.summary:<70} {entry.needs}")
    return "\n".join(rows)


def cli(argv: list[str]) -> None:
    print(describe())
