"""Training losses, pure torch (no Ray): steering KL, KTO, SFT, and their hybrid."""

from distalign_ray.losses.dpo import dpo_loss
from distalign_ray.losses.hybrid import HybridLossWeights, combine_losses
from distalign_ray.losses.kto import KTOOutput, kto_loss
from distalign_ray.losses.sft import Reduction, sft_loss
from distalign_ray.losses.steering_kl import steering_kl_loss, steering_log_probs

__all__ = [
    "dpo_loss",
    "KTOOutput",
    "kto_loss",
    "Reduction",
    "sft_loss",
    "steering_kl_loss",
    "steering_log_probs",
    "HybridLossWeights",
    "combine_losses",
]
