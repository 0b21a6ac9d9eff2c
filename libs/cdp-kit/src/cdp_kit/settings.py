"""Typed settings from environment variables that fail fast.

A service declares one frozen dataclass whose fields carry their variable name with `env(...)`;
`load_settings` reads them all, converts each to its annotated type and reports *every* missing or
malformed variable at once, by name, before the service starts doing anything.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

_MISSING = dataclasses.MISSING
T = TypeVar("T")


class SettingsError(Exception):
    """One or more environment variables are missing or malformed; the message lists each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


def env(name: str, default: Any = _MISSING, *, help: str = "", secret: bool = False) -> Any:
    """Declare a settings field read from environment variable `name` (required when no default)."""
    metadata = {"env": name, "help": help, "secret": secret}
    if default is _MISSING:
        return dataclasses.field(metadata=metadata)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _convert(raw: str, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if raw == "":
            return None
        return _convert(raw, args[0])
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        if raw not in allowed:
            raise ValueError(f"must be one of {', '.join(map(str, allowed))}")
        return raw
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(annotation) or (str,)
        items = [_convert(part.strip(), item_type) for part in raw.split(",") if part.strip()]
        return items if origin is list else tuple(items)
    if annotation is bool:
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError("must be true or false")
    if annotation is int:
        return int(raw.strip())
    if annotation is float:
        return float(raw.strip())
    if annotation is Path:
        return Path(raw)
    if annotation is str:
        return raw
    raise TypeError(f"unsupported settings type {annotation!r}")


def load_settings(cls: type[T], environ: Mapping[str, str] | None = None, **overrides: Any) -> T:
    """Build `cls` from the environment; raise SettingsError naming every bad variable."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    problems: list[str] = []
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.name in overrides:
            values[field.name] = overrides[field.name]
            continue
        var = field.metadata.get("env")
        if var is None:
            continue
        raw = environ.get(var)
        required = field.default is _MISSING and field.default_factory is _MISSING
        if raw is None:
            if required:
                hint = f" ({field.metadata['help']})" if field.metadata.get("help") else ""
                problems.append(f"{var} is required but not set{hint}")
            continue
        try:
            values[field.name] = _convert(raw, hints[field.name])
        except (ValueError, TypeError) as exc:
            shown = "<secret>" if field.metadata.get("secret") else repr(raw)
            problems.append(f"{var}={shown} is invalid: {exc}")
    if problems:
        raise SettingsError(problems)
    instance = cls(**values)
    validate = getattr(instance, "validate", None)
    if callable(validate):
        extra = validate()
        if extra:
            raise SettingsError(list(extra))
    return instance


def describe(cls: type) -> list[tuple[str, str, str]]:
    """(variable, default, help) for every setting: used to document a service's variables."""
    rows = []
    for field in dataclasses.fields(cls):
        if "env" not in field.metadata:
            continue
        if field.default is not _MISSING:
            default = repr(field.default)
        elif field.default_factory is not _MISSING:
            default = repr(field.default_factory())
        else:
            default = "(required)"
        rows.append((field.metadata["env"], default, field.metadata.get("help", "")))
    return rows


@dataclasses.dataclass(frozen=True)
class ServiceSettings:
    """What every cdp service reads. A service subclasses it and adds its own fields."""

    nats_url: str = env("CDP_NATS_URL", help="NATS server URL(s), comma-separated, e.g. nats://nats:4222")
    service_name: str = env("OTEL_SERVICE_NAME", "cdp", help="service name in traces, metrics and logs")
    grpc_host: str = env("CDP_GRPC_HOST", "0.0.0.0", help="address the gRPC server binds")
    grpc_port: int = env("CDP_GRPC_PORT", 0, help="gRPC port (0: pick a free one)")
    metrics_port: int = env("CDP_METRICS_PORT", 0, help="Prometheus /metrics port (0: disabled)")
    store_url: str = env("CDP_STORE_URL", "sqlite:///.cdp/data/cdp.db", help="memory://, sqlite:///path or mongodb://…")
    partitions: int = env(
        "CDP_PARTITIONS",
        8,
        help="number of partitions of partitioned subjects: the same for every service of a platform, for its "
        "life (its streams record it; a service with another count does not start)",
    )
    log_level: str = env("CDP_LOG_LEVEL", "INFO", help="DEBUG, INFO, WARNING or ERROR")
    log_format: typing.Literal["json", "text"] = env("CDP_LOG_FORMAT", "json", help="json or text")
    auth_mode: typing.Literal["tokens", "none"] = env(
        "CDP_AUTH_MODE", "tokens", help="tokens: bearer tokens with scopes; none: no caller authentication (dev only)"
    )
    auth_tokens_file: Path | None = env(
        "CDP_AUTH_TOKENS_FILE",
        None,
        help='JSON {"tokens":[{"name","sha256","scopes"}]}; required when CDP_AUTH_MODE=tokens',
    )
    tls_cert_file: Path | None = env("CDP_TLS_CERT_FILE", None, help="server certificate (PEM) to serve gRPC over TLS")
    tls_key_file: Path | None = env("CDP_TLS_KEY_FILE", None, help="server private key (PEM)", secret=True)
    tls_client_ca_file: Path | None = env("CDP_TLS_CLIENT_CA_FILE", None, help="CA for client certificates (mTLS)")
    health_port: int = env(
        "CDP_HEALTH_PORT",
        0,
        help="plaintext port serving only grpc.health.v1, for kubelet probes when gRPC uses TLS (0: off)",
    )
    shutdown_grace: float = env("CDP_SHUTDOWN_GRACE", 10.0, help="seconds in-flight calls get to finish on SIGTERM")
    loop_stall_seconds: float = env(
        "CDP_LOOP_STALL_SECONDS",
        5.0,
        help="seconds the event loop may answer nothing before a WARNING says where it is held (0: off)",
    )

    def validate(self) -> list[str]:
        problems = []
        if self.auth_mode == "tokens" and self.auth_tokens_file is None:
            problems.append(
                "CDP_AUTH_TOKENS_FILE is required when CDP_AUTH_MODE=tokens (or set CDP_AUTH_MODE=none for dev)"
            )
        if self.auth_tokens_file is not None and not self.auth_tokens_file.is_file():
            problems.append(f"CDP_AUTH_TOKENS_FILE={str(self.auth_tokens_file)!r} is not a readable file")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            problems.append("CDP_TLS_CERT_FILE and CDP_TLS_KEY_FILE must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            problems.append("CDP_TLS_CLIENT_CA_FILE needs CDP_TLS_CERT_FILE and CDP_TLS_KEY_FILE")
        if self.partitions < 1:
            problems.append(f"CDP_PARTITIONS={self.partitions} is invalid: must be at least 1")
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            problems.append(f"CDP_LOG_LEVEL={self.log_level!r} is invalid: must be DEBUG, INFO, WARNING or ERROR")
        if not self.loop_stall_seconds >= 0:  # (NaN too)
            problems.append(
                f"CDP_LOOP_STALL_SECONDS={self.loop_stall_seconds} is invalid: must be 0 (off) or more seconds"
            )
        return problems
