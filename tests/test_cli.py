"""The CLI: help on every subcommand; bad input gives one error line, exit code 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from distalign_ray.cli import build_parser, main
from distalign_ray.console import captured_output, log_file, terminal


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


def _spec_document(**changes) -> dict:
    document = {
        "name": "pets",
        "attribute": "pet",
        "categories": ["cat", "dog"],
        "contexts": ["flats"],
        "target": {"cat": 0.7, "dog": 0.3},
        "templates": {"attribute": ["{context}?"], "story": "s", "prompt_engineering": "{target}"},
    }
    return document | changes


def _write(path, content) -> str:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return str(path)


# name -> (argv, files to create {placeholder: content}, environment, part of the one error line)
UK = ["--dataset", "gender-uk-real"]
FT = ["finetune", *UK, "--output", "OUT"]
BAD_INPUTS = {
    # command-line flags
    "unknown dataset": (["estimate", "--dataset", "gender-mars-real"], {}, {}, "unknown dataset 'gender-mars-real'"),
    "no dataset or spec": (["estimate"], {}, {}, "give exactly one of --dataset NAME or --spec FILE.yaml"),
    "unknown model": (["estimate", *UK, "--model", "no-such-model"], {}, {}, "unknown model 'no-such-model'"),
    "missing adapter": (["estimate", *UK, "--adapter", "/nonexistent"], {}, {}, "is not a distalign adapter folder"),
    "empty folder as adapter": (["estimate", *UK, "--adapter", "EMPTYDIR"], {}, {}, "is not a distalign adapter folder"),
    "zero samples": (["estimate", *UK, "--samples", "0"], {}, {}, "estimate.samples_per_context: Input should be greater than 0"),
    "zero contexts": (["estimate", *UK, "--max-contexts", "0"], {}, {}, "estimate.max_contexts: Input should be greater than 0"),
    "zero epochs": ([*FT, "--epochs", "0"], {}, {}, "finetune.epochs: Input should be greater than or equal to 1"),
    "negative workers": ([*FT, "--num-workers", "-1"], {}, {}, "finetune.num_workers: Input should be greater than or equal to 0"),
    "empty folder as model": ([*FT, "--model", "EMPTYDIR"], {}, {}, "is not a Hugging Face model folder"),
    "missing init adapter": ([*FT, "--init-adapter", "/nonexistent"], {}, {}, "is not a distalign adapter folder"),
    "output holds files": (["finetune", *UK, "--output", "FULLDIR"], {}, {}, "already exists and is not empty"),
    # spec files
    "targets sum to 1.4": (
        ["estimate", "--spec", "SPEC"],
        {"SPEC": _spec_document(target={"cat": 0.7, "dog": 0.7})},
        {},
        "target probabilities sum to 1.4000, not 1",
    ),
    "unknown target category": (["estimate", "--spec", "SPEC"], {"SPEC": _spec_document(target={"cat": 0.7, "cow": 0.3})}, {}, "cow"),
    "spec not found": (["estimate", "--spec", "/nonexistent.yaml"], {}, {}, "spec file not found: /nonexistent.yaml"),
    "spec is a folder": (["estimate", "--spec", "EMPTYDIR"], {}, {}, "is a folder, not a YAML file"),
    "spec not UTF-8": (["estimate", "--spec", "SPEC"], {"SPEC": b"name: \xff\xfe pets\n"}, {}, "is not UTF-8 text (byte 0xff"),
    "spec empty": (["estimate", "--spec", "SPEC"], {"SPEC": ""}, {}, "is empty"),
    "spec of 50 MB": (["estimate", "--spec", "SPEC"], {"SPEC": b"#" * (50 * 2**20)}, {}, "is 50 MiB; a spec is a small YAML file"),
    "spec not YAML": (["estimate", "--spec", "SPEC"], {"SPEC": "name: [pets\n"}, {}, "is not valid YAML"),
    "spec is a list": (["estimate", "--spec", "SPEC"], {"SPEC": "- pets\n"}, {}, "expected a YAML mapping at top level"),
    "spec without contexts": (["estimate", "--spec", "SPEC"], {"SPEC": _spec_document(contexts=[])}, {}, "contexts"),
    "11 classes on digit ids": (
        ["finetune", "--spec", "SPEC", "--output", "OUT", "--set", "finetune.steering_tokens=digits"],
        {"SPEC": _spec_document(categories=[f"c{i}" for i in range(11)], target="uniform")},
        {},
        "digit",
    ),
    # config files and overrides
    "config without its section": ([*FT, "--config", "CFG"], {"CFG": "kl_weight: -2\n"}, {}, "has no `finetune:` section"),
    "config of another command": ([*FT, "--config", "CFG"], {"CFG": "estimate: {top_p: 0.5}\n"}, {}, "has no `finetune:` section"),
    "config field misspelt": ([*FT, "--config", "CFG"], {"CFG": "finetune: {kl_wieght: 2}\n"}, {}, "unknown field finetune.kl_wieght"),
    "config value out of range": (
        [*FT, "--config", "CFG"],
        {"CFG": "finetune: {lora: {r: 0}}\n"},
        {},
        "finetune.lora.r: Input should be greater than 0",
    ),
    "config not UTF-8": (["estimate", *UK, "--config", "CFG"], {"CFG": b"estimate:\n  model: \xe9\n"}, {}, "is not UTF-8 text"),
    "config not found": (["estimate", *UK, "--config", "/nonexistent.yaml"], {}, {}, "config file not found"),
    "config storage not a string": (
        [*FT, "--config", "CFG"],
        {"CFG": "storage: [1]\nfinetune: {}\n"},
        {},
        "storage must be a folder or a URI",
    ),
    "quickstart config with a finetune field": (
        ["quickstart", "--config", "CFG"],
        {"CFG": "kl_weight: 2\n"},
        {},
        "unknown field kl_weight",
    ),
    "--set without a value": ([*FT, "--set", "finetune.kl_weight"], {}, {}, "expected PATH=VALUE"),
    "--set outside the section": ([*FT, "--set", "kl_weight=2"], {}, {}, "unknown top-level key 'kl_weight'"),
    "--set a value that is not YAML": ([*FT, "--set", "finetune.templates=[a"], {}, {}, "the value is not valid YAML"),
    "unknown training template": (
        [*FT, "--set", "finetune.templates=[attribute_7]"],
        {},
        {},
        "unknown attribute template 'attribute_7' for spec gender-uk-real; choose from attribute_0, attribute_1",
    ),
    "training on a held-out template": (
        [*FT, "--set", "finetune.templates=[attribute_0, held_out_0]"],
        {},
        {},
        "held-out templates (held_out_0) are never trained on",
    ),
    "unknown estimate template": (
        ["estimate", *UK, "--set", "estimate.templates=[v3]"],
        {},
        {},
        "unknown attribute template 'v3' for spec gender-uk-real",
    ),
    "--set a wrong type": (["compare", "--set", "finetune.kl_weight=high"], {}, {}, "finetune.kl_weight: Input should be a valid number"),
    "a reversed search range": (["compare", "--set", "tune.lr=[0.005, 0.0001]"], {}, {}, "tune.lr: Value error, a log-uniform range"),
    "a search range for an untrained method": (
        ["compare", "--set", "tune.lr_per_method={zero-shot: [0.000001, 0.0001]}"],
        {},
        {},
        "tune.lr_per_method: 'zero-shot' is not a trained method",
    ),
    "unknown loss mode": ([*FT, "--set", "finetune.loss_mode=ppo"], {}, {}, "loss_mode must be one of"),
    # environment
    "malformed MLFLOW_TRACKING_URI": (["estimate", *UK], {}, {"MLFLOW_TRACKING_URI": "sqlite//mlflow.db"}, "MLFLOW_TRACKING_URI"),
    "unreachable MLflow server": (
        ["estimate", *UK],
        {},
        {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
        "MLflow tracking server http://127.0.0.1:9 is unreachable",
    ),
    "unwritable DISTALIGN_HOME": (
        [*FT],
        {"BLOCKER": "a file"},
        {"DISTALIGN_HOME": "BLOCKER/home", "MLFLOW_TRACKING_URI": None},
        "DISTALIGN_HOME",
    ),
    "unusable DISTALIGN_STORAGE": ([*FT], {}, {"DISTALIGN_STORAGE": "nosuchscheme://bucket/prefix"}, "storage"),
}


def _tree(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_nothing_written(case, tmp_path):
    argv, files, environment, message = BAD_INPUTS[case]
    (tmp_path / "EMPTYDIR").mkdir()
    (tmp_path / "FULLDIR").mkdir()
    (tmp_path / "FULLDIR" / "keep.txt").write_text("a user's file")
    paths = {name: _write(tmp_path / name, content) for name, content in files.items()}
    paths |= {name: str(tmp_path / name) for name in ("OUT", "EMPTYDIR", "FULLDIR")}
    argv = [paths.get(a, a) for a in argv]
    env = dict(os.environ, DISTALIGN_HOME=str(tmp_path / "home"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    env.pop("DISTALIGN_STORAGE", None)
    for name, value in environment.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value.replace("BLOCKER", paths.get("BLOCKER", "BLOCKER"))
    before = _tree(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "distalign_ray.cli", *argv], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distalign: error: ") and message in lines[0], proc.stderr[-3000:]
    assert _tree(tmp_path) == before, "written: " + ", ".join(sorted(_tree(tmp_path) - before))
    assert proc.stdout == ""  # not even the log file's path: no log file is kept


def test_the_announced_log_can_be_followed_while_the_command_runs(tmp_path, capfd):
    """The log's path comes with the command's first line and the file is written there from then on
    (`tail -f` works during a long compare); before that line (input checks) the logs folder stays empty."""
    with captured_output(tmp_path / "logs", "compare"):
        os.write(1, b"ray: starting\n")  # what Ray, vLLM or a worker writes to the process's stdout
        assert not (tmp_path / "logs").exists()
        terminal().print("stage 1")
        (log,) = (tmp_path / "logs").glob("compare-*.log")
        os.write(2, b"worker line\n")
        assert log.read_text() == "ray: starting\nworker line\n" and log_file() == log
    assert capfd.readouterr().out.splitlines() == [f"log: {log}", "stage 1"]
    assert log.read_text() == "ray: starting\nworker line\n"  # still there, nothing lost in the move
    with captured_output(tmp_path / "bad", "compare") as captured:
        terminal().print("stage 1")
        captured.discard()  # an input error found after the first line: still nothing kept
    assert list((tmp_path / "bad").iterdir()) == []
