"""The YAML configuration as pydantic models, validated in full before anything starts.

Every model forbids unknown keys, and the YAML loader a key given twice; transfer syntaxes are accepted as pydicom
keywords or dotted UIDs and turned into UIDs once, here (STYLE rules 7 and 8). `load()` is used by `check-config`,
`run` and reload alike.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetPydanticSchema,
    IPvAnyNetwork,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydicom.uid import UID

from scp import matching, syntaxes
from scp.errors import ConfigError

KEEP = "keep"
QUARANTINE_BY_RULE = "by-rule"
QUARANTINE_UNPROCESSABLE = "unprocessable"
RESERVED_DESTINATIONS = (QUARANTINE_BY_RULE, QUARANTINE_UNPROCESSABLE)
"""Quarantine folders that belong to no destination: a rule's `quarantine: true`, and processing that kept failing."""
_RESERVED_NAMES = (*RESERVED_DESTINATIONS, "tmp")
_DESTINATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
"""A destination's name is a folder of the spool (outgoing/<name>, quarantine/<name>): one safe path component."""


def check_destination_name(name: str) -> str:
    """`name` if it can name a destination's spool folder; ValueError saying what a name may hold otherwise."""
    if not _DESTINATION_NAME.fullmatch(name):
        raise ValueError(
            f"'{name}' is not a valid destination name: it names a spool folder, so use letters, digits, "
            "'_', '.' and '-', starting with a letter or digit"
        )
    return name


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _yes_no_only_for_yes_no(cls, data: Any) -> Any:
        """YAML reads yes/no/on/off/true/false as booleans, which pydantic would take as 1 and 0 for a number
        (`min_free_mb: no` would turn the disk reserve off): only a yes/no setting takes them."""
        if not isinstance(data, dict):
            return data
        for key, value in data.items():
            field = cls.model_fields.get(key)
            if field is None or field.annotation is bool or bool in get_args(field.annotation):
                continue
            if isinstance(value, bool) or (isinstance(value, list) and any(isinstance(v, bool) for v in value)):
                raise ValueError(f"{key}: {value!r} is a yes/no value (YAML reads yes, no, on, off, true and false so)")
        return data


AETitle = Annotated[str, AfterValidator(matching.ae_title)]
TransferSyntax = Annotated[
    UID,
    GetPydanticSchema(lambda _, handler: handler(str)),  # validated as the str it is; pydantic knows no UID
    BeforeValidator(lambda v: syntaxes.resolve(str(v))),
    AfterValidator(UID),
]
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
    shutdown_timeout: float = Field(30.0, gt=0)
    """Seconds SIGTERM waits for work in hand before the process exits anyway (the spool keeps the rest)."""
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
    aliases: list[AETitle] = Field(default_factory=list)
    """Further called AE titles the node answers to (a rule may route on `called_ae`)."""
    accept_any_called_ae: bool = False
    """True: an association is accepted whatever AE title it calls (PS3.8 7.1.1.4), as DCMTK's storescp does."""
    tls: TlsConfig | None = None

    def answers_to(self, called_ae: str) -> bool:
        """Whether an association calling `called_ae` is accepted."""
        return self.accept_any_called_ae or called_ae in (self.ae_title, *self.aliases)


class MetricsConfig(_Model):
    """The Prometheus endpoint (`/metrics`) and the load balancer's check (`/health`)."""

    port: int = Field(ge=0, le=65535)
    host: str = "0.0.0.0"


class SpoolConfig(_Model):
    """The durable queue between receiving and forwarding."""

    path: Path = Path("./spool")
    min_free_mb: float = Field(256.0, ge=0)
    """Below this much free space on the spool's filesystem, C-STORE is answered 0xA700 (out of resources)."""
    min_free_inodes: int = Field(4096, ge=0)
    """Below this many free inodes on the spool's filesystem (if it counts them), C-STORE is answered 0xA700: the
    rest is for turning the instances already acknowledged into jobs."""
    partial_max_age: float = Field(300.0, gt=0)
    """Seconds after which an untouched partial received file (aborted transfer) is removed from tmp/."""


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

    @model_validator(mode="after")
    def _ceiling_above_start(self) -> RetryConfig:
        if self.max_delay < self.initial_delay:
            raise ValueError(f"max_delay {self.max_delay:g} is below initial_delay {self.initial_delay:g}")
        return self


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
    accept: list[TransferSyntax] | None = Field(None, min_length=1)
    """The transfer syntaxes it takes, preferred first; None: any syntax it negotiates."""
    tls: TlsConfig | None = None


class DirectoryDestination(_Model):
    """A folder that receives Part 10 files named from the SOP Instance UID."""

    type: Literal["directory"]
    path: Path
    associations: int = Field(1, ge=1, le=32)
    batch_size: int = Field(64, ge=1)
    retry: RetryConfig = RetryConfig()
    accept: list[TransferSyntax] | None = Field(None, min_length=1)
    """The transfer syntaxes its files may be in, preferred first; None: any."""


Destination = Annotated[DicomDestination | DirectoryDestination, Field(discriminator="type")]


class CompressSpec(_Model):
    """What a rule does to pixel data: a target syntax (None keeps the original), codec options and policy.

    Codec options sit beside the syntax: `compress: {syntax: JPEG2000, j2k_psnr: [50]}`; each is accepted only
    with the syntax that uses it.
    """

    syntax: TransferSyntax | None = None
    jls_error: int | None = Field(None, ge=1, le=255)
    """JPEGLSNearLossless: the largest difference allowed per sample (NEAR, ISO 14495-1)."""
    j2k_cr: list[float] | None = Field(None, min_length=1)
    """JPEG2000: compression ratios of the quality layers, as pydicom's compress() takes them."""
    j2k_psnr: list[float] | None = Field(None, min_length=1)
    """JPEG2000: peak signal-to-noise ratios (dB) of the quality layers."""
    htj2k_qstep: float | None = Field(None, gt=0, lt=1)
    """HTJ2K: quantisation step, as a fraction of the range Bits Stored allows (default 0.005)."""
    min_psnr: float = Field(30.0, ge=0)
    """Lossy only: forward the original instead when the decoded result's PSNR (dB) is lower (0: no floor)."""
    verify: bool = True
    """Decode every lossless frame and compare it with the source before forwarding the result."""
    keep_sop_instance_uid: bool = False
    """Lossy only: keep the SOP Instance UID instead of making a new one (PS3.3 C.7.6.1.1.5 wants a new one)."""
    force: bool = False
    """Forward the encoded result even when it is larger than the source."""
    allow_lossy_to_lossless: bool = False
    """Re-encode an already lossy source into a lossless syntax (it only grows; off by default)."""

    @field_validator("syntax", mode="before")
    @classmethod
    def _keep_is_none(cls, value: Any) -> Any:
        return None if value == KEEP else value

    @model_validator(mode="after")
    def _options_fit_syntax(self) -> CompressSpec:
        used = {name for name in _CODEC_OPTIONS if getattr(self, name) is not None}
        wanted = _CODEC_OPTIONS_BY_SYNTAX.get(str(self.syntax), frozenset()) if self.syntax else frozenset()
        name = UID(self.syntax).keyword if self.syntax else KEEP
        if stray := sorted(used - wanted):
            takes = ", ".join(sorted(wanted)) or "no codec options"
            raise ValueError(f"{', '.join(stray)} cannot be used with {name}, which takes {takes}")
        if self.syntax == _JPEG2000 and len(used) != 1:
            raise ValueError("JPEG2000 (lossy) needs exactly one of j2k_cr or j2k_psnr, e.g. j2k_psnr: [50]")
        if self.syntax == _JPEGLS_NEAR and not used:
            raise ValueError("JPEGLSNearLossless needs jls_error (1-255), e.g. jls_error: 2")
        return self

    def encoder_options(self) -> dict[str, Any]:
        """The codec parameters to pass to the encoder."""
        return {name: getattr(self, name) for name in _CODEC_OPTIONS if getattr(self, name) is not None}


def check_encodable(spec: CompressSpec) -> CompressSpec:
    """A rule may only target a syntax this node can write (STYLE rule 2: name what is missing).

    Applied where a rule's `compress:` is read, not in CompressSpec itself: the pipeline builds specs for a
    destination's accepted syntaxes, and an unencodable one must be a pass-through there, not an exception.
    """
    from scp import codecs  # the pixel stack, imported only when a rule names a target

    if spec.syntax is None or spec.syntax in syntaxes.NATIVE_TARGETS:
        return spec
    syntax = UID(spec.syntax)
    if syntax not in codecs.REGISTRY:
        targets = ", ".join([*(u.keyword for u in codecs.REGISTRY), *(u.keyword for u in syntaxes.NATIVE_TARGETS)])
        raise ValueError(f"the node cannot encode {syntax.keyword or syntax}; targets: {targets}, or keep")
    codec = codecs.REGISTRY[syntax]
    if not codec.available:
        raise ValueError(codec.unavailable_reason())
    return spec


_CODEC_OPTIONS = ("jls_error", "j2k_cr", "j2k_psnr", "htj2k_qstep")
_JPEG2000 = "1.2.840.10008.1.2.4.91"
_JPEGLS_NEAR = "1.2.840.10008.1.2.4.81"
_CODEC_OPTIONS_BY_SYNTAX: dict[str, frozenset[str]] = {
    _JPEGLS_NEAR: frozenset({"jls_error"}),
    _JPEG2000: frozenset({"j2k_cr", "j2k_psnr"}),
    "1.2.840.10008.1.2.4.203": frozenset({"htj2k_qstep"}),
}


def _compress_shorthand(value: Any) -> Any:
    return {"syntax": value} if value is None or isinstance(value, str) else value


Compress = Annotated[CompressSpec, BeforeValidator(_compress_shorthand), AfterValidator(check_encodable)]
"""A rule's `compress:`: a syntax, `keep`, or a mapping of CompressSpec; refused when nothing here can encode it."""


class Route(_Model):
    """One destination of a rule, optionally with its own target syntax (e.g. lossy for teleradiology)."""

    destination: str = Field(min_length=1)
    compress: Compress | None = None
    """None: the rule's `compress`."""


class Rule(_Model):
    """A routing rule: when `match` holds, re-encode as `compress` and deliver to `forward`, or drop or
    quarantine the instance. `match` is compiled once, here (see scp/matching.py for its shape)."""

    name: str = Field(min_length=1)
    match: dict[str, Any] | None = None
    compress: Compress = CompressSpec()
    forward: list[Route] = []
    drop: bool = False
    quarantine: bool = False
    _condition: matching.Condition = PrivateAttr()

    @field_validator("forward", mode="before")
    @classmethod
    def _route_shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        return [{"destination": r} if isinstance(r, str) else r for r in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _compile(self) -> Rule:
        actions = [name for name in ("forward", "drop", "quarantine") if getattr(self, name)]
        if len(actions) != 1:
            raise ValueError(
                f"rule '{self.name}': give exactly one action of forward: [destinations], drop: true, "
                f"quarantine: true (got {', '.join(actions) or 'none'})"
            )
        try:
            self._condition = matching.compile_match(self.match)
        except ValueError as exc:
            raise ValueError("\n".join(f"rule '{self.name}': {problem}" for problem in str(exc).splitlines())) from None
        return self

    @property
    def condition(self) -> matching.Condition:
        """The compiled `match`."""
        return self._condition

    @property
    def action(self) -> Literal["forward", "drop", "quarantine"]:
        return "drop" if self.drop else "quarantine" if self.quarantine else "forward"


class DefaultRule(Rule):
    """What happens to an instance no rule matched: a rule without `match`."""

    name: str = Field("default", min_length=1)

    @field_validator("match")
    @classmethod
    def _no_match(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("the default rule applies when no rule matched: it takes no match")
        return value


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
    default: DefaultRule | None = None
    """None: the built-in default, keep the encoding and forward to every destination."""
    logging: LoggingConfig = LoggingConfig()
    metrics: MetricsConfig | None = None

    @field_validator("destinations")
    @classmethod
    def _safe_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            check_destination_name(name)
            if name in _RESERVED_NAMES:
                raise ValueError(f"'{name}' is reserved for a spool folder; reserved: {', '.join(_RESERVED_NAMES)}")
        return value

    @model_validator(mode="after")
    def _forward_names_exist(self) -> Config:
        named = [(f"rules.{index}", rule) for index, rule in enumerate(self.rules)]
        for where, rule in [*named, *([("default", self.default)] if self.default else [])]:
            names = [route.destination for route in rule.forward]
            for name in names:
                if name not in self.destinations:
                    known = ", ".join(sorted(self.destinations))
                    raise ValueError(
                        f"{where}.forward: unknown destination '{name}' in rule '{rule.name}'; "
                        f"defined destinations: {known}"
                    )
            if len(set(names)) != len(names):
                raise ValueError(f"{where}.forward: a destination is listed twice in rule '{rule.name}'")
        return self

    @model_validator(mode="after")
    def _rules_named_apart_and_reachable(self) -> Config:
        """Logs, metrics and explain tell rules apart by name; a rule with no condition (a `match:` whose lines
        were all commented out, say) takes every instance, so a rule after it could never apply."""
        first: dict[str, int] = {}
        for index, rule in enumerate(self.rules):
            if rule.name in first:
                raise ValueError(f"rules.{index}: rule name '{rule.name}' is also rules.{first[rule.name]}'s")
            first[rule.name] = index
            if not rule.match and index + 1 < len(self.rules):
                raise ValueError(
                    f"rules.{index}: rule '{rule.name}' matches every instance, so rule '{self.rules[index + 1].name}' "
                    "after it could never apply; give it a match, or make it the last rule or the default"
                )
        return self

    def unseen_titles(self) -> list[str]:
        """Warnings for rule values the node never sees: a `calling_ae` that `allowed_calling_aets` rejects, a
        `called_ae` it does not answer to. Only plain values at the top of a match are looked at."""
        allowed = self.node.allowed_calling_aets
        callers = None if allowed is None else {e if isinstance(e, str) else e.ae_title for e in allowed}
        found = []
        for index, rule in enumerate(self.rules):
            for key in ("calling_ae", "called_ae"):
                value = (rule.match or {}).get(key)
                for title in (t.strip() for t in (value if isinstance(value, list) else [value]) if isinstance(t, str)):
                    if key == "calling_ae" and callers is not None and title not in callers:
                        why = "node.allowed_calling_aets rejects it"
                    elif key == "called_ae" and not self.node.answers_to(title):
                        why = "it is neither node.ae_title nor one of node.aliases"
                    else:
                        continue
                    found.append(f"rules.{index}: rule '{rule.name}': match.{key}: '{title}' is never seen: {why}")
        return found

    @functools.cached_property
    def default_rule(self) -> Rule:
        """The configured default, or the built-in one: an unmatched instance is never dropped silently.

        Built once per configuration (a reload makes a new one), not once per instance."""
        if self.default is not None:
            return self.default
        routes = [Route(destination=name) for name in self.destinations]
        return Rule(name="built-in default", compress=CompressSpec(), forward=routes)


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
    if "\n" in message:  # several problems of one value (a rule's match), one a line
        return "\n  ".join(f"{path}: {line}" for line in message.splitlines())
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


class _DuplicateKey(yaml.YAMLError):
    """A mapping of the file gives the same key twice."""


def _safe_load_unique_keys(text: str) -> Any:
    """`yaml.safe_load`, except that a key given twice in one mapping is an error (PyYAML keeps the last).

    Checked on the composed nodes, before construction: PyYAML flattens `<<:` merges into the mappings it
    constructs, so that a merged key and its override would look given twice there."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _check_unique_keys(root)
        return loader.construct_document(root)
    finally:
        loader.dispose()


def _check_unique_keys(root: yaml.Node) -> None:
    seen: set[int] = set()
    pending = [root]
    while pending:
        node = pending.pop()
        if id(node) in seen:  # an alias to a node already checked
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
                    if key in lines:
                        raise _DuplicateKey(
                            f"key '{key_node.value}' is given twice, on lines {lines[key]} and {line}; keep one"
                        )
                    lines[key] = line
                pending.extend((key_node, value_node))
        elif isinstance(node, yaml.SequenceNode):
            pending.extend(node.value)


def load(path: Path | None) -> Config:
    """Read and validate a YAML file, or the built-in default when `path` is None."""
    if path is None:
        return parse(DEFAULT, "<built-in default>")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: not UTF-8 text: byte 0x{exc.object[exc.start]:02x} on line {line}; save it as UTF-8"
        ) from exc
    try:
        data = _safe_load_unique_keys(text)
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse(data, str(path))


def check_files(loaded: Config, source: str) -> None:
    """The TLS files of the node and of every DICOM destination exist and can be read, and the addresses the
    node listens on (`node.host`, `metrics.host`) resolve.

    Apart from `load()` so that commands which never open a connection (`explain`, `queue`) need no certificates;
    `check-config`, `run` and reload call it. A destination's host is not resolved: an archive whose name does not
    resolve yet is a delivery failure, retried, not a reason to refuse receiving."""
    places = [("node.tls", loaded.node.tls)] + [
        (f"destinations.{name}.tls", d.tls)
        for name, d in loaded.destinations.items()
        if isinstance(d, DicomDestination)
    ]
    problems = [
        f"  {where}.{key}: cannot read {path}: {reason}"
        for where, tls in places
        if tls is not None
        for key, path in (("cert", tls.cert), ("key", tls.key), ("ca", tls.ca))
        if path is not None and (reason := _unreadable(path))
    ]
    listening = [("node.host", loaded.node.host)] + ([("metrics.host", loaded.metrics.host)] if loaded.metrics else [])
    problems += [
        f"  {where}: cannot listen on {host!r}: {reason}"
        for where, host in listening
        if (reason := _unresolvable(host))
    ]
    if problems:
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(problems))


def _unresolvable(host: str) -> str | None:
    """Why `host` is no address to listen on, or None. "" is every interface, as for Python's sockets. A resolver
    that fails for now (not ready at boot) is no reason to refuse the file: `run` then fails to listen, with exit
    status 1, and is started again."""
    try:
        socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_AGAIN, socket.EAI_FAIL):
            return None
        return str(exc.args[-1]) if exc.args else str(exc)
    except UnicodeError as exc:
        return str(exc)
    return None


def _unreadable(path: Path) -> str | None:
    """Why `path` cannot be read as a file, or None."""
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)
