"""Training code takes its device from the model (which Ray Train placed), never assumes the CPU:
every tensor our training code creates names a device. Checked on the CPU by auditing the tensor
factories our code calls while a real training step, the readouts and the epoch metrics run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import distalign_ray
from distalign_ray.config import FinetuneConfig
from distalign_ray.data.specs import load_dataset
from distalign_ray.data.steering import answer_ids, prepare_steering_vocab
from distalign_ray.models import ModelRef, load_model, load_tokenizer
from distalign_ray.scoring import CompletionScorer
from distalign_ray.training import loop
from distalign_ray.training.budget import plan_budget
from distalign_ray.training.stages import build_stages, validation_set

PACKAGE = str(Path(distalign_ray.__file__).parent)
FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.arange, torch.full, torch.empty, torch.as_tensor, torch.randn}


class DeviceAudit(TorchFunctionMode):
    """Records tensor factories called from distalign_ray without a `device`."""

    def __init__(self):
        super().__init__()
        self.undeviced: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(PACKAGE):
                self.undeviced.append(f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno} {func.__name__}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("loss_mode", ["hybrid", "ift", "dpo"])
def test_training_tensors_follow_the_model_device(tiny_model_path, loss_mode):
    from peft import LoraConfig, get_peft_model

    ref = ModelRef("tiny", tiny_model_path, True)
    tokenizer = load_tokenizer(ref)
    spec = load_dataset("gender-us-real").subset(2)
    cfg = FinetuneConfig(model=tiny_model_path, loss_mode=loss_mode)
    vocab = prepare_steering_vocab(tokenizer, spec) if loss_mode == "hybrid" else None
    model = get_peft_model(load_model(ref), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    scorer = CompletionScorer(model, tokenizer.pad_token_id)
    audit = DeviceAudit()
    with audit:
        stages = build_stages(cfg, spec, tokenizer, vocab, scorer, plan_budget(cfg, spec))
        for stage in stages:
            if stage.prepare is not None:  # as the loop does when a stage starts (KTO's reference log-probs)
                stage.prepare(scorer)
            stage.step(scorer, [e for group in stage.groups[:2] for e in group])["loss"].backward()
        answers = [answer_ids(tokenizer, spec.answers[c])[:-1] for c in spec.categories]
        metrics = loop._epoch_metrics(
            model,
            validation_set(spec, tokenizer, None),
            vocab.token_ids if vocab else None,
            answers,
            tokenizer.pad_token_id,
            [1.0],
            rank=0,
            world=1,
        )
    assert audit.undeviced == [], audit.undeviced
    assert 0 <= metrics["val_mae"] <= 1


def test_the_audit_catches_a_tensor_built_without_its_device():
    """The control: package code that builds a tensor on the default device is caught, one that
    names its device is not."""
    audit = DeviceAudit()
    code = "torch.tensor([1.0], device='cpu')\ntorch.tensor([1.0])"
    with audit:
        exec(compile(code, f"{PACKAGE}/some_module.py", "exec"), {"torch": torch})
    assert audit.undeviced == ["some_module.py:2 tensor"]
