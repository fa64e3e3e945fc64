"""The recipes shipped with moalign: the embedded demo's and the papers' setups, and accelerate launch files.

In a checkout they are also at the repository's `configs/` (a link to this folder).
"""

from __future__ import annotations

from pathlib import Path

from moalign.errors import MoalignError

FOLDER = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """The shipped config file `name`, e.g. `path("ric_demo.yaml")`."""
    found = FOLDER / name
    if not found.is_file():
        raise MoalignError(f"moalign ships no config {name!r}; see {FOLDER}")
    return found
