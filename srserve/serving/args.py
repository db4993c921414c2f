"""The serving app's arguments: one pydantic model, validated once by `build_app` (from Python or a Serve config).

Placement is per stage: replicas, CPUs, GPUs and a custom Ray resource naming the pool (`sketch_pool`,
`render_pool` by default) so each pool maps to a KubeRay worker group advertising that resource.
`mode: colocated` replaces the four stages with one `Colocated` deployment whose replicas hold every role (the
baseline SR is compared against; with `force_switch: none` it is plain large-only serving).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from srserve.api.protocol import RequestLimits
from srserve.config import ModelSpec
from srserve.control.slo import SLOConfig
from srserve.pipeline.switch import parse_policy
from srserve.tiny import default_model_path


class SchedulingOptions(BaseModel):
    """How a Sketch or Render replica shares its device among the requests it holds (weighted fair queuing over
    requests, srserve.pipeline.scheduling): a small request is not held behind large ones, interactive before batch."""

    model_config = ConfigDict(extra="forbid")
    batch_weight: float = Field(0.125, gt=0, le=1, description="device share of a `batch` key's request against an "
                                "interactive one (it is never starved: it keeps this share)")
    short_s: float = Field(30.0, ge=0, description="a request with less estimated remaining work (seconds) ...")
    short_boost: float = Field(8.0, ge=1, description="... weighs this many times more (shortest first, bounded)")
    max_forward_s: float | None = Field(2.0, gt=0, description="same-shape requests share a forward while its "
                                        "estimated seconds stay under this (one request always); null: up to "
                                        "max_batch_size. Bounds the wait of a request arriving mid-forward")
    max_resident: int | None = Field(None, ge=1, description="requests held in device memory at once (the rest "
                                     "wait, interactive first); null: all that reach the replica "
                                     "(max_ongoing_requests)")


class StageOptions(BaseModel):
    """Placement and flow control of one stage's deployment."""

    model_config = ConfigDict(extra="forbid")
    num_replicas: int = Field(1, ge=1)
    autoscaling_config: dict[str, Any] | None = Field(None, description="Serve autoscaling; replaces num_replicas")
    num_cpus: float = Field(0.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    pool: str | None = Field(None, description="custom Ray resource of this stage's pool, e.g. sketch_pool")
    pool_amount: float = Field(1.0, gt=0, description="units of `pool` each replica takes")
    resources: dict[str, float] = Field(default_factory=dict, description="further custom resources")
    max_ongoing_requests: int | None = Field(None, ge=1, description="default: max_batch_size")
    max_queued_requests: int = Field(-1, ge=-1, description="-1: unbounded (the ingress admits jobs)")
    graceful_shutdown_timeout_s: float = Field(900.0, ge=0, description="long enough to finish a video")
    health_check_period_s: float = Field(10.0, gt=0)
    max_batch_size: int = Field(1, ge=1, description="requests sharing a denoising step (sketch, render)")
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="wait for more requests before a new batch")
    progress_interval_s: float = Field(1.0, ge=0, description="at most one progress report per job this often; "
                                       "a DELETE stops a running stage at the first step boundary after one")
    stats_window_s: float = Field(60.0, gt=0, description="seconds of request starts behind the arrival rate each "
                                  "replica reports to the autoscaling policy (simulated pools: scale it with the "
                                  "time factor)")
    torch_threads: int | None = Field(None, ge=1)
    cpu_affinity: list[int] | None = Field(
        None, description="pin the replicas' processes to these CPU cores (simulated pools on one machine)")
    log_prompts: bool = Field(False, description="write the prompt in this stage's transition log lines "
                              "(AppArgs.log_prompts turns it on for every stage)")
    model_name: str | None = Field(None, description="the `model` label of this stage's metrics; build_app sets "
                                   "it from AppArgs.model_name (default: the spec's name)")
    checkpoint_url: str | None = Field(None, description="where the denoising stages save the state they hand on "
                                       "(build_app sets the artifacts URL when watchdog.checkpoint_stages)")
    scheduling: SchedulingOptions = Field(default_factory=SchedulingOptions, description="sketch, render: "
                                          "which requests step first")

    def resources_needed(self) -> dict[str, float]:
        needed = dict(self.resources)
        if self.pool:
            needed[self.pool] = needed.get(self.pool, 0.0) + self.pool_amount
        return needed

    def deployment_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests or self.max_batch_size,
            "max_queued_requests": self.max_queued_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "health_check_period_s": self.health_check_period_s,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                                  "resources": self.resources_needed()},
        }
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = self.autoscaling_config
        else:
            options["num_replicas"] = self.num_replicas
        return options


# Each stage's own defaults, kept when a config sets only some fields. `pool: null` places without a pool.
# Encode and Decode run one request at a time under their own lock; more than one may be assigned to a replica, so
# waiting happens in the replica (cheap) rather than in every caller's router, which re-probes replicas for free
# capacity while a request waits (seen: most of the ingress's CPU per request with a limit of 1).
QUEUE_IN_REPLICA = 16


class EncodeOptions(StageOptions):
    pool: str | None = "render_pool"
    pool_amount: float = Field(0.25, gt=0)
    max_ongoing_requests: int | None = Field(QUEUE_IN_REPLICA, ge=1)
    prompt_cache_size: int = Field(256, ge=0, description="prompt embeddings kept per replica (LRU)")
    embeddings_held: int = Field(64, ge=1, description="object-store copies of recent embeddings this replica "
                                 "holds for the denoising stages that read them (>= the jobs in flight)")


# A denoising replica schedules only the requests that reached it: one waiting in a caller's router (beyond
# max_ongoing_requests) is invisible to it, and was seen waiting 120 s+ behind four max-size jobs.
class SketchOptions(StageOptions):
    pool: str | None = "sketch_pool"
    max_ongoing_requests: int | None = Field(QUEUE_IN_REPLICA, ge=1)


class RenderOptions(StageOptions):
    pool: str | None = "render_pool"
    pool_amount: float = Field(0.5, gt=0)
    max_ongoing_requests: int | None = Field(QUEUE_IN_REPLICA, ge=1)


class DecodeOptions(StageOptions):
    pool: str | None = "render_pool"
    pool_amount: float = Field(0.25, gt=0)
    max_ongoing_requests: int | None = Field(QUEUE_IN_REPLICA, ge=1)


class ColocatedOptions(StageOptions):
    """`mode: colocated`: each replica runs encode -> sketch -> render -> decode in-process, one compute at a time."""

    pool: str | None = "colocated_pool"
    prompt_cache_size: int = Field(256, ge=0, description="prompt embeddings kept per replica (LRU)")
    force_switch: str | None = Field(
        None, description="run every request with this switch policy; `none` = large-only (no render model)")

    @field_validator("force_switch")
    @classmethod
    def _known_policy(cls, value: str | None) -> str | None:
        return None if value is None else str(parse_policy(value))


class IngressOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(200, ge=1)
    max_queued_requests: int = Field(200, ge=-1)
    backpressure_status: Literal[429, 503] = 429
    # Serve replaces a dead replica once a health check fails: with one ingress replica the API is away that long
    # plus a restart (2 replicas: the proxy drops the dead one at its first failed probe and the other answers).
    health_check_period_s: float = Field(2.0, gt=0, description="how often Serve checks each ingress replica")

    def deployment_options(self, retry_after_s: float) -> dict[str, Any]:
        return {"num_replicas": self.num_replicas, "max_ongoing_requests": self.max_ongoing_requests,
                "health_check_period_s": self.health_check_period_s,
                "max_queued_requests": self.max_queued_requests,
                "backpressure_config": {"status_code": self.backpressure_status, "retry_after_s": retry_after_s},
                "ray_actor_options": {"num_cpus": self.num_cpus}}


class WatchdogOptions(BaseModel):
    """No job stays in_progress forever: leases on drivers, heartbeats from stages, deadlines."""

    model_config = ConfigDict(extra="forbid")
    interval_s: float = Field(1.0, gt=0, description="how often a driver renews leases and checks its jobs")
    lease_s: float = Field(6.0, gt=0, description="a job whose driver stops renewing is taken over after this "
                           "(by another ingress replica, or the restarted one), resumed from its last checkpoint")
    stage_timeout_s: float = Field(600.0, gt=0, description="a running stage silent this long is retried")
    job_timeout_s: float = Field(7200.0, gt=0, description="a job not finished after this fails")
    cancel_grace_s: float = Field(5.0, ge=0, description="after DELETE, wait this long for a stage to stop")
    checkpoint_stages: bool = Field(True, description="save the state each denoising stage hands on in the "
                                    "artifact store, so a retried or taken-over job resumes after the last "
                                    "finished stage (one write per hop; removed when the job ends)")

    @model_validator(mode="after")
    def _lease_outlasts_interval(self) -> "WatchdogOptions":
        if self.lease_s <= 2 * self.interval_s:
            raise ValueError(f"watchdog.lease_s ({self.lease_s}) must exceed 2 x interval_s ({self.interval_s})")
        return self


class QuotaOptions(BaseModel):
    """What one API key may hold at once; 429 + Retry-After naming the limit beyond. null: no limit."""

    model_config = ConfigDict(extra="forbid")
    max_in_flight: int | None = Field(16, ge=1, description="queued + in_progress jobs of one key")
    max_per_minute: int | None = Field(60, ge=1, description="jobs one key may create in any 60 s")
    max_cost_in_flight: float | None = Field(None, gt=0, description="summed estimated cost (GPU-seconds) of "
                                             "one key's unfinished jobs")


class AuthOptions(BaseModel):
    """API keys: a file of `name:key [admin] [priority=batch] [max_in_flight=N] ...` lines (a mounted Secret)."""

    model_config = ConfigDict(extra="forbid")
    api_keys_file: str = Field(description="path of the keys file, read by each ingress replica at start")
    quotas: QuotaOptions = Field(default_factory=QuotaOptions, description="per key, unless its line overrides")


class AdmissionOptions(BaseModel):
    """Cost-aware admission (srserve.serving.admission): what a request costs per stage, a ceiling, a deadline.

    Prices are seconds on one replica, measured on srd-tiny on the CI CPU (benchmarks/results/REPORT.md: a 30-step
    64x64x17 request, 80 latent tokens: sketch 63.4 ms and render 16.5 ms per guided step, encode 0.028 s, decode
    0.306 s); completed jobs refine them (learn). Set them per deployment for other models and devices."""

    model_config = ConfigDict(extra="forbid")
    sketch_s_per_token_step: float = Field(7.8e-4, gt=0, description="sketch model: seconds per latent token and "
                                           "guided step")
    render_s_per_token_step: float = Field(2.0e-4, gt=0, description="render model: the same")
    encode_s: float = Field(0.03, ge=0, description="prompt encoding, per request")
    decode_s_per_token: float = Field(3.8e-3, ge=0, description="VAE decode and video encoding, per latent token")
    attention_tokens: float = Field(5000.0, gt=0, description="tokens at which attention doubles a step's cost "
                                    "per token (the quadratic part)")
    adaptive_sketch_fraction: float = Field(0.32, ge=0, le=1, description="expected sketch share of the steps "
                                            "under an adaptive switch (srd-tiny: 9.5 of 30, srserve/sim)")
    learn: bool = Field(True, description="refine the prices from completed jobs' stage times (EWMA, per ingress)")
    learn_rate: float = Field(0.2, gt=0, le=1)
    max_request_cost_s: float | None = Field(None, gt=0, description="one request's estimated cost above this "
                                             "is refused with 422 naming the field; null: no ceiling")
    check_deadline: bool = Field(True, description="refuse (429/503 + Retry-After) a job whose projected "
                                 "completion under the current queue is past its deadline")
    default_deadline_s: float | None = Field(None, gt=0, description="a job's deadline unless the request sets "
                                             "a lower deadline_s; null: watchdog.job_timeout_s")


class SLOOptions(BaseModel):
    """The SLO-driven switch point (srserve.control.slo): each ingress replica caps the sketch steps of the jobs it
    creates (an earlier switch) while their p95 end-to-end latency threatens `p95_target_s`, never below
    `floor_steps`, and lifts the cap as load falls. A client's fixed `switch` (step:K, ratio:R, none, small-only)
    is never overridden; an adaptive policy keeps its rule, with its `max=` lowered to the cap."""

    model_config = ConfigDict(extra="forbid")
    p95_target_s: float = Field(gt=0, description="the p95 end-to-end latency (created -> completed) to hold")
    floor_steps: int = Field(ge=1, description="quality floor: the cap never goes below this many sketch steps "
                             "(at reference_steps)")
    reference_steps: int | None = Field(None, ge=1, description="the step count the cap is counted at (a request "
                                        "with another N gets it scaled); null: the model's default steps")
    ceiling_steps: int | None = Field(None, ge=1, description="the uncapped latest switch; null: the adaptive "
                                      "rule's max (60% of reference_steps)")
    threaten_ratio: float = Field(0.9, gt=0, description="lower the cap while the p95 is above this x the target")
    relax_ratio: float = Field(0.7, gt=0, description="raise it while below this x the target (< threaten_ratio)")
    step: int = Field(2, ge=1, description="sketch steps per move of the cap")
    interval_s: float = Field(30.0, ge=0, description="at most one move this often")
    window_s: float = Field(300.0, gt=0, description="completed jobs older than this are not counted")
    min_samples: int = Field(20, ge=1, description="completed jobs needed for an observed p95")
    tick_s: float = Field(5.0, gt=0, description="how often each ingress replica runs the controller")

    @model_validator(mode="after")
    def _consistent(self) -> "SLOOptions":
        # SLOConfig's own checks, so a config is refused where it is read; without reference_steps the floor is
        # checked against the model's default steps when the ingress starts (the card is not read here: no I/O).
        reference = self.reference_steps or max(self.floor_steps, self.ceiling_steps or 1)
        try:
            self.config(reference)
        except ValueError as err:
            raise ValueError(f"slo: {err}") from None
        return self

    def config(self, default_steps: int) -> SLOConfig:
        """The controller's config; `default_steps`: the model's default N (used when reference_steps is null)."""
        fields = self.model_dump(exclude={"tick_s"})
        fields["reference_steps"] = self.reference_steps or default_steps
        return SLOConfig(**fields)


class AppArgs(BaseModel):
    """Everything `srserve.serving:build_app` takes (the `args:` of a Serve config application)."""

    model_config = ConfigDict(extra="forbid")
    model: str | ModelSpec = Field(
        default_factory=default_model_path,
        description="model spec: a diffusers dir, a YAML/JSON spec file, or the ModelSpec fields inline "
                    "(checkpoint paths); default (or null): the bundled srd-tiny")
    model_name: str | None = Field(None, description="name clients use; default: the spec's name")
    mode: Literal["disaggregated", "colocated"] = Field(
        "disaggregated", description="disaggregated: encode/sketch/render/decode deployments on their pools; "
                                     "colocated: one deployment whose replicas hold every role")
    colocated: ColocatedOptions = Field(default_factory=ColocatedOptions, description="used when mode=colocated")
    flex: ColocatedOptions | None = Field(
        None, description="mode=disaggregated: Colocated replicas (each on a GPU that holds both models) beside the "
                          "pools; a job runs whole on a free one, else through the pools. Whole GPUs split into "
                          "pools cannot follow a stage ratio such as 5.7 : 2.3; flex GPUs take up the remainder")
    encode: EncodeOptions = Field(default_factory=EncodeOptions)
    sketch: SketchOptions = Field(default_factory=SketchOptions)
    render: RenderOptions = Field(default_factory=RenderOptions)
    decode: DecodeOptions = Field(default_factory=DecodeOptions)
    ingress: IngressOptions = Field(default_factory=IngressOptions)
    job_store_path: str = Field(".srserve/jobs.sqlite", description="SQLite file of the job records")
    job_store_num_cpus: float = Field(0.0, ge=0)
    job_store_resources: dict[str, float] = Field(default_factory=dict,
                                                  description="pin the JobStore where its volume is")
    artifacts_url: str = Field(".srserve/artifacts", description="fsspec URL or directory for videos")
    save_frames_npy: bool = Field(False, description="also store float32 frames (frames.npy variant)")
    limits: RequestLimits = Field(default_factory=RequestLimits)
    max_pending_jobs: int = Field(64, ge=1, description="queued + in_progress jobs before 429")
    retry_after_s: int = Field(5, ge=1, description="Retry-After sent with 429")
    max_retries: int = Field(2, ge=0, description="retries of a job whose stage replica died or stalled")
    watchdog: WatchdogOptions = Field(default_factory=WatchdogOptions)
    log_prompts: bool = Field(False, description="write prompts in the stages' transition log lines (prompts are "
                              "user data: off by default)")
    auth: AuthOptions | None = Field(None, description="API keys; without them every client is one anonymous "
                                     "caller, allowed only on a loopback host unless open_access is set")
    open_access: bool = Field(False, description="serve without API keys on a non-loopback host (say so on purpose)")
    api_docs: bool = Field(False, description="serve /docs, /redoc and /openapi.json")
    max_body_bytes: int = Field(4 << 20, ge=1024, description="largest request body; larger is refused with 413 "
                                "before it is parsed")
    admission: AdmissionOptions = Field(default_factory=AdmissionOptions)
    job_ttl_s: float = Field(86400.0, gt=0, description="a job's record and videos are removed this long after it "
                             "was created (the Video's expires_at)")
    sweep_interval_s: float = Field(300.0, gt=0, description="how often each ingress replica removes expired and "
                                    "deleted records and their artifacts")
    slo: SLOOptions | None = Field(None, description="the SLO-driven switch point (a cap on the sketch steps "
                                   "under load); null: no controller, every job runs the switch it resolved to")

    @model_validator(mode="after")
    def _flex_beside_pools(self) -> "AppArgs":
        if self.flex is None:
            return self
        if self.mode != "disaggregated":
            raise ValueError("flex: Colocated replicas beside the pools need mode: disaggregated (mode: colocated "
                             "is all flex)")
        if self.flex.force_switch is not None or self.flex.autoscaling_config:
            raise ValueError("flex: runs each job as the pools would (no force_switch) on a fixed number of "
                             "replicas (no autoscaling_config)")
        return self

    def flex_slots(self) -> int:
        """Jobs each ingress replica may place on flex replicas at once: one per flex replica, shared out among
        the ingress replicas (each counts only its own)."""
        if self.flex is None:
            return 0
        return max(1, self.flex.num_replicas // max(1, self.ingress.num_replicas))

    @field_validator("model", mode="before")
    @classmethod
    def _bundled_when_null(cls, value: Any) -> Any:
        # The app names its model; `model: null` in a Serve config means the bundled one, passed on by path.
        return default_model_path() if value is None else value

    def resolved(self) -> "AppArgs":
        """Local paths made absolute where the app is built, so every replica sees the same files."""
        updates: dict[str, Any] = {"job_store_path": str(Path(self.job_store_path).expanduser().resolve())}
        if "://" not in self.artifacts_url:
            updates["artifacts_url"] = str(Path(self.artifacts_url).expanduser().resolve())
        if isinstance(self.model, str) and "://" not in self.model:
            updates["model"] = str(Path(self.model).expanduser().resolve())
        return self.model_copy(update=updates)

    def stages(self) -> dict[str, StageOptions]:
        """The deployments a job goes through, in order."""
        if self.mode == "colocated":
            return {"colocated": self.colocated}
        return {"encode": self.encode, "sketch": self.sketch, "render": self.render, "decode": self.decode}

    def resources_needed(self) -> dict[str, float]:
        """Custom resources the whole app needs at its configured replica counts (for a local cluster)."""
        total: dict[str, float] = {}
        for options in [*self.stages().values(), *([self.flex] if self.flex else [])]:
            replicas = options.num_replicas
            if options.autoscaling_config:
                replicas = int(options.autoscaling_config.get("max_replicas", replicas))
            for name, amount in options.resources_needed().items():
                total[name] = total.get(name, 0.0) + amount * replicas
        return total
