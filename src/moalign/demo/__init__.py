"""The embedded demo task: a corpus with conflicting objectives and a tiny base model, no downloads."""

from moalign.demo.pipeline import cli

__all__ = ["cli"]
