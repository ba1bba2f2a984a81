"""One typed config tree for every process (STYLE: one pydantic tree, extra keys forbidden).

Loaded from YAML, overridden with ``--set section.key=value``, validated once at
the edge (``load_config``), saved resolved into the run folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A user error in the config: the message is one line naming the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


ScheduleName = Literal["linear", "cosine", "scaled_linear"]
VarType = Literal["fixed_small", "fixed_large", "learned", "learned_range"]
PredictionType = Literal["eps", "v", "x0"]


class DiffusionConfig(_Strict):
    """A teacher's diffusion (guided-diffusion's flags) and the distillation chain on it."""

    schedule: ScheduleName = "cosine"
    num_timesteps: int = Field(1000, ge=2)
    var_type: VarType = "learned_range"
    prediction: PredictionType = "eps"
    clip_denoised: bool = True
    # The distillation chain: "" = the full chain (the paper), else a respacing such as "100".
    respacing: str = ""


class AnalyticConfig(_Strict):
    """The exact Gaussian-mixture teacher: K isotropic components in an image-shaped space."""

    num_components: int = Field(8, ge=1)
    channels: int = Field(1, ge=1)
    image_size: int = Field(8, ge=1)
    component_std: float = Field(0.1, gt=0)
    mean_scale: float = Field(0.7, gt=0)
    seed: int = 0
    class_conditional: bool = False       # labels y are the mixture components (num_classes = K)


class FaultConfig(_Strict):
    """Fault injection for the tests of the service's recovery (docs/faults.md); off unless set."""

    raise_after_forwards: int | None = Field(None, ge=0)   # a teacher's forward raises once it has made this many
    incarnations: int | None = Field(None, ge=1)           # only each actor's first n incarnations raise (None: all)
    teachers: list[int] | None = None                      # only these teacher indices raise (None: all)


class TeacherConfig(_Strict):
    kind: Literal["analytic", "guided_diffusion", "diffusers", "dkdm"] = "analytic"
    path: str | None = None               # checkpoint file or folder (local only)
    flags: dict[str, Any] = Field(default_factory=dict)   # guided-diffusion create_model flags
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    analytic: AnalyticConfig = Field(default_factory=AnalyticConfig)
    use_ema: bool = True                  # dkdm checkpoints: load ema.safetensors when present
    device: str = "auto"
    fault: FaultConfig = Field(default_factory=FaultConfig)

    @model_validator(mode="after")
    def _path_needed(self):
        if self.kind != "analytic" and not self.path:
            raise ValueError(f"teacher.path is required for teacher.kind={self.kind!r}")
        return self


class StudentConfig(_Strict):
    arch: Literal["adm", "dit", "mlp"] = "adm"
    size: str | None = None               # a named size from the registry (e.g. "14M", "DiT-S/2")
    flags: dict[str, Any] = Field(default_factory=dict)   # overrides of the size's flags


class PoolConfig(_Strict):
    backend: Literal["local", "ray", "redis"] = "local"
    rho: float = Field(0.4, gt=0)
    num_slots: int | None = Field(None, ge=1)   # explicit size instead of round(rho * T) * b
    shards: int = Field(1, ge=1)
    # x_t and eps in storage_dtype (teachers round x_t to it before the forward, so the student sees exactly the
    # teacher's input); logvar always fp32: fp16/bf16 rounding exceeds Eq. 12's interval at large t (docs/pool.md)
    storage_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    lease_timeout_s: float = Field(60.0, gt=0)
    claim_timeout_s: float = Field(60.0, gt=0)
    min_ready_fraction: float = Field(1.0, ge=0, le=1)   # READY fill before the first draw
    samples_per_insert: float = Field(1.0, gt=0)
    block_timeout_s: float = Field(300.0, gt=0)
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_retry_timeout_s: float = Field(30.0, gt=0)   # connection loss: retry with backoff, then PoolError
    name: str = "dkdm"
    # ray backend: clients on a shard actor's node map its slots (a memfd) and run draws, releases, claims
    # and fills themselves under the file's lock, with no RPC (docs/pool.md). false: every call is an RPC.
    shared_memory: bool = True
    # ray backend, where the shard actors go: "spread" over nodes (Ray's SPREAD) or Ray's default packing;
    # ``shard_resources`` pins them to nodes offering a custom resource, e.g. {"pool": 1}; a killed shard
    # actor is restarted empty up to ``shard_max_restarts`` times (-1: always)
    shard_strategy: Literal["default", "spread"] = "default"
    shard_resources: dict[str, float] = Field(default_factory=dict)
    shard_max_restarts: int = Field(-1, ge=-1)
    # Consumer groups (issue 8, docs/shared_pools.md): several students on one pool, each record trained on
    # once by every group. None: a plain consumer. ``group_max_lag`` (records) is needed by policy "skip".
    group: str | None = None
    group_policy: Literal["wait", "skip"] = "wait"
    group_max_lag: int | None = Field(None, ge=0)


class DistillConfig(_Strict):
    variant: Literal["dynamic", "shuffled", "iterative"] = "dynamic"
    batch_size: int = Field(128, ge=1)
    steps: int = Field(1000, ge=0)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    ema_rate: float = Field(0.9999, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)        # None: no clipping (as the reference)
    lambda_vlb: float = Field(1.0, ge=0)        # reference: L_simple* + L_vlb* (bits/dim, mean)
    teacher_microbatch: int = Field(256, ge=1)  # teacher forward batch (warm-up and refill)
    bf16: bool = True                            # autocast where the device supports it


class SampleConfig(_Strict):
    sampler: Literal["ancestral", "ddim"] = "ancestral"
    steps: str = "50"
    # Original timesteps of the T-step schedule to sample on, instead of the ``steps`` respacing of the
    # model's own chain: models on different chains (a full-chain baseline, a respaced DKDM student)
    # then sample on the same steps. Each must be on the model's chain.
    timesteps: list[int] | None = None
    eta: float = 0.0
    num_samples: int = Field(64, ge=1)
    batch_size: int = Field(256, ge=1)
    use_ema: bool = True


class DataConfig(_Strict):
    """The baselines' data (paper Sec. 5.1): data-based, data-free (synthetic) and data-limited training."""

    dataset: str = "digits"                     # digits | digits16 | npz:PATH | folder:PATH | shards:PATH
    image_size: int | None = None               # folder datasets: resize to this
    class_cond: bool = False                    # data-based students conditioned on the dataset's labels
    synthetic_dir: str | None = None            # where `dkdm synth` writes (and data-free training reads)
    num_synthetic: int = Field(1797, ge=1)      # default: the size of sklearn's digits
    synth_sampler: Literal["ancestral", "ddim"] = "ancestral"
    synth_steps: str = "100"
    shard_size: int = Field(1024, ge=1)
    real_percent: float = Field(0.0, ge=0, le=100)   # data-limited: P% of the set real, the rest synthetic


class RunConfig(_Strict):
    name: str = "dkdm"
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(0, ge=0)          # 0: only at the end
    ckpt_every: int = Field(0, ge=0)            # steps; 0: by time only (ckpt_every_s)
    # Time-based cadence (the distributed service): a killed trainer worker redoes at most this much training.
    ckpt_every_s: float = Field(180.0, ge=0)    # 0: no time-based checkpoints
    progress: bool = True


class RayConfig(_Strict):
    address: str | None = None                  # None: RAY_ADDRESS, else a local cluster
    num_workers: int = Field(1, ge=1)           # Ray Train student workers
    use_gpu: bool = False
    num_teachers: int = Field(1, ge=1)
    teacher_num_gpus: float = Field(0.0, ge=0)
    teacher_num_cpus: float = Field(1.0, gt=0)
    worker_num_cpus: float = Field(1.0, gt=0)
    max_restarts: int = Field(3, ge=0)
    max_failures: int = Field(2, ge=0)
    # Placement: custom resources each teacher actor / Ray Train worker requests on top of its CPUs and GPUs,
    # e.g. {teacher: 1} and {trainer: 1} for the Compose cluster's nodes (docs/local_cluster.md).
    teacher_resources: dict[str, float] = Field(default_factory=dict)
    worker_resources: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _custom_resources_only(self):
        for field in ("teacher_resources", "worker_resources"):
            for name, amount in getattr(self, field).items():
                if name in ("CPU", "GPU"):
                    raise ValueError(f"ray.{field}: {name} has its own field (ray.teacher_num_cpus, ray.use_gpu, ...)")
                if amount < 0:
                    raise ValueError(f"ray.{field}.{name}: must be >= 0, got {amount}")
        return self


class MetricsConfig(_Strict):
    enabled: bool = True
    port: int = Field(9400, ge=0, le=65535)     # base port of the project's Prometheus endpoints


class Config(_Strict):
    run: RunConfig = Field(default_factory=RunConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    pool: PoolConfig = Field(default_factory=PoolConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=c`` -> ("a.b", yaml-parsed c)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _format_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "config"
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"config field {loc}: {msg}{more}"


def config_from_dict(tree: dict) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (optional) + ``--set`` overrides -> validated Config, or ConfigError (one line)."""
    tree: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return config_from_dict(tree)


# The Redis password when pool.redis_url carries none (docker-compose.yml sets it on every Ray node), so it
# appears in no job command line and no saved config.
REDIS_PASSWORD_ENV = "DKDM_REDIS_PASSWORD"


def mask_url(url: str) -> str:
    """``url`` (or a comma-separated list) with every password replaced by ``***``: the only form of a
    Redis URL that goes into a log line, an error message or a saved config."""
    out = []
    for u in url.split(","):
        parts = urlsplit(u.strip())
        if parts.password is not None:
            host = parts.netloc.rsplit("@", 1)[1]
            parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
        out.append(urlunsplit(parts))
    return ",".join(out)


def with_env_password(url: str) -> str:
    """``url`` with the password from ``DKDM_REDIS_PASSWORD`` when it names none (and the variable is set)."""
    password = os.environ.get(REDIS_PASSWORD_ENV)
    parts = urlsplit(url)
    if not password or parts.password is not None or parts.scheme == "unix":
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:{quote(password, safe='')}@{parts.netloc}"))


def public_dump(cfg: Config) -> dict:
    """The resolved config as JSON-ready data with secrets masked: what is saved and printed."""
    data = cfg.model_dump(mode="json")
    data["pool"]["redis_url"] = mask_url(data["pool"]["redis_url"])
    return data


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(json.dumps(public_dump(cfg), indent=2) + "\n")
