"""MODPO (Zhou et al., 2024): multi-objective DPO, one model per preference, and plain DPO, its margin model.

- `trainer`: MODPO's loss as TRL's DPOTrainer with shifted reference log-probabilities and β' = β/w_k
- `pairs`: the trained objective's preference pairs
- `margins`: the other objectives' rewards (objective scores or a DPO model's implicit reward)
- `recipe`: the configs, the per-preference stages and the `moalign modpo` / `moalign dpo` commands
"""

from moalign.methods.modpo.margins import check_margins, compute_margins, implicit_rewards, sequence_logps
from moalign.methods.modpo.pairs import (
    completion_text,
    load_pairs,
    pairs_from_choice,
    pairs_from_scores,
    training_dataset,
)
from moalign.methods.modpo.recipe import DPORunConfig, MODPOConfig, cli, dpo_cli, train, train_dpo
from moalign.methods.modpo.trainer import (
    MARGIN_CHOSEN,
    MARGIN_COLUMNS,
    MARGIN_REJECTED,
    DataCollatorForMODPO,
    MODPOTrainer,
    check_trainer_weights,
    modpo_loss,
)

__all__ = [
    "MARGIN_CHOSEN",
    "MARGIN_COLUMNS",
    "MARGIN_REJECTED",
    "DPORunConfig",
    "DataCollatorForMODPO",
    "MODPOConfig",
    "MODPOTrainer",
    "check_margins",
    "check_trainer_weights",
    "cli",
    "completion_text",
    "compute_margins",
    "dpo_cli",
    "implicit_rewards",
    "load_pairs",
    "modpo_loss",
    "pairs_from_choice",
    "pairs_from_scores",
    "sequence_logps",
    "train",
    "train_dpo",
    "training_dataset",
]
