"""Config files, flags and `--set` overrides: one path per field, validated by the same pydantic models;
`distalign config show` prints a valid config with every field described."""

from __future__ import annotations

import os

import pytest
import yaml
from pydantic import BaseModel

from distalign_ray.cli import build_parser, main
from distalign_ray.cli_config import COMMANDS, SECTIONS, command_config, config_model
from distalign_ray.config import EstimateConfig, FinetuneConfig


def _models(model: type[BaseModel]):
    yield model
    for field in model.model_fields.values():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _models(field.annotation)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_config_field_is_described(command):
    undescribed = [
        f"{m.__name__}.{name}" for m in _models(config_model(command)) for name, f in m.model_fields.items() if not f.description
    ]
    assert not undescribed


@pytest.mark.parametrize("model", [FinetuneConfig, EstimateConfig])
def test_grouped_configs_place_every_field_in_one_group(model):
    grouped = [name for names in model.GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(model.model_fields) and len(grouped) == len(set(grouped))
    assert {"loss", "LoRA", "scaling"} <= set(model.GROUPS) or model is EstimateConfig


def test_config_show_heads_each_group_and_survives_a_closed_pipe():
    import subprocess
    import sys

    shown = subprocess.run([sys.executable, "-m", "distalign_ray.cli", "config", "show", "finetune"], capture_output=True, text=True)
    headers = [line.strip() for line in shown.stdout.splitlines() if line.strip().startswith("# ---")]
    assert headers == [f"# --- {group} ---" for group in FinetuneConfig.GROUPS]
    # `| head` closes the pipe early: no traceback.
    piped = subprocess.run(
        f"{sys.executable} -m distalign_ray.cli config show finetune | head -2", shell=True, capture_output=True, text=True
    )
    assert piped.stdout.splitlines() == ["finetune:", "  # --- method and data ---"] and piped.stderr == "", piped.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_config_show_prints_a_valid_config_of_the_defaults(command, tmp_path, capsys):
    assert main(["config", "show", command]) == 0
    shown = capsys.readouterr().out
    assert "  # " in shown  # descriptions as comments
    path = tmp_path / "shown.yaml"
    path.write_text(shown)
    cfg, storage = command_config(command, str(path), {}, [])
    assert cfg == config_model(command)() and storage is None
    if command in SECTIONS:
        assert list(yaml.safe_load(shown)) == [command]


def _cli_config(argv: list[str]):
    from distalign_ray.cli import load_config

    args = build_parser().parse_args(argv)
    return load_config(args, args.command)


def test_file_then_flags_then_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("finetune: {kl_weight: 1.5, epochs: 2, lora: {r: 8}}\nestimate: {top_p: 0.5}\n")
    base = ["finetune", "--dataset", "gender-uk-real", "--output", "o", "--config", str(path)]
    cfg = _cli_config(base)
    assert (cfg.kl_weight, cfg.epochs, cfg.lora.r) == (1.5, 2, 8)
    cfg = _cli_config(
        [*base, "--epochs", "3", "--set", "finetune.lora.r=4", "--set", "finetune.epochs=5", "--set", "finetune.templates=[attribute_1]"]
    )
    assert (cfg.kl_weight, cfg.epochs, cfg.lora.r, cfg.templates) == (1.5, 5, 4, ["attribute_1"])


def test_a_flag_can_set_several_fields():
    cfg = _cli_config(["quickstart", "--max-contexts", "3", "--model", "m", "--set", "estimate.top_p=0.9"])
    assert (cfg.finetune.max_contexts, cfg.estimate.max_contexts, cfg.finetune.model, cfg.estimate.top_p) == (3, 3, "m", 0.9)


def test_compare_epochs_flag_keeps_the_automatic_sft_budget():
    cfg = _cli_config(["compare", "--epochs", "2", "--samples", "7"])
    assert (cfg.finetune.epochs, cfg.finetune.sft_epochs, cfg.estimate.samples_per_context) == (2, None, 7)


def test_set_storage_selects_shared_storage(tmp_path, monkeypatch):
    from distalign_ray.storage import STORAGE_ENV

    monkeypatch.setenv(STORAGE_ENV, str(tmp_path / "from-env"))  # recorded, so the test's choice is undone after it
    _cli_config(["estimate", "--dataset", "gender-uk-real", "--set", f"storage={tmp_path / 'shared'}"])
    assert os.environ[STORAGE_ENV] == str(tmp_path / "shared")
