"""Request and response bodies (separate classes: what a client sends is not what it gets back)."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator

from diffusion.spec import (DEFAULT_SETTINGS, SAMPLER_LIST, GUIDANCE_RANGE, MAX_SEED, STEP_RANGES, SamplerName, Spacing,
                            format_guidance_interval, parse_guidance_interval, request_defaults)

STEPS_HELP = ("sampler steps: " + ", ".join(f"{s} {lo}-{hi}" for s, (lo, hi) in STEP_RANGES.items())
              + ", at most the checkpoint's timesteps (GET /models)")
CLASS_HELP = "class name (any case) or index (GET /classes)"
SPACING_HELP = ("where the sampler's steps fall: time (evenly in the timestep index) or logsnr (evenly in logSNR, "
                "more steps at low noise)")
GUIDANCE_INTERVAL_HELP = ("guide only the steps whose noise level sigma_t = sqrt((1 - abar_t) / abar_t) is in "
                          "(lo, hi]: 'lo,hi' or [lo, hi]; 'all' or null: every step")


def _interval(value: object) -> list[float] | None:
    """A request's guidance interval, 'lo,hi', [lo, hi], 'all' or null -> [lo, hi] or None (ValueError: 422).

    A list holds JSON numbers, as the rest of a strict body: not true, nor "0.5"."""
    if isinstance(value, (list, tuple)) and not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                    for v in value):
        raise ValueError(f"guidance interval [lo, hi] must hold two numbers; got {value!r}")
    interval = parse_guidance_interval(value)  # type: ignore[arg-type]
    return None if interval is None else list(interval)


# What a request may send; after validation [lo, hi] or None.  Its schema in /docs says what is sent.
RequestedInterval = Annotated[list[float] | None, BeforeValidator(_interval), WithJsonSchema({"anyOf": [
    {"type": "string", "description": "'lo,hi' or 'all'", "examples": ["0.28,4", "all"]},
    {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
    {"type": "null"}]}, mode="validation")]
_DEFAULT_INTERVAL = _interval(DEFAULT_SETTINGS.guidance_interval)

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
_ID = "3f2b8c9d0e1f4a5b8c7d6e5f4a3b2c1d"


class GenerateBody(BaseModel):
    """Several classes at once; every setting but ``classes`` may be left out."""
    # strict: true is not 1 image, nor "5" five, nor 5.5 anything
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"classes": {"cat": 50, "dog": 50}, **request_defaults(), "seed": 0}]})

    classes: dict[str, int] = Field(min_length=1, description=f"{CLASS_HELP} -> images",
                                    examples=[{"cat": 50, "dog": 50}])
    sampler: SamplerName = Field(DEFAULT_SETTINGS.sampler, description=SAMPLER_LIST)
    steps: int = Field(DEFAULT_SETTINGS.steps, ge=1, description=STEPS_HELP)
    guidance: float = Field(DEFAULT_SETTINGS.guidance, ge=GUIDANCE_RANGE[0], le=GUIDANCE_RANGE[1],
                            description="classifier-free guidance scale w (1 = none)")
    guidance_interval: RequestedInterval = Field(
        _DEFAULT_INTERVAL, description=f"{GUIDANCE_INTERVAL_HELP} (default "
                                       f"{format_guidance_interval(DEFAULT_SETTINGS.guidance_interval)})")
    spacing: Spacing = Field(DEFAULT_SETTINGS.spacing,
                             description=f"{SPACING_HELP} (default {DEFAULT_SETTINGS.spacing})")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="base seed; image i gets seed + i (default: drawn)")


class JobInput(BaseModel):
    """The request as the worker runs it: class names resolved, seed drawn if it was left out."""
    classes: dict[str, int] = Field(description="resolved class name -> images", examples=[{"cat": 100}])
    sampler: SamplerName
    steps: int
    guidance: float
    guidance_interval: list[float] | None = Field(
        None, description="guided only where lo < sigma_t <= hi; null: every step (and every job queued before "
                          "intervals existed), or no step when guidance is 0 or 1")
    spacing: Spacing = Field("time", description=f"{SPACING_HELP}; time for jobs queued before it was a setting")
    seed: int = Field(description="base seed; image i has seed + i")
    seed_drawn: bool = Field(False, description="true when the service drew the seed")


class JobOutput(BaseModel):
    grid: str = Field(description="PNG grid, one row per class", examples=[f"/jobs/{_ID}/grid.png"])
    zip: str = Field(description="every image (and the grid)", examples=[f"/jobs/{_ID}/images.zip"])
    manifest: str = Field(description="one entry per image: file, class, seed ...",
                          examples=[f"/jobs/{_ID}/manifest.json"])
    images: str = Field(description="URL pattern of image i, 0 <= i < count",
                        examples=[f"/jobs/{_ID}/images/{{i}}.png"])
    count: int
    checkpoint_sha256: str | None = None
    precision: str | None = Field(None, description="of the model calls: fp32 or bf16 (the worker's choice, "
                                                    "DREAMDATA_PRECISION); the same seed gives nearby, not equal, "
                                                    "images in the other", examples=["fp32"])


class Timings(BaseModel):
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queued_seconds: float | None = Field(None, description="submit to first start (so far, while queued)")
    run_seconds: float | None = Field(None, description="first start to finish (so far, while running), over "
                                                        "every delivery of a job whose worker was lost")


_TIMINGS = {"created_at": "2025-01-01T12:00:00Z", "started_at": "2025-01-01T12:00:01Z", "finished_at": None,
            "queued_seconds": 1.0, "run_seconds": 3.2}


class JobBase(BaseModel):
    """What every job record shows, whatever its type."""
    id: str
    url: str
    type: str
    status: JobStatus
    progress: float = Field(ge=0, le=1, description="fraction done")
    message: str | None = Field(None, description="what the job is doing now (evaluations)")
    queue_position: int | None = Field(
        description="1 = next to start; null unless queued, or when Redis could not tell")
    cancel_requested: bool
    attempts: int = Field(description="deliveries so far (more than 1 after a worker crash)")
    timings: Timings
    error: str | None


class GenerationJob(JobBase):
    """A generation job as clients see it."""
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": _ID, "url": f"/jobs/{_ID}", "type": "generation", "status": "running", "progress": 0.42,
        "message": None, "queue_position": None, "cancel_requested": False, "attempts": 1, "timings": _TIMINGS,
        "error": None, "images_done": 40, "images_total": 100, "step": 4, "steps": 20, "eta_seconds": 31.5,
        "input": {"classes": {"cat": 100}, **request_defaults(), "seed": 0,
                  "seed_drawn": False},
        "output": None}]})

    type: Literal["generation"] = "generation"
    images_done: int
    images_total: int
    step: int = Field(description="sampler step of the current batch")
    steps: int
    eta_seconds: float | None = Field(None, description="estimated seconds until it finishes, at the rate of its "
                                                        "run so far; null unless running and measured")
    input: JobInput
    output: JobOutput | None = Field(description="URLs, once the job succeeded")


ClassifierName = Literal["mlp", "cnn"]  # training.classifiers.CLASSIFIERS (imports torch; a test keeps them equal)
BudgetName = Literal["steps", "epochs"]  # training.evaluate.BUDGETS (likewise)
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
_EVAL_EXAMPLE = {"classifier": "mlp", "synthetic_per_class": 500, "real_fraction": 0.1, "epochs": 10,
                 "seeds": [0, 1, 2], **request_defaults(), "synthetic_seed": 0}


class EvaluationBody(BaseModel):
    """An augmentation experiment on the server's data set (real / real+synthetic / synthetic arms).

    Every field may be left out; there is no data-set field (the server's DREAMDATA_EVAL_DATA is used).
    """
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [_EVAL_EXAMPLE]})

    classifier: ClassifierName = Field("cnn", description="mlp (fast) or cnn (ResNet-9)")
    synthetic_per_class: int = Field(500, ge=1, le=5000, description="k: synthetic images added per class")
    real_fraction: float = Field(0.1, gt=0, le=1, description="f: class-balanced share of the real training set")
    epochs: int = Field(10, ge=1, le=200, description="passes over the real arm's training set")
    budget: BudgetName = Field(
        "steps", description="what every arm shares: steps (the real arm's optimizer steps: equal compute) or "
                             "epochs (each arm makes `epochs` passes over its own set, so bigger arms train longer)")
    seeds: list[Seed] = Field([0, 1, 2], min_length=1, max_length=10,
                              description="distinct seeds, one run of every arm each (3+ for a confidence interval)")
    sampler: SamplerName = Field(DEFAULT_SETTINGS.sampler, description=SAMPLER_LIST)
    steps: int = Field(DEFAULT_SETTINGS.steps, ge=1, description=STEPS_HELP)
    guidance: float = Field(DEFAULT_SETTINGS.guidance, ge=GUIDANCE_RANGE[0], le=GUIDANCE_RANGE[1],
                            description="classifier-free guidance scale w (1 = none)")
    guidance_interval: RequestedInterval = Field(
        _DEFAULT_INTERVAL, description=f"{GUIDANCE_INTERVAL_HELP} (default "
                                       f"{format_guidance_interval(DEFAULT_SETTINGS.guidance_interval)})")
    spacing: Spacing = Field(DEFAULT_SETTINGS.spacing,
                             description=f"{SPACING_HELP} (default {DEFAULT_SETTINGS.spacing})")
    synthetic_seed: int = Field(0, ge=0, le=MAX_SEED,
                                description="seed base: synthetic image j of class c gets sampler seed "
                                            "synthetic_seed + c * 1,000,000 + j")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be distinct")
        return seeds


class EvaluationInput(EvaluationBody):
    """The experiment as the worker runs it (every default filled in)."""
    model_config = ConfigDict(extra="ignore")

    # null for runs queued before intervals existed: they guided every step
    guidance_interval: list[float] | None = Field(None, description="guided only where lo < sigma_t <= hi; "
                                                                    "null: every step, or none at guidance 0 or 1")


class EvaluationOutput(BaseModel):
    report: str = Field(description="report.json: every number", examples=[f"/jobs/{_ID}/report.json"])
    report_md: str = Field(description="a readable summary", examples=[f"/jobs/{_ID}/report.md"])
    plots: dict[str, str] = Field(description="plot name -> PNG URL",
                                  examples=[{"accuracy": f"/jobs/{_ID}/plots/accuracy.png"}])
    accuracy_mean: dict[str, float] = Field(description="arm -> mean test accuracy over seeds",
                                            examples=[{"real": 0.41, "real+synthetic": 0.43, "synthetic": 0.22}])
    delta_mean: float = Field(description="real+synthetic minus real, mean over seeds (paired)")
    seconds: float
    checkpoint_sha256: str | None = None


class EvaluationJob(JobBase):
    """An evaluation job as clients see it; ``report`` is filled in by GET /evaluations/{id} only."""
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": _ID, "url": f"/evaluations/{_ID}", "type": "evaluation", "status": "running", "progress": 0.31,
        "message": "training mlp on real (5000 images), seed 1", "queue_position": None, "cancel_requested": False,
        "attempts": 1, "timings": _TIMINGS, "error": None, "input": _EVAL_EXAMPLE, "output": None, "report": None}]})

    type: Literal["evaluation"] = "evaluation"
    input: EvaluationInput
    output: EvaluationOutput | None = Field(description="URLs and headline numbers, once the job succeeded")
    report: dict | None = Field(None, description="report.json inline (GET /evaluations/{id}, once succeeded)")


AnyJob = Annotated[GenerationJob | EvaluationJob, Field(discriminator="type")]


class JobList(BaseModel):
    jobs: list[AnyJob]


class ClassInfo(BaseModel):
    index: int
    name: str


class ClassList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"classes": [{"index": 0, "name": "airplane"},
                                                                            {"index": 3, "name": "cat"}]}]})
    classes: list[ClassInfo]


class SamplerInfo(BaseModel):
    min_steps: int
    max_steps: int


class ModelOut(BaseModel):
    name: str = Field(description="checkpoint directory name", examples=["cifar10"])
    sha256: str | None = Field(description="of model.safetensors; also in every PNG's metadata")
    class_names: list[str]
    unet: dict
    schedule: dict
    provenance: dict = Field(description="what produced the checkpoint: steps, images seen, data set ...")
    format_version: int | None
    samplers: dict[str, SamplerInfo]
    defaults: dict = Field(examples=[{**request_defaults()}])


class ModelList(BaseModel):
    models: list[ModelOut]


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    broker: str = Field(description="ok, or why Redis is unreachable", examples=["ok"])
    workers: list[str] = Field(description="workers that answered a ping", examples=[["dreamdata-12@host"]])
    queued: int | None = Field(None, description="jobs waiting")
