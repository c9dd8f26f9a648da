"""The YAML configuration as pydantic models, validated in full before anything starts.

Every model forbids unknown keys; transfer syntaxes are accepted as pydicom keywords or dotted UIDs and turned
into UIDs once, here (STYLE rules 7 and 8). `load()` is used by `check-config`, `run` and reload alike.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    ValidationError,
    field_validator,
    model_validator,
)
from pydicom.uid import UID

from scp import syntaxes
from scp.errors import ConfigError

KEEP = "keep"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _ae_title(value: str) -> str:
    """An AE title is 1-16 characters of the default repertoire, no backslash, not all spaces (PS3.5 6.2)."""
    if not value.strip() or len(value) > 16 or "\\" in value or not value.isprintable():
        raise ValueError(f"'{value}' is not a valid AE title (1-16 printable characters, no backslash)")
    return value.strip()


AETitle = Annotated[str, AfterValidator(_ae_title)]
TransferSyntax = Annotated[str, BeforeValidator(lambda v: syntaxes.resolve(str(v))), AfterValidator(UID)]
"""A pydicom UID keyword (`JPEGLSLossless`) or a dotted UID, held as a pydicom UID."""


class TlsConfig(_Model):
    """DICOM TLS (PS3.15 B.9, BCP 195): our certificate and key, and the CA that peers' certificates chain to."""

    cert: Path
    key: Path
    ca: Path | None = None
    require_client_cert: bool = False
    """Receiving only: refuse a peer that presents no certificate signed by `ca`."""

    @model_validator(mode="after")
    def _ca_for_client_certs(self) -> TlsConfig:
        if self.require_client_cert and self.ca is None:
            raise ValueError("require_client_cert needs `ca`: the CA that signs the modalities' certificates")
        return self


class AllowedCaller(_Model):
    """A calling AE title that may associate, optionally only from some addresses."""

    ae_title: AETitle
    hosts: list[IPvAnyNetwork] = Field(default_factory=list)
    """IP addresses or CIDR networks the AE may call from; empty: any address."""

    @field_validator("hosts", mode="before")
    @classmethod
    def _one_host(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class NodeConfig(_Model):
    """Where and as whom the node listens."""

    ae_title: AETitle = "COMPRESS_SCP"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)
    max_associations: int = Field(32, ge=1)
    max_pdu_size: int = Field(262_144, ge=0)
    acse_timeout: float = Field(30.0, gt=0)
    dimse_timeout: float = Field(60.0, gt=0)
    network_timeout: float = Field(60.0, gt=0)
    tls_handshake_timeout: float = Field(10.0, gt=0)
    stall_timeout: float = Field(900.0, gt=0)
    """Seconds one instance may keep a processing or delivery thread busy before the node reports itself
    unhealthy (and, under systemd, stops the watchdog pings so that it is restarted)."""
    max_instance_bytes: int = Field(2 * 1024**3, ge=1024)
    """The largest instance accepted, as received."""
    max_inflated_bytes: int = Field(64 * 1024**2, ge=1024)
    """The largest data set a Deflated Explicit VR Little Endian instance may inflate to."""
    allowed_calling_aets: list[AETitle | AllowedCaller] | None = None
    """None: any calling AE title may associate; otherwise only these (PS3.8 7.1.1.3)."""
    tls: TlsConfig | None = None


class MetricsConfig(_Model):
    """The Prometheus endpoint (`/metrics`) and the load balancer's check (`/health`)."""

    port: int = Field(ge=0, le=65535)
    host: str = "0.0.0.0"


class SpoolConfig(_Model):
    """The durable queue between receiving and forwarding."""

    path: Path = Path("./spool")


class WorkersConfig(_Model):
    """The processes that re-encode pixel data."""

    processes: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)


class RetryConfig(_Model):
    """How a destination's transient failures are retried: exponential backoff with jitter."""

    initial_delay: float = Field(2.0, gt=0)
    max_delay: float = Field(300.0, gt=0)
    max_attempts: int | None = Field(None, ge=1)
    max_age: float | None = Field(None, gt=0)
    """Seconds since the instance was received after which it is quarantined instead of retried."""


class DicomDestination(_Model):
    """An archive reached by C-STORE."""

    type: Literal["dicom"]
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: AETitle | None = None
    timeout: float = Field(30.0, gt=0)
    associations: int = Field(2, ge=1, le=32)
    batch_size: int = Field(64, ge=1)
    retry: RetryConfig = RetryConfig()
    tls: TlsConfig | None = None


class DirectoryDestination(_Model):
    """A folder that receives Part 10 files named from the SOP Instance UID."""

    type: Literal["directory"]
    path: Path
    associations: int = Field(1, ge=1, le=32)
    batch_size: int = Field(64, ge=1)
    retry: RetryConfig = RetryConfig()


Destination = Annotated[DicomDestination | DirectoryDestination, Field(discriminator="type")]


class CompressSpec(_Model):
    """What a rule does to pixel data: a target syntax (None keeps the original) and codec options."""

    syntax: TransferSyntax | None = None
    jls_error: int | None = Field(None, ge=0, le=255)
    j2k_cr: list[float] | None = None
    j2k_psnr: list[float] | None = None
    verify: bool = True

    @field_validator("syntax", mode="before")
    @classmethod
    def _keep_is_none(cls, value: Any) -> Any:
        return None if value == KEEP else value

    def encoder_options(self) -> dict[str, Any]:
        """The codec parameters to pass to pydicom's encoders."""
        names = ("jls_error", "j2k_cr", "j2k_psnr")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


MatchValue = str | int | float | list[str | int | float]


class Rule(_Model):
    """A routing rule: when `match` holds, re-encode as `compress` and deliver to `forward`."""

    name: str = Field(min_length=1)
    match: dict[str, MatchValue] | None = None
    compress: CompressSpec = CompressSpec()
    forward: list[str] = Field(min_length=1)

    @field_validator("compress", mode="before")
    @classmethod
    def _compress_shorthand(cls, value: Any) -> Any:
        return {"syntax": value} if value is None or isinstance(value, str) else value


class LoggingConfig(_Model):
    """Log level of the node (logs go to standard error; journald picks them up under systemd)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Config(_Model):
    """The whole configuration file."""

    node: NodeConfig = NodeConfig()
    spool: SpoolConfig = SpoolConfig()
    workers: WorkersConfig = WorkersConfig()
    destinations: dict[str, Destination] = Field(min_length=1)
    rules: list[Rule] = Field(min_length=1)
    logging: LoggingConfig = LoggingConfig()
    metrics: MetricsConfig | None = None

    @model_validator(mode="after")
    def _forward_names_exist(self) -> Config:
        for index, rule in enumerate(self.rules):
            for name in rule.forward:
                if name not in self.destinations:
                    known = ", ".join(sorted(self.destinations))
                    raise ValueError(
                        f"rules.{index}.forward: unknown destination '{name}' in rule '{rule.name}'; "
                        f"defined destinations: {known}"
                    )
        return self


DEFAULT: dict[str, Any] = {
    "node": {"ae_title": "COMPRESS_SCP", "host": "0.0.0.0", "port": 11112},
    "spool": {"path": "./spool"},
    "destinations": {"folder": {"type": "directory", "path": "./archive"}},
    "rules": [
        {
            "name": "projection-and-cross-sectional",
            "match": {"modality": ["CT", "MR", "CR", "DX"]},
            "compress": "JPEGLSLossless",
            "forward": ["folder"],
        },
        {"name": "everything-else", "compress": KEEP, "forward": ["folder"]},
    ],
}


def _describe(error: dict[str, Any]) -> str:
    path = ".".join(str(part) for part in error["loc"])
    if not path:
        return str(error["msg"]).removeprefix("Value error, ")
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{path}: unknown key"
    if "input" in error and error["type"] not in ("missing",) and not isinstance(error["input"], dict):
        return f"{path}: {message} (got {error['input']!r})"
    return f"{path}: {message}"


def parse(data: Any, source: str = "<config>") -> Config:
    """Validate a decoded YAML document; raise ConfigError listing every problem with its key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = "\n".join(f"  {_describe(e)}" for e in exc.errors())  # type: ignore[arg-type]
        raise ConfigError(f"{source}: invalid configuration\n{problems}") from exc


def load(path: Path | None) -> Config:
    """Read and validate a YAML file, or the built-in default when `path` is None."""
    if path is None:
        return parse(DEFAULT, "<built-in default>")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse(data, str(path))
