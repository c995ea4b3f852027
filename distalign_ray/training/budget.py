"""How long to train, from the spec: optimizer steps that scale with the number of prompts.

Epoch counts tuned on one dataset do not transfer: a 6-context spec has 12 prompts, so 8 prompts per
batch and 2 SFT epochs are 4 SFT steps, too few to bind the steering ids to their answers (issue 11).
Unless a config gives them:
- prompts per batch = ceil(prompts / 6), at most 8: small specs take small batches, hence more steps
  for the same compute, large specs keep the batches the quickstart was tuned with;
- epochs = enough for `min_sft_steps` (14) / `min_steps` (35) optimizer steps, and at least 2 SFT /
  5 stage-2 epochs: the quickstart's own budget (50 prompts: 8 per batch, 7 steps an epoch, 2 + 5
  epochs) is unchanged; a 50-context spec (100 prompts) trains 2 + 5 epochs of 13 steps, not longer;
- SFT epochs also enough that every steering id's answer is trained `min_sft_views` (100) times
  (prompts x epochs, the quickstart's 50 x 2): a 6-prompt spec bound its ids after 18 SFT steps, but
  the stage-2 KL term, pushing one skewed context per step, then unbound them ("00000" after every
  id); after 102 SFT steps the binding held (docs/specs.md).
Only the steering recipe has an SFT stage: IFT and DPO get 0 SFT epochs, so a Tune sweep's ASHA
schedule (tuning/sweep.py) gives every method the same stage-2 budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from distalign_ray.config import FinetuneConfig
from distalign_ray.data.prompts import build_prompts
from distalign_ray.data.specs import DistributionSpec
from distalign_ray.methods import trained_method

MAX_AUTO_PROMPTS_PER_BATCH = 8
AUTO_BATCHES_PER_EPOCH = 6
DEFAULT_SFT_EPOCHS = 2
DEFAULT_EPOCHS = 5


@dataclass(frozen=True)
class TrainingBudget:
    prompts: int  # prompt groups per epoch (contexts x templates)
    prompts_per_batch: int
    steps_per_epoch: int
    sft_epochs: int
    epochs: int

    @property
    def sft_steps(self) -> int:
        return self.sft_epochs * self.steps_per_epoch

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def all_epochs(self) -> int:
        """Epochs of either stage: the reports a run makes (a Tune trial's full length)."""
        return self.sft_epochs + self.epochs

    def params(self) -> dict[str, int]:
        """What a run logs to MLflow (as `budget/...` params) and prints."""
        return asdict(self) | {"sft_steps": self.sft_steps, "steps": self.steps}


def _epochs(given: int | None, floor: int, min_steps: int, steps_per_epoch: int) -> int:
    if given is not None:
        return given
    return max(floor, math.ceil(min_steps / steps_per_epoch))


def plan_budget(cfg: FinetuneConfig, spec: DistributionSpec) -> TrainingBudget:
    """The budget for training `cfg` on `spec` (see the module docstring)."""
    prompts = len(build_prompts(spec.subset(cfg.max_contexts), "attribute", cfg.templates))
    per_batch = cfg.prompts_per_batch or max(1, min(MAX_AUTO_PROMPTS_PER_BATCH, math.ceil(prompts / AUTO_BATCHES_PER_EPOCH)))
    steps_per_epoch = max(1, math.ceil(prompts / per_batch))
    has_sft = trained_method(cfg.loss_mode).recipe == "steering"
    sft_floor = max(DEFAULT_SFT_EPOCHS, math.ceil(cfg.min_sft_views / prompts))
    return TrainingBudget(
        prompts=prompts,
        prompts_per_batch=per_batch,
        steps_per_epoch=steps_per_epoch,
        sft_epochs=_epochs(cfg.sft_epochs, sft_floor, cfg.min_sft_steps, steps_per_epoch) if has_sft else 0,
        epochs=_epochs(cfg.epochs, DEFAULT_EPOCHS, cfg.min_steps, steps_per_epoch),
    )
