"""Fine-tuning: local mode for the loop logic, a real 2-worker Ray Train run for DDP + checkpoints."""

from __future__ import annotations

import json
import tempfile

import mlflow
import pytest
import torch

from distalign_ray.adapters import read_adapter_meta
from distalign_ray.config import FinetuneConfig
from distalign_ray.data.specs import load_dataset
from distalign_ray.data.steering import prepare_steering_vocab
from distalign_ray.models import ModelRef, load_model, load_tokenizer
from distalign_ray.tracking.mlflow_store import ensure_experiment
from distalign_ray.training.finetune import run_finetune
from distalign_ray.training.objective import forced_choice_readout, steering_readout


def _readout_mae(model_path: str, adapter: str | None, spec) -> float:
    from distalign_ray.data.prompts import build_prompts, chat_prompt_ids

    ref = ModelRef(name="tiny", path=model_path, is_local=True)
    tokenizer = load_tokenizer(ref)
    model = load_model(ref, adapter).eval()
    vocab = prepare_steering_vocab(tokenizer, spec)
    rows = build_prompts(spec, "attribute")
    probs = steering_readout(model, [chat_prompt_ids(tokenizer, r) for r in rows], vocab.token_ids, tokenizer.pad_token_id).probs
    targets = torch.tensor([spec.targets[r.context_index] for r in rows])
    return float((probs - targets).abs().mean())


def test_readouts_give_the_mass_their_classes_get_before_renormalising(tiny_model_path):
    """Checked against one unpadded forward per prompt (the readouts batch and left-pad)."""
    from distalign_ray.data.prompts import build_prompts, chat_prompt_ids
    from distalign_ray.data.steering import answer_ids

    spec = load_dataset("gender-us-real").subset(3)
    ref = ModelRef(name="tiny", path=tiny_model_path, is_local=True)
    tokenizer = load_tokenizer(ref)
    model = load_model(ref, None).eval()
    prompts = [chat_prompt_ids(tokenizer, row) for row in build_prompts(spec, "attribute")][:5]
    ids = prepare_steering_vocab(tokenizer, spec).token_ids
    answers = [answer_ids(tokenizer, spec.answers[c])[:-1] for c in spec.categories]

    def next_token_probs(tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(model(torch.tensor([tokens])).logits[0].float(), dim=-1)

    steering = steering_readout(model, prompts, ids, tokenizer.pad_token_id)
    expected = torch.stack([next_token_probs(p)[-1, ids] for p in prompts])
    assert torch.allclose(steering.mass, expected.sum(-1), rtol=1e-4)
    assert torch.allclose(steering.probs, expected / expected.sum(-1, keepdim=True), atol=1e-5)

    forced = forced_choice_readout(model, prompts, answers, tokenizer.pad_token_id)
    expected = torch.tensor(
        [[next_token_probs(p + a)[len(p) - 1 : -1].gather(1, torch.tensor(a)[:, None]).prod().item() for a in answers] for p in prompts]
    )
    assert torch.allclose(forced.mass, expected.sum(-1), rtol=1e-3)
    assert torch.allclose(forced.probs, expected / expected.sum(-1, keepdim=True), atol=1e-4)
    assert 0 < forced.mass.min() and forced.mass.max() < 1


def test_local_mode_hybrid_moves_steering_distribution(tiny_model_path, tmp_path, mlflow_uri, monkeypatch):
    scratch = tmp_path / "scratch"  # where the loop's epoch checkpoints go (the process's temp folder)
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    spec = load_dataset("gender-us-real").subset(4)
    cfg = FinetuneConfig(
        model=tiny_model_path, num_workers=0, epochs=3, sft_epochs=1, prompts_per_batch=2, lr=5e-3, lora={"r": 8, "alpha": 16}
    )
    before = _readout_mae(tiny_model_path, None, spec)
    result = run_finetune(spec, cfg, tmp_path / "adapter")
    after = _readout_mae(tiny_model_path, str(tmp_path / "adapter"), spec)
    assert after < before * 0.7, (before, after)
    assert result["metrics"]["val_mae"] == pytest.approx(after, abs=1e-4)
    assert 0 < result["metrics"]["val_answer_mass"] <= 1
    meta = read_adapter_meta(tmp_path / "adapter")
    assert meta["steering_token_ids"] == [32, 33] and meta["categories"] == ["male", "female"]
    assert not list(scratch.glob("distalign-ckpt-*")), "epoch checkpoints left behind"


def test_output_folder_is_never_overwritten(tiny_model_path, tmp_path, mlflow_uri):
    from distalign_ray.errors import DistalignError

    output = tmp_path / "taken"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    with pytest.raises(DistalignError, match="already exists"):
        run_finetune(load_dataset("gender-us-real"), FinetuneConfig(model=tiny_model_path, num_workers=0), output)
    assert (output / "keep.txt").read_text() == "precious"


@pytest.mark.slow
def test_two_ray_train_workers_loss_down_checkpoint_restorable(ray_cluster, tiny_model_path, tmp_path, mlflow_uri):
    from ray.train import Checkpoint

    from distalign_ray.tracking.mlflow_store import start_run
    from distalign_ray.training.loop import ADAPTER_DIR, STATE_FILE

    spec = load_dataset("gender-uk-even").subset(4)
    cfg = FinetuneConfig(model=tiny_model_path, num_workers=2, epochs=3, sft_epochs=1, prompts_per_batch=2, lr=5e-3)
    with start_run("train-test", "test run") as run:
        result = run_finetune(spec, cfg, tmp_path / "adapter", mlflow_run_id=run.info.run_id)
    history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "align/loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert result["metrics"]["device"] == "cpu"  # what Ray Train's get_device() gave the workers
    assert len(losses) == 3 * 4  # 3 epochs x (8 prompts / 2 per batch)
    assert sum(losses[-4:]) < sum(losses[:4])
    readout = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "val_mae")
    assert len(readout) == 4  # one per epoch (1 SFT + 3 aligned)
    # The last checkpoint in Ray storage restores to the adapter that was installed.
    run_dirs = sorted((tmp_path / "home" / "ray_results").glob("finetune-*"))
    checkpoints = sorted(p for p in run_dirs[-1].glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2  # num_to_keep
    with Checkpoint.from_directory(str(checkpoints[-1])).as_directory() as folder:
        state = torch.load(f"{folder}/{STATE_FILE}", weights_only=False)
        assert state["plan_index"] == 3 and "align" in state["optimizers"]
        restored = _readout_mae(tiny_model_path, f"{folder}/{ADAPTER_DIR}", spec)
    assert restored == pytest.approx(result["metrics"]["val_mae"], abs=1e-4)
    assert json.loads((tmp_path / "adapter" / "distalign_meta.json").read_text())["dataset"] == "gender-uk-even"


@pytest.mark.parametrize("reference", ["sft", "base"])
def test_kto_reference_is_the_frozen_stage_one_model(tiny_model_path, tmp_path, mlflow_uri, reference):
    """KTO rewards (beta x log-ratio to the reference) start at 0 in the alignment stage when the reference is
    base + the stage-1 adapter (the paper's); against the bare base they start at what SFT already moved."""
    spec = load_dataset("gender-us-real").subset(2)
    cfg = FinetuneConfig(
        model=tiny_model_path, num_workers=0, sft_epochs=3, epochs=1, prompts_per_batch=4, kto_reference=reference, binding_check="report"
    )
    # this test's store and experiment (an earlier test in the process may have left others active)
    mlflow.set_tracking_uri(mlflow_uri)
    with mlflow.start_run(experiment_id=ensure_experiment()) as run:
        result = run_finetune(spec, cfg, tmp_path / "adapter", mlflow_run_id=run.info.run_id)
    client = mlflow.MlflowClient()
    first_align_step = result["budget"].sft_steps + 1
    rewards = [
        next(m.value for m in client.get_metric_history(run.info.run_id, f"align/reward_{kind}") if m.step == first_align_step)
        for kind in ("desirable", "undesirable")
    ]
    if reference == "sft":
        assert rewards == pytest.approx([0.0, 0.0], abs=1e-5)
    else:  # SFT raised the desirable rows (id + own answer) more than the undesirable ones (id + other answer)
        assert rewards[0] > 0.01 and rewards[0] > rewards[1], rewards
