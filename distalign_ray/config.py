"""Typed, validated configs for fine-tuning and estimation (documented like TRL's config dataclasses).

Every field is logged to MLflow as a param, so a run can be reproduced from its params alone.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from distalign_ray.methods import trained_method, trained_method_names


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Field groups, in display order, for `distalign config show` (the YAML keys stay flat).
    GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {}


class LoraSettings(_Config):
    r: int = Field(16, gt=0, description="LoRA rank")
    alpha: int = Field(32, gt=0, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], description="modules that get LoRA adapters"
    )


class FinetuneConfig(_Config):
    """Stage 1 (SFT on desirable answers) then stage 2 (steering KL + KTO)."""

    GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {
        "method and data": (
            "model", "loss_mode", "init_adapter", "answers_per_context", "steering_tokens",
            "max_contexts", "templates", "validation_templates",
        ),
        "loss": (
            "kl_weight", "kto_weight", "beta", "desirable_weight", "undesirable_weight",
            "kto_balance", "kto_reference", "kl_normalization", "score_steering_token",
        ),
        "optimiser and budget": (
            "sft_epochs", "sft_lr", "epochs", "lr", "prompts_per_batch", "min_sft_steps", "min_sft_views", "min_steps",
            "warmup_ratio", "min_lr_ratio", "max_grad_norm", "weight_decay", "seed",
        ),
        "LoRA": ("lora",),
        "binding check": ("binding_check", "binding_threshold", "binding_answer_threshold"),
        "scaling": ("num_workers", "cpus_per_worker", "use_gpu", "gpus_per_worker", "max_failures", "log_every"),
    }  # fmt: skip

    model: str = Field("smollm2-135m", description="alias, local HF folder, or hub id")
    loss_mode: str = Field("hybrid", description="the trained method (methods.py registry): " + ", ".join(trained_method_names()))
    init_adapter: str | None = Field(None, description="start from this saved adapter (DPO starts from IFT's)")
    answers_per_context: int = Field(
        100,
        gt=0,
        description="IFT answers / DPO pairs per context (the paper's IFT data: ~100 per occupation), in its target "
        "proportions to 1/N (largest remainder), dealt in turn over its templates",
    )
    kl_weight: float = Field(1.0, ge=0, description="weight of the steering KL term")
    kto_weight: float = Field(1.0, ge=0, description="weight of the KTO term")
    beta: float = Field(0.1, gt=0, description="KTO (and DPO) beta")
    desirable_weight: float = Field(1.0, gt=0, description="KTO lambda_D")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO lambda_U")
    kto_balance: Literal["pairs", "rows"] = Field(
        "pairs",
        description="pairs: desirable and undesirable rows weigh equally, as in the paper's batches of (desirable, "
        "undesirable) pairs; rows: the plain mean over the K x K rows (K - 1 undesirable rows per desirable one "
        "outweigh the binding when K >= 3). Identical for K = 2",
    )
    kto_reference: Literal["sft", "base"] = Field(
        "sft",
        description="KTO's reference model: sft = base + the stage-1 SFT adapter, frozen (the paper's); base = the base "
        "model with the adapter off (rewards then also count what SFT learned)",
    )
    kl_normalization: Literal["steering", "vocab"] = Field(
        "steering", description="renormalise the model over the steering ids (default) or use the full vocabulary"
    )
    score_steering_token: bool = Field(
        True,
        description="score the steering id in the SFT and KTO log-probs, as the paper does; false leaves the id to the KL "
        "term alone (then kto_only cannot move the id distribution)",
    )
    steering_tokens: Literal["auto", "digits", "special"] = Field(
        "auto", description="steering ids: digits 0..K-1 (auto for K <= 10) or added special tokens (auto above)"
    )
    sft_epochs: int | None = Field(
        None, ge=0, description="stage-1 (SFT) epochs; default: at least 2 and enough for min_sft_steps and min_sft_views; 0 = no SFT"
    )
    sft_lr: float = Field(2e-3, gt=0, description="stage-1 peak learning rate")
    epochs: int | None = Field(None, ge=1, description="stage-2 (or baseline) epochs; default: at least 5 and enough for min_steps")
    lr: float = Field(2e-3, gt=0, description="stage-2 (or baseline) peak learning rate")
    prompts_per_batch: int | None = Field(
        None,
        gt=0,
        description="prompts per global batch, each with all its K x K steering examples (split over workers); "
        "default: ceil(prompts / 6), at most 8, so a small spec gets small batches and more steps",
    )
    min_sft_steps: int = Field(14, ge=0, description="stage-1 optimizer steps at least, when sft_epochs is not given")
    min_sft_views: int = Field(
        100,
        ge=0,
        description="stage-1 examples of each steering id's answer at least (prompts x SFT epochs), when sft_epochs is "
        "not given: a spec with few prompts trains more SFT epochs, so the stage-2 KL term cannot unbind the ids",
    )
    min_steps: int = Field(35, ge=0, description="stage-2 (or baseline) optimizer steps at least, when epochs is not given")
    binding_check: Literal["fail", "report"] = Field(
        "fail",
        description="after training, check that every steering id gives its class's answer: fail = finetune/quickstart "
        "exit with code 3 and one line when a threshold is missed; report = print and log only",
    )
    binding_threshold: float = Field(
        0.95, ge=0, le=1, description="binding check: each id's greedy answer is its class on at least this share of prompts"
    )
    binding_answer_threshold: float = Field(
        0.8,
        ge=0,
        le=1,
        description="binding check: each id's exact trained answer has at least this mean probability (the share of "
        "temperature-1 samples that give it)",
    )
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="linear warm-up, as a fraction of each stage's steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay floor, as a fraction of lr")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="the LoRA adapter's shape")
    num_workers: int = Field(2, ge=0, description="Ray Train workers; 0 = local mode in this process")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per Ray Train worker")
    use_gpu: bool = Field(False, description="train on GPUs: one device per worker from Ray Train, bf16 autocast, NCCL")
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs reserved per Ray Train worker when use_gpu")
    max_contexts: int | None = Field(None, gt=0, description="train on the first N contexts only")
    templates: list[str] | None = Field(None, description="attribute templates to train on (default: all)")
    validation_templates: list[str] | None = Field(
        None, description="templates of the per-epoch `val_mae` readout (default: the training templates); held-out in sweeps"
    )
    log_every: int = Field(1, ge=1, description="MLflow step-metric interval (rank 0, batched)")
    seed: int = Field(42, description="seeds the LoRA init, batch order and dropout (rank r uses seed + r)")
    max_failures: int = Field(0, ge=0, description="Ray Train worker-group restarts from the last checkpoint")

    @model_validator(mode="after")
    def _check_mode(self) -> FinetuneConfig:
        if self.use_gpu and self.num_workers == 0:
            raise ValueError("use_gpu needs Ray Train workers (num_workers >= 1)")
        trained_method(self.loss_mode)
        return self


class EstimateConfig(_Config):
    GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {
        "what is estimated": ("model", "adapter", "task", "estimator", "prompt_engineering", "max_contexts", "templates"),
        "sampling": ("samples_per_context", "samples_per_request", "max_new_tokens", "temperature", "top_p", "seed"),
        "evaluation": ("bootstrap_resamples", "story_classifier", "judge_model", "judge_max_new_tokens"),
        "scaling": ("engine", "num_actors", "cpus_per_actor", "gpus_per_actor", "vllm_backend", "vllm_lora"),
    }
    model: str = Field("smollm2-135m", description="alias, local HF folder, or hub id")
    adapter: str | None = Field(None, description="a fine-tuned adapter folder or storage URI (from `distalign finetune`)")
    task: Literal["attribute", "story"] = Field("attribute", description="attribute: one-word answers; story: a short story, classified")
    estimator: Literal["sample", "readout"] = Field(
        "sample", description="sample: generate and classify answers; readout: the steering-id probabilities (adapters only)"
    )
    samples_per_context: int | None = Field(None, gt=0, description="default: the spec's value")
    samples_per_request: int = Field(25, gt=0, description="samples drawn by one generate() call")
    max_new_tokens: int | None = Field(None, gt=0, description="default: 12 for attributes, 96 for stories")
    temperature: float = Field(1.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (1 = plain sampling)")
    engine: Literal["auto", "vllm", "hf"] = Field("auto", description="auto = vLLM when importable, else transformers")
    num_actors: int | None = Field(
        None, ge=1, description="engine actors; default: transformers 2, vLLM 1 (on GPUs: set it to the GPU count)"
    )
    cpus_per_actor: float | None = Field(None, gt=0, description="default: transformers 1, vLLM on CPU all of the host's cores")
    gpus_per_actor: float = Field(
        0, ge=0, description="GPUs per engine actor (vLLM on GPU clusters); a whole number > 1 = tensor parallelism over them"
    )
    vllm_backend: Literal["auto", "actor", "ray_llm"] = Field(
        "auto",
        description="vLLM in our actor pool (readout and n samples per request from one warm engine pool; auto) "
        "or Ray Data LLM (one row per sample, per-row seeds; its processor runs twice per estimate: readout, then samples)",
    )
    vllm_lora: Literal["auto", "lora", "merge"] = Field(
        "auto", description="serve an adapter via vLLM LoRA or merged into the base; auto = LoRA on GPU, merged on CPU"
    )
    prompt_engineering: bool = Field(False, description="state the target distribution in the prompt (the baseline)")
    max_contexts: int | None = Field(None, gt=0, description="estimate the first N contexts only")
    templates: list[str] | None = Field(
        None,
        description="attribute templates to sample (default: all, samples_per_context split over them); one template gets "
        "all samples_per_context, the paper's per-template protocol. Metrics per template are logged either way",
    )
    bootstrap_resamples: int = Field(1000, gt=0, description="bootstrap resamples of the MAE confidence interval")
    story_classifier: Literal["auto", "lexical", "judge"] = Field(
        "auto", description="stories: lexical word counts (gender only) or the LLM judge; auto = lexical for gender"
    )
    judge_model: str = Field("smollm2-135m", description="judge model (any alias, folder or hub id)")
    judge_max_new_tokens: int = Field(
        16,
        gt=0,
        description="the judge's reply budget: the embedded judge answers in a sentence ('The most likely gender of the "
        "main individual is female.'), which 8 tokens cut before the category",
    )
    seed: int = Field(0, description="seeds sampling (per request) and the bootstrap intervals")

    @model_validator(mode="after")
    def _check_gpus(self) -> EstimateConfig:
        if self.gpus_per_actor > 1 and not float(self.gpus_per_actor).is_integer():
            raise ValueError("gpus_per_actor above 1 is tensor parallelism: give a whole number of GPUs")
        return self

    def new_tokens(self) -> int:
        return self.max_new_tokens or (96 if self.task == "story" else 12)

    def story_classifier_for(self, attribute: str) -> str:
        """The story classifier in use: `auto` is the lexical one for gender, the judge otherwise."""
        if self.story_classifier != "auto":
            return self.story_classifier
        return "lexical" if attribute == "gender" else "judge"

    def actor_layout(self, engine: str, node_cpus: int) -> tuple[int, float]:
        """(actors, CPUs per actor) for the resolved engine: a CPU vLLM engine uses every core of a
        node (`node_cpus`: the largest node's), so one per node."""
        vllm_on_cpu = engine == "vllm" and self.gpus_per_actor == 0
        cpus = self.cpus_per_actor or (float(node_cpus) if vllm_on_cpu else 1.0)
        return self.num_actors or (1 if engine == "vllm" else 2), cpus
