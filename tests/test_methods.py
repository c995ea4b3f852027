"""The method registry: a new method is one entry, and everything else follows from it."""

from __future__ import annotations

import mlflow
import pytest

from distalign_ray.adapters import read_adapter_meta
from distalign_ray.cli import build_parser
from distalign_ray.config import FinetuneConfig
from distalign_ray.data.specs import load_dataset
from distalign_ray.methods import METHODS, Method, get_methods, register_method, trained_method_names
from distalign_ray.tracking.mlflow_store import start_run
from distalign_ray.training.finetune import run_finetune

PROBE = Method("kl-probe", "test: steering token, KL term only, under a new name", recipe="steering", kl=True)


@pytest.fixture
def probe_method():
    register_method(PROBE)
    yield PROBE
    METHODS.pop(PROBE.name)


def test_a_new_method_is_one_registry_entry(probe_method, tiny_model_path, tmp_path, mlflow_uri):
    name = probe_method.name
    # Config and CLI choices, and the comparison's methods, come from the registry.
    assert name in trained_method_names() and FinetuneConfig(loss_mode=name).loss_mode == name
    args = build_parser().parse_args(["finetune", "--dataset", "gender-us-real", "--output", "x", "--loss-mode", name])
    assert args.__dict__["set:finetune.loss_mode"] == name
    assert get_methods([name]) == [probe_method] and get_methods(None)[-1] == probe_method
    # Its training follows its recipe and terms: the steering stages, the KL term without KTO.
    cfg = FinetuneConfig(model=tiny_model_path, loss_mode=name, num_workers=0, epochs=1, sft_epochs=1, max_contexts=2)
    with start_run("method-probe", "test: a registered method trains") as run:
        run_finetune(load_dataset("gender-us-real"), cfg, tmp_path / "adapter", mlflow_run_id=run.info.run_id)
    logged = set(mlflow.get_run(run.info.run_id).data.metrics)
    assert {"sft/sft_example_mean", "align/steering_kl"} <= logged and not any("kto" in key for key in logged), logged
    assert read_adapter_meta(tmp_path / "adapter")["loss_mode"] == name


def test_the_registry_refuses_inconsistent_entries():
    with pytest.raises(ValueError, match="neither the KL nor the KTO term"):
        register_method(Method("no-terms", "test", recipe="steering"))
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method("hybrid", "test", recipe="steering", kl=True))
    with pytest.raises(ValueError, match="unknown method"):
        register_method(Method("from-nowhere", "test", recipe="dpo", init_from="rlhf"))
    with pytest.raises(ValueError, match="loss_mode must be one of"):
        FinetuneConfig(loss_mode="zero-shot")  # a method, but not a trained one
    assert "no-terms" not in METHODS and "from-nowhere" not in METHODS


def test_config_and_cli_describe_every_trained_method():
    description = FinetuneConfig.model_fields["loss_mode"].description
    assert all(name in description for name in trained_method_names())
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--dataset", "gender-us-real", "--output", "x", "--loss-mode", "zero-shot"])
