"""Transfer learning: fine-tuning strategies, embeddings (features) and nearest-neighbour search."""

from resnetlab.transfer.finetune import FinetuneResult, finetune, load_pretrained_source
from resnetlab.transfer.strategy import FinetuneStrategy, apply_strategy, model_parts, parameter_groups

__all__ = [
    "FinetuneResult", "FinetuneStrategy", "apply_strategy", "finetune", "load_pretrained_source", "model_parts",
    "parameter_groups",
]  # fmt: skip
