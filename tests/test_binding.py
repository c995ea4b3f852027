"""The binding check after training (issue 11): logged, printed, and a failing adapter is one clear
line with exit code 3, never a silent success."""

from __future__ import annotations

import json

import mlflow

from distalign_ray.cli import main


def test_unbound_adapter_fails_the_check_in_one_line(tiny_model_path, mlflow_uri, tmp_path, capfd):
    """A random tiny model cannot learn the binding in a few steps: the command must say so."""
    output = tmp_path / "adapter"
    argv = f"finetune --dataset gender-us-real --model {tiny_model_path} --num-workers 0 --epochs 1 --max-contexts 2 --output {output}"
    argv += " --set finetune.min_sft_views=0"  # the step floor alone: too few SFT steps to bind
    code = main(argv.split())
    captured = capfd.readouterr()
    assert code == 3
    errors = [line for line in captured.err.splitlines() if line.startswith("distalign:")]
    assert len(errors) == 1 and errors[0].startswith("distalign: check failed: adapter ")
    assert "binding check failed (thresholds: greedy 95%, sampled 80%)" in errors[0] and "finetune.min_sft_steps" in errors[0]
    assert "binding check on 4 prompts (greedy/sampled" in captured.out  # the per-class summary is printed before
    run = mlflow.search_runs(experiment_names=["distalign"], output_format="list")[0]
    assert run.info.status == "FAILED"  # not reported as a finished, usable adapter
    assert run.data.tags["binding_check"] == "failed"
    assert run.data.metrics["binding_accuracy_min"] < 0.95 or run.data.metrics["binding_answer_prob_min"] < 0.8
    assert run.data.params["budget.sft_steps"] == "16"  # 4 prompts, 1 per batch: 4 epochs reach 14 steps
    assert run.data.params["min_sft_views"] == "0"
    report = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/binding.json"))
    assert report["prompts"] == 4 and report["categories"] == ["male", "female"]
    assert all(0 <= p <= 4 for p in report["answer_prob"])  # summed probabilities over the 4 prompts
    assert (output / "adapter_model.safetensors").is_file()  # kept for inspection; the message names it
    # The terminal got the command's own lines; everything else went to the run's log file, an artifact too.
    (log,) = (tmp_path / "home" / "logs").glob("finetune-*.log")
    assert captured.out.splitlines()[0] == f"log: {log}" and len(captured.out.splitlines()) < 15, captured.out
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "logs")] == [f"logs/{log.name}"]
    (tmp_path / "log.txt").write_text(log.read_text())


def test_report_only_check_logs_and_succeeds(tiny_model_path, mlflow_uri, tmp_path, capfd):
    config = tmp_path / "report-only.yaml"
    config.write_text("finetune: {binding_check: report, epochs: 1, sft_epochs: 1}\n")
    argv = f"finetune --dataset gender-us-real --model {tiny_model_path} --num-workers 0 --max-contexts 2 --verbose"
    argv += f" --output {tmp_path / 'adapter'} --config {config} --set finetune.kl_weight=2.5 --set finetune.lora.r=4"
    code = main(argv.split())
    assert code == 0
    assert "binding check on 4 prompts (greedy/sampled" in capfd.readouterr().out
    run = mlflow.search_runs(experiment_names=["distalign"], output_format="list")[0]
    assert run.info.status == "FINISHED" and run.data.tags["binding_check"] == "failed"
    # The file's fields and the --set overrides reached the run: logged, and the adapter has rank 4.
    assert run.data.params["binding_check"] == "report" and run.data.params["kl_weight"] == "2.5"
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert not (tmp_path / "home" / "logs").exists()  # --verbose: everything live, no log file
