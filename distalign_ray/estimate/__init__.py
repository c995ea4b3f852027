"""Estimate a model's output distribution per context: planning (`plan`), generation and MLflow
logging (`run`), labelling (`labels`), reports and tables (`tables`)."""

from distalign_ray.estimate.plan import EstimatePlan, plan_estimate
from distalign_ray.estimate.run import EstimateResult, run_estimate

__all__ = ["EstimatePlan", "EstimateResult", "plan_estimate", "run_estimate"]
