"""`pm:RUN_DIR/PRINCIPLE`: one of the per-principle preference models a `moalign pm` run trained (MORLAIF).

Scoring reuses `hf:`'s HFRewardModel; only the text differs: the prompt and response are joined and
closed with EOS exactly as `moalign pm` joined them for RewardTrainer, so a score means what it meant
in training, and long texts lose their start rather than the response.
"""

from __future__ import annotations

from pathlib import Path

from moalign.errors import MoalignError
from moalign.objectives.base import register
from moalign.objectives.hf import HFRewardModel

PRINCIPLES_DIR = "principles"


def join_text(prompt: str, response: str) -> str:
    """Prompt and response as one text: a space between them unless one side already has one."""
    if prompt and response and not prompt[-1].isspace() and not response[0].isspace():
        return f"{prompt} {response}"
    return prompt + response


def resolve(argument: str) -> tuple[Path, str]:
    """'RUN_DIR/PRINCIPLE' -> (model folder, principle), checked against the run's manifest."""
    from moalign.run import read_manifest

    if not argument or "/" not in argument.strip("/"):
        raise MoalignError(f"pm objective needs RUN_DIR/PRINCIPLE, got pm:{argument}")
    run_dir, principle = Path(argument.rstrip("/")).parent, Path(argument.rstrip("/")).name
    if run_dir.name == PRINCIPLES_DIR and not (run_dir / "moalign.json").exists():
        run_dir = run_dir.parent  # pm:RUN_DIR/principles/NAME works too
    manifest = read_manifest(run_dir)
    if manifest["method"] != "pm":
        raise MoalignError(f"pm:{argument}: {run_dir} is a {manifest['method']!r} run, not a `moalign pm` run")
    trained = manifest.get("principles", {})
    if principle not in trained:
        raise MoalignError(f"pm:{argument}: {run_dir} has no principle {principle!r}; it has {', '.join(trained)}")
    return run_dir / trained[principle]["path"], principle


@register(
    "pm",
    "a per-principle preference model of `moalign pm`, pm:RUN_DIR/PRINCIPLE; options as hf",
    "a `moalign pm` run directory",
)
class PreferenceModel(HFRewardModel):
    def __init__(self, argument: str, **options):
        path, principle = resolve(argument)
        self._load(path, principle, **options)

    @classmethod
    def from_folder(cls, path: str | Path, **options) -> PreferenceModel:
        """A model folder read directly (while its run is still training, before the manifest exists)."""
        objective = cls.__new__(cls)
        objective._load(Path(path), Path(path).name, **options)
        return objective

    def _load(self, path: Path, principle: str, **options) -> None:
        if "input" in options:
            raise MoalignError(f"pm:{principle}: the text format is fixed by training; drop the input option")
        HFRewardModel.__init__(self, str(path), **options)
        self.name = principle
        self.tokenizer.truncation_side = "left"  # keep the response, which is what is judged

    def _encode(self, prompts: list[str], responses: list[str]):
        eos = self.tokenizer.eos_token or ""
        texts = [join_text(p, r) for p, r in zip(prompts, responses)]
        texts = [t if t.endswith(eos) else t + eos for t in texts]  # RewardTrainer appends EOS too
        return self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
