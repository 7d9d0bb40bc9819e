"""Service settings: one pydantic-settings class, read through a cached getter.

Every field comes from an environment variable ``DREAMDATA_<FIELD>`` (the Redis URL also from
plain ``REDIS_URL``). Tests build ``Settings(...)`` directly or clear the cache after changing
the environment; nothing is read at import time.
"""
from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from diffusion.spec import SHIPPED_CHECKPOINT, Precision

CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune"]  # "off" or a torch.compile mode


class Settings(BaseSettings):
    # env_ignore_empty: DREAMDATA_X= (compose's ${X:-}) means "not set", as with the key and data set below: not
    # the current folder for a path, not a validation error for a number, not an empty Redis URL
    model_config = SettingsConfigDict(env_prefix="DREAMDATA_", frozen=True, validate_by_name=True,
                                      validate_by_alias=True, extra="ignore", env_ignore_empty=True)

    data_dir: Path = Field(Path("data"), description="jobs/<id>/ folders live here (shared by api and worker)")
    checkpoint: Path = Field(SHIPPED_CHECKPOINT, description="checkpoint directory (config.json + model.safetensors)")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="broker, result backend and job records",
                           validation_alias=AliasChoices("DREAMDATA_REDIS_URL", "REDIS_URL"))
    key_prefix: str = Field("dreamdata", description="prefix of every job-record key in Redis")
    queue: str = Field("dreamdata", description="Celery queue the API sends to and the worker reads")
    max_n: int = Field(10_000, ge=1, description="most images in one job")
    max_queued: int = Field(100, ge=0, description="queued jobs beyond which POST /generate and POST /evaluations "
                                                   "answer 429")
    api_key: SecretStr | None = Field(None, description="when set, every job route needs header X-API-Key")
    allow_public: bool = Field(False, description="without an API key, serve clients beyond loopback (and let the API "
                                                  "bind a non-loopback host): something else must guard it")
    batch_size: int | None = Field(None, ge=1, description="images per model batch in the worker (also the most "
                                                           "images that concurrent jobs merge into one batch); "
                                                           "default: 50 on a CPU, 256 on a GPU")
    pool: Literal["prefork", "threads"] = Field(
        "prefork", description="worker pool: prefork runs one job per process (a crashed job is requeued at once, "
                               "hard time limits kill it); threads runs `concurrency` jobs in one process and merges "
                               "their images into shared model batches (dynamic batching; the way to fill a GPU)")
    concurrency: int = Field(1, ge=1, description="jobs one worker runs at once (prefork: processes, each with its "
                                                  "own model; threads: threads sharing one model and its batches)")
    batch_window: float = Field(0.02, ge=0.0, description="seconds a batch waits for other jobs' images to join "
                                                          "(threads pool with concurrency > 1 only)")
    compile: CompileMode = Field(
        "off", description="torch.compile the UNet in this mode (reduce-overhead adds CUDA graphs on a GPU); "
                           "model batches are then padded to power-of-two sizes up to batch_size, so each shape "
                           "compiles once (at most ceil(log2(batch_size))+3 shapes, guided calls running twice "
                           "the rows; the first use of each waits for its compile)")
    precision: Precision = Field(
        "auto", description="model calls of sampling in fp32 or bf16 autocast; auto: bf16 on a GPU, and on a CPU "
                            "whichever a timing at model load finds faster (bf16 only if 1.2x; diffusion.precision)")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads per worker process (default: torch's; "
                                                              "1 on a CPU shared with other work)")
    job_time_limit: int = Field(3600, ge=1, description="soft time limit of a job, seconds")
    # Kept equal to job_time_limit by default: the visibility timeout (how long a job of a dead
    # worker waits before redelivery) must exceed the longest limit, so a longer evaluation limit
    # would delay crash recovery of every generation job too.  Raise both for long CPU evaluations.
    eval_time_limit: int = Field(3600, ge=1, description="soft time limit of an evaluation job, seconds")
    job_kill_grace: int = Field(30, ge=1, description="hard limit = soft limit + this, seconds")
    visibility_timeout: int | None = Field(None, description="seconds before an unacknowledged job is delivered "
                                                             "again (default: the longer hard limit + 300; a job "
                                                             "whose worker died waits this long)")
    eval_data: Path | None = Field(None, description="the labelled data set of POST /evaluations (CIFAR-10 "
                                                     ".tar.gz or folder); unset: evaluations are off (503)")
    keep_jobs: int = Field(7 * 24 * 3600, ge=0, description="seconds a finished job's record and files are kept "
                                                          "(the worker deletes older folders); 0: for ever")
    keep_cache: int = Field(30 * 24 * 3600, ge=0, description="seconds a cached data set or synthetic image set "
                                                            "of evaluations stays after its last use (at least the "
                                                            "evaluation hard limit); 0: for ever")
    max_attempts: int = Field(3, ge=1, description="deliveries of one job (worker crashes) before it is failed")
    progress_interval: float = Field(0.5, ge=0.0, description="least seconds between progress writes")
    ping_timeout: float = Field(1.0, gt=0.0, description="seconds /readyz waits for a worker to answer")

    @field_validator("api_key", "eval_data", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        # DREAMDATA_API_KEY= means no key, DREAMDATA_EVAL_DATA= no evaluations (not the current folder)
        return None if v is None or (isinstance(v, str) and not v.strip()) else v

    @field_validator("api_key", mode="before")
    @classmethod
    def _key_as_a_header_carries_it(cls, v: object) -> object:
        """Surrounding white space stripped (a secrets file's newline: HTTP strips it from the header, so the
        key could never match); printable ASCII only (other bytes do not reach the API as they were sent)."""
        if isinstance(v, str):
            v = v.strip()
            if not all(" " <= c <= "~" for c in v):
                raise ValueError("DREAMDATA_API_KEY must be printable ASCII (letters, digits, punctuation)")
        return v

    @property
    def hard_time_limit(self) -> int:
        return self.job_time_limit + self.job_kill_grace

    @property
    def eval_hard_time_limit(self) -> int:
        return self.eval_time_limit + self.job_kill_grace

    @property
    def effective_visibility_timeout(self) -> int:
        # One timeout for every task on the broker connection: it must outlast the longest job.
        longest = max(self.hard_time_limit, self.eval_hard_time_limit)
        return self.visibility_timeout if self.visibility_timeout is not None else longest + 300

    @property
    def model_batch(self) -> int:
        """``batch_size``, or where it is not set the default of the device the worker samples on (imports torch:
        the worker's side only)."""
        if self.batch_size is not None:
            return self.batch_size
        from diffusion.precision import default_device, sampling_batch
        return sampling_batch(default_device())

    @property
    def batching(self) -> bool:
        """Do concurrent jobs of this worker share model batches?"""
        return self.pool == "threads" and self.concurrency > 1

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir.resolve() / "jobs"

    @property
    def cache_dir(self) -> Path:
        """Decoded data sets and synthetic image sets of evaluation jobs (reused between jobs)."""
        return self.data_dir.resolve() / "cache"

    @model_validator(mode="after")
    def _visibility_above_hard_limit(self) -> "Settings":
        # A job still running when its message becomes visible again would run twice at once.
        longest = max(self.hard_time_limit, self.eval_hard_time_limit)
        if self.effective_visibility_timeout <= longest:
            raise ValueError(f"visibility_timeout ({self.effective_visibility_timeout} s) must exceed the longest hard "
                             f"time limit ({longest} s = job_time_limit or eval_time_limit + job_kill_grace)")
        return self


def is_loopback(host: str | None) -> bool:
    """Is ``host`` (a name or an address, IPv4-mapped IPv6 too) this machine's loopback?"""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached; ``get_settings.cache_clear()`` after changing the environment)."""
    return Settings()
