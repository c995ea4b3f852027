"""Shared fixtures: the embedded tokenizer, a tiny random model, an isolated MLflow store, a Ray cluster."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def embedded_model_path() -> str:
    """The converted embedded SmolLM2 folder (converted once into the user cache)."""
    from distalign_ray.models import resolve_model

    return resolve_model("smollm2-135m").path


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, embedded_model_path) -> str:
    from distalign_ray.models.tiny import build_tiny_model

    return str(build_tiny_model(embedded_model_path, tmp_path_factory.mktemp("tiny-llama"), seed=0))


@pytest.fixture(scope="session")
def tiny_run_settings(tiny_model_path):
    """The `finetune:` and `estimate:` sections of a quickstart or compare config on the tiny model,
    as small as a full run gets (2 contexts, 1 + 1 epochs, 4 samples of 3 tokens)."""

    def settings(num_workers: int = 1) -> dict:
        return {
            "finetune": {
                "model": tiny_model_path,
                "num_workers": num_workers,
                "epochs": 1,
                "sft_epochs": 1,
                "max_contexts": 2,
                "binding_check": "report",  # a random tiny model binds nothing
            },
            "estimate": {"samples_per_context": 4, "max_contexts": 2, "max_new_tokens": 3},
        }

    return settings


@pytest.fixture(scope="session")
def tokenizer(embedded_model_path):
    from distalign_ray.models import ModelRef, load_tokenizer

    return load_tokenizer(ModelRef(name="smollm2-135m", path=embedded_model_path, is_local=True))


@pytest.fixture()
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DISTALIGN_HOME", str(tmp_path / "home"))
    return uri


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One real local Ray cluster for the whole session (start-up costs ~10 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()
