"""The CLI: help on every subcommand; bad input gives one error line, exit code 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from distalign_ray.cli import build_parser, main


@pytest.mark.parametrize("command", [[], ["estimate"], ["finetune"], ["datasets"], ["quickstart"]])
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(command + ["--help"])
    assert info.value.code == 0
    assert "usage: distalign" in capsys.readouterr().out


def test_datasets_list_and_show(capsys):
    assert main(["datasets", "list"]) == 0
    assert "race-us-even" in capsys.readouterr().out
    assert main(["datasets", "show", "gender-uk-real"]) == 0
    assert "Teaching assistants" in capsys.readouterr().out


def _bad_spec(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "pets",
                "attribute": "pet",
                "categories": ["cat", "dog"],
                "contexts": ["flats"],
                "target": {"cat": 0.7, "dog": 0.7},
                "templates": {"attribute": ["{context}?"], "story": "s", "prompt_engineering": "{target}"},
            }
        )
    )
    return str(path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["estimate", "--dataset", "gender-mars-real"], "unknown dataset 'gender-mars-real'"),
        (["estimate", "--dataset", "gender-uk-real", "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["estimate", "--dataset", "gender-uk-real", "--adapter", "/nonexistent"], "is not a distalign adapter folder"),
        (["estimate"], "give exactly one of --dataset NAME or --spec FILE.yaml"),
        (["finetune", "--spec", "BADSPEC", "--output", "OUT"], "target probabilities sum to 1.4000, not 1"),
        (["finetune", "--dataset", "gender-uk-real", "--model", "EMPTYDIR", "--output", "OUT"], "is not a Hugging Face model folder"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(argv, message, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTALIGN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    (tmp_path / "empty").mkdir()
    replacements = {"BADSPEC": _bad_spec(tmp_path), "OUT": str(tmp_path / "out"), "EMPTYDIR": str(tmp_path / "empty")}
    argv = [replacements.get(a, a) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "distalign_ray.cli", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith("ray") for p in (tmp_path / "home").glob("*")) if (tmp_path / "home").exists() else True


def test_unreachable_mlflow_fails_fast(tmp_path):
    env = dict(os.environ, MLFLOW_TRACKING_URI="http://127.0.0.1:9", DISTALIGN_HOME=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "distalign_ray.cli", "estimate", "--dataset", "gender-uk-real"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 2
    assert "MLflow tracking server http://127.0.0.1:9 is unreachable" in proc.stderr.strip().splitlines()[-1]
