"""moalign: multi-objective alignment of foundation models on the Hugging Face stack."""

__version__ = "0.1.0"
