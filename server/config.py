"""Server configuration: one frozen dataclass, validated at start with one line per problem.

Light to import: the modules its parts come from (onnxruntime, grpc, protobuf among them) are
imported only when a part is asked for, so that `digit-server` can take signals, print --help
and --version before those seconds of imports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from digit_recognizer.server.batcher import BatcherLimits
    from digit_recognizer.server.dataplane import RequestLimits
    from digit_recognizer.server.inference import InferenceOptions
    from digit_recognizer.server.repository import RepositoryLimits, VersionPolicy
    from digit_recognizer.server.security import SecurityConfig

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")  # logging's names; the flag takes lowercase
LOG_FORMATS = ("text", "json")
CONTROL_MODES = ("none", "poll", "explicit")  # repository.py's, without importing it


@dataclass(frozen=True)
class ServerConfig:
    model: Path  # a repository of one model, unless model_repository is given
    model_repository: Path | None = None  # DIR/<name>/<version>/model.onnx
    version_policy: str = "latest"  # latest | all | specific:1,3
    model_control_mode: str = "poll"  # none | poll | explicit (Triton's names)
    load_model: tuple[str, ...] = ()  # explicit mode: the models served at start; "*" = all
    default_model: str = ""  # what an empty model name means; "" = the first name served
    max_models: int = 64  # model versions served at once; more are listed UNAVAILABLE
    max_model_bytes: int = 128 << 20  # a bigger model file is refused before it is read
    host: str = "[::]"
    port: int = 50051
    provider: str = "auto"
    max_batch_size: int = 256
    max_delay_us: int = 0
    max_queue_size: int = 4096
    inline_max_us: int = 250
    max_images_per_request: int = 1024
    intra_op_threads: int = 0
    spin_wait: bool = False
    allow_tf32: bool = False  # CUDA only: faster, but outputs differ from the CPU's (5.6e-4)
    workers: int = 1
    # Set by the supervisor in each of --workers N's processes (where `workers` is 1): how
    # many there are and which one this is, for replies (Telemetry.worker) and ModelConfig.
    instances: int = 1
    instance: int = 0
    # Connections are closed (GOAWAY) after this long, so that the kernel spreads long-lived
    # clients over the workers again; calls in progress get the grace to finish. 0: never.
    max_connection_age_s: float = 60.0
    max_connection_age_grace_s: float = 600.0
    metrics_port: int | None = 8002  # None: no metrics endpoint; 0: any free port
    metrics_host: str = "127.0.0.1"  # unauthenticated: loopback unless asked (containers do)
    http_port: int | None = None  # None: no HTTP front; 0: any free port
    # A connection has this long to send a request's head, from its opening or its last
    # response (slowloris); past http_max_connections the one waiting longest is closed.
    http_header_timeout_s: float = 10.0
    http_max_connections: int = 1000
    # gRPC calls at once on one HTTP/2 connection: what one connection can put ahead of the
    # others' calls (10,000 streams on one held another connection's calls 0.25-0.54 s at
    # 1,000; 0.10-0.12 s at 256; 0.03-0.07 s at 128, which refuses bursts the tests make).
    max_streams_per_connection: int = 256
    grace_s: float = 20.0
    drain_delay_s: float = 0.0  # after SIGTERM, serve this long before the quiet-window logic
    reload_interval_s: float = 2.0  # how often to look for a new model file; 0 = never
    log_level: str = "INFO"
    log_format: str = "text"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token_file: Path | None = None
    plaintext: bool = False  # serving without TLS must be asked for
    http_plaintext: bool = False  # plain HTTP beside TLS gRPC must be asked for too

    @property
    def security(self) -> SecurityConfig:
        from digit_recognizer.server.security import SecurityConfig

        return SecurityConfig(
            self.tls_cert,
            self.tls_key,
            self.tls_client_ca,
            self.auth_token_file,
            self.plaintext,
            self.http_plaintext,
        )

    @property
    def batcher_limits(self) -> BatcherLimits:
        from digit_recognizer.server.batcher import BatcherLimits

        return BatcherLimits(
            self.max_batch_size, self.max_delay_us, self.max_queue_size, self.inline_max_us
        )

    @property
    def inference(self) -> InferenceOptions:
        from digit_recognizer.server.inference import InferenceOptions

        return InferenceOptions(
            self.provider, self.intra_op_threads, self.spin_wait, self.allow_tf32
        )

    @property
    def request_limits(self) -> RequestLimits:
        from digit_recognizer.server.dataplane import RequestLimits

        return RequestLimits(self.max_images_per_request, self.max_message_bytes)

    @property
    def repository_limits(self) -> RepositoryLimits:
        from digit_recognizer.server.repository import RepositoryLimits

        return RepositoryLimits(self.max_models, self.max_model_bytes)

    @property
    def policy(self) -> VersionPolicy:
        from digit_recognizer.server.repository import VersionPolicy

        return VersionPolicy.parse(self.version_policy)

    @property
    def max_message_bytes(self) -> int:
        from digit_recognizer.server.validation import max_message_bytes

        return max_message_bytes(self.max_images_per_request)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _control_problems(self) -> list[str]:
        mode, names = self.model_control_mode, self.load_model
        if mode not in CONTROL_MODES:
            return [f"--model-control-mode must be {', '.join(CONTROL_MODES)}, got {mode!r}"]
        if mode != "explicit":
            return ["--load-model needs --model-control-mode explicit"] if names else []
        problems = []
        if self.model_repository is None:
            problems.append("--model-control-mode explicit needs --model-repository")
        if not names:
            problems.append(
                "--model-control-mode explicit: name the models to serve at start with "
                "--load-model NAME (or --load-model '*' for all)"
            )
        elif "*" in names and len(set(names)) > 1:
            problems.append("--load-model '*' means every model: give it alone")
        if self.workers > 1:  # each worker has its own repository; a request reaches one
            problems.append(
                "--model-control-mode explicit needs --workers 1: a load or unload request "
                "would reach one worker process only"
            )
        return problems

    def validate(self) -> list[str]:
        # The batcher names its fields; here they are spelled as the flags the user typed.
        problems = [
            f"--{field.replace('_', '-')} {problem}"
            for field, problem in (
                self.batcher_limits.problems() + self.repository_limits.problems()
            )
        ]
        if self.model_repository is not None:
            if not self.model_repository.is_dir():
                problems.append(f"--model-repository {self.model_repository}: no such directory")
        elif not self.model.is_file():
            problems.append(f"--model {self.model}: no such file")
        # Parsed whatever the source: --model FILE is a repository of one model, and its
        # start parses the policy too (a wrong one used to escape here as a traceback).
        try:
            self.policy  # noqa: B018 (parsed for its error)
        except ValueError as exc:
            problems.append(f"--version-policy {exc}")
        if not 0 <= self.port <= 65535:
            problems.append(f"--port must be in 0..65535, got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            problems.append(f"--metrics-port must be in 0..65535, got {self.metrics_port}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            problems.append(f"--http-port must be in 0..65535, got {self.http_port}")
        if self.http_header_timeout_s <= 0:
            problems.append(
                f"--http-header-timeout must be > 0 seconds, got {self.http_header_timeout_s}"
            )
        if self.http_max_connections < 1:
            problems.append(
                f"--http-max-connections must be at least 1, got {self.http_max_connections}"
            )
        if self.max_streams_per_connection < 1:
            problems.append(
                "--max-streams-per-connection must be at least 1, got "
                f"{self.max_streams_per_connection}"
            )
        if self.provider not in ("auto", "cpu", "cuda"):
            problems.append(f"--provider must be auto, cpu or cuda, got {self.provider!r}")
        if self.max_images_per_request < 1:
            problems.append(
                f"--max-images-per-request must be at least 1, got {self.max_images_per_request}"
            )
        elif self.max_images_per_request > self.max_queue_size:
            problems.append(
                f"--max-images-per-request ({self.max_images_per_request}) cannot exceed "
                f"--max-queue-size ({self.max_queue_size}): such requests could never be queued"
            )
        if self.intra_op_threads < 0:
            problems.append(f"--intra-op-threads must be >= 0, got {self.intra_op_threads}")
        if self.workers < 1:
            problems.append(f"--workers must be at least 1, got {self.workers}")
        if self.max_connection_age_s < 0 or self.max_connection_age_grace_s < 0:
            problems.append("--max-connection-age and its grace must be >= 0 seconds")
        problems += self._control_problems()
        if self.reload_interval_s < 0:
            problems.append(f"--reload-interval must be >= 0 seconds, got {self.reload_interval_s}")
        if self.drain_delay_s < 0:
            problems.append(f"--drain-delay must be >= 0 seconds, got {self.drain_delay_s}")
        if self.grace_s < 0:
            problems.append(f"--grace-period must be >= 0 seconds, got {self.grace_s}")
        if self.log_level not in LOG_LEVELS:
            problems.append(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        problems += self.security.validate()
        if self.log_format not in LOG_FORMATS:
            problems.append(f"--log-format must be text or json, got {self.log_format!r}")
        return problems
