"""Who may do what on NATS: one user per service, with the subjects it may publish and subscribe to.

One table (`ROLES`, kept in `cdp_kit.natsroles` and re-exported here) says, per service, which streams
take its settings (`configures`) and which others it uses (`creates`), the durable consumers it keeps (by
name), which streams it reads single messages from, what it publishes and which core-NATS announcements
it follows. Everything NATS is told comes from it:

- `permissions(role)`: the nats-server `permissions` block of that service's user. A service may publish
  only the subjects it owns (`cdp_kit.bus.subjects` says who owns what): the profile service publishing
  `events.resolved.0` is refused by the server ("Publish Violation"), whatever its code does.
  JetStream is reached through its API subjects, so each user gets only the `$JS.API` calls its streams
  need (looking them up: never creating, updating, deleting or purging one, which the provisioner does,
  `cdp_kit.provision`, as the `PROVISIONER` user or cdpctl's operator; management, fetch,
  acknowledgements and dead letters of its own consumers only, by name: services sharing a stream cannot
  rewrite, drain or delete each other's consumers), its own group of keys in the ownership key-value
  bucket (listed and read only through subjects that name them), and replies on its own inbox prefix
  (`_INBOX.<service>.`) only, so no service reads another's API answers.
- `authorization_config(...)`: the `authorization` block `cdpctl up` writes (users with these permissions,
  plus an operator user without limits for cdpctl and tests). It holds each password's bcrypt hash, never
  the password (`password_hash`): nats-server checks a client's password against the hash, and warns
  ("Plaintext passwords detected") about a configuration that holds passwords as they are. The Helm chart renders
  the same block from `permissions_document()`, kept in deploy/helm/cdp/files/nats-permissions.json
  (`python -m cdp_kit.natsauth` writes it; a deploy test fails when it is stale).

Stream sourcing (orchestration's and the CRM connector's input streams) and message schedules are done
by the server inside the account: they need no user permission. That is also why no service may
configure a stream: the server applies a stream's sources, mirror, republish and subject transform
without checking the requesting user's subject permissions (docs/security.md, "Who makes the streams").

The client side: `NatsClientSettings` (CDP_NATS_CREDENTIALS_FILE, CDP_NATS_TLS_*), read by
`Bus.connect` itself, so every service gets them without declaring them. The credentials file is JSON,
`{"user": "profile", "password": "…"}`, read at connect and at every reconnect. A user is named after
its service, optionally with a generation after a dot (`profile.2`): the service part picks the role
and the inbox prefix.

Rotation without a restart, make before break (nats.py gives up for good on a connection the server
closes for its credentials, so the old ones must stay valid until nobody uses them):
1. the server gets the new user beside the old one (`authorization_config` with both), reloaded;
2. the service's file is rewritten: the bus sees the change (`CredentialsFile.changed`, polled) and
   reconnects at once with the new user (asked again each second until a CONNECT has sent it); subscriptions and consumers carry on;
3. the old user is removed from the server, reloaded.
`cdpctl nats-rotate SERVICE` does the three steps for `make up` (docs/security.md).
A file that cannot be read at a reconnect keeps the last good credentials.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt

from cdp_kit.bus import subjects
from cdp_kit.natsroles import (
    ACTION_CHANNELS,
    ANY,
    MODEL_BUCKET,
    OPERATOR,
    ORDINAL,
    OWNERSHIP_BUCKET,
    PARTITION,
    ROLES,
    BusRole,
    Consumer,
    _unique,
    dispatch_durable,
    inbox_prefix,
    role_of,
)
from cdp_kit.settings import SettingsError, env, load_settings

log = logging.getLogger("cdp.bus")


def permissions(role: BusRole) -> dict[str, dict[str, list[str]]]:
    """The nats-server permissions of `role`'s user: `{"publish": {"allow": [...]}, "subscribe": {...}}`."""
    api = "$JS.API"
    publish = [f"{api}.INFO", *role.publishes]
    subscribe = [f"{inbox_prefix(role.name)}.>", *role.subscribes]
    touched = (*role.configures, *role.creates, *role.consumes, *role.reads, *role.erases)
    for stream in _unique(touched):
        publish.append(f"{api}.STREAM.INFO.{stream}")
    # No STREAM.CREATE, UPDATE, DELETE or PURGE of any stream: nats-server applies a stream's sources,
    # mirror, republish and subject transform inside the account without checking the requesting user's
    # subject permissions, so a user that may configure one stream may read or write every subject.
    # The provisioner (cdp_kit.provision, an operator identity) makes every stream; services verify them.
    # Its own consumers only, each by name, on every API subject that carries the name. Never the
    # nameless create (`CONSUMER.CREATE.<stream>`, the name in its body, out of the server's sight): the
    # kit creates durables as `DURABLE.CREATE.<stream>.<name>` (nats.py's add_consumer with a
    # durable_name), and the server refuses a body whose name differs from the subject's.
    for consumer in role.consumers:
        stream, name = consumer.stream, consumer.name
        publish += [
            f"{api}.CONSUMER.DURABLE.CREATE.{stream}.{name}",
            f"{api}.CONSUMER.CREATE.{stream}.{name}",
            f"{api}.CONSUMER.CREATE.{stream}.{name}.>",  # with its filter subject
            f"{api}.CONSUMER.INFO.{stream}.{name}",
            f"{api}.CONSUMER.DELETE.{stream}.{name}",
            f"{api}.CONSUMER.MSG.NEXT.{stream}.{name}",
            f"$JS.ACK.{stream}.{name}.>",
            f"$JS.FC.{stream}.{name}.>",
            subjects.dead_letter(stream, name),  # what it gives up on (DLQ: stored, never reconfigured)
        ]
        subscribe.append(f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{name}")
    # Single messages by STREAM.MSG.GET only, whose answer is JSON. Never a direct get: nats-server sends its
    # answer, the message's own bytes, to whatever reply subject the request names (permissions look at the
    # request's subject alone), so a user that may direct-get a stream holding bytes it wrote (orchestration:
    # ACTIONS) could publish them anywhere as nats-server, into other services' streams included. The kit
    # reads by STREAM.MSG.GET anyway.
    for stream in role.reads:
        publish.append(f"{api}.STREAM.MSG.GET.{stream}")
    # A stream it consumes: the get of one message, so its lag poll can date the oldest one it has not
    # acknowledged (cdp.bus.consumer.oldest_age). Nothing it could not read already: its own consumer's
    # create subject takes any filter of that stream.
    for stream in role.consumes:
        if stream not in role.reads:
            publish.append(f"{api}.STREAM.MSG.GET.{stream}")
    for stream in role.erases:
        publish.append(f"{api}.STREAM.MSG.DELETE.{stream}")
    # Partition ownership (CDP_OWNERSHIP=nats): the shared bucket, and only this service's group of keys
    # in it, on subjects that name the key: writes, and a scan consumer whose filter is in its create
    # subject (cdp_kit.ownership.group_kv, which reads one key by a scan too on a bucket without direct
    # gets, as the provisioner makes it). Never the nameless create (a watch: any filter, in the body), the
    # get by body (any key), another's consumer by name, or a direct get: nats-server publishes a direct
    # get's answer, the bytes this service wrote there, on whatever reply subject the request names, and
    # every stream stores what is published on its subjects: `privacy.deleted` (a deletion of anyone),
    # `events.resolved.<p>`, another service's leases.
    kv_stream, own_keys = f"KV_{OWNERSHIP_BUCKET}", f"$KV.{OWNERSHIP_BUCKET}.{role.name}.>"
    publish += [
        f"{api}.STREAM.INFO.{kv_stream}",
        f"{api}.CONSUMER.CREATE.{kv_stream}.*.{own_keys}",
        own_keys,
    ]
    for bucket in role.object_stores:
        obj_stream = f"OBJ_{bucket}"
        publish += [
            f"{api}.STREAM.NAMES",  # nats.py finds the stream of an object's subject by name lookup
            f"{api}.STREAM.INFO.{obj_stream}",
            # nats.py purges an object's old chunks (by subject) when it is written again or deleted: its
            # own bucket's contents only; the bucket itself is the provisioner's to make.
            f"{api}.STREAM.PURGE.{obj_stream}",
            f"{api}.STREAM.MSG.GET.{obj_stream}",  # an object's description (nats.py: no direct get)
            f"{api}.CONSUMER.CREATE.{obj_stream}",
            f"{api}.CONSUMER.CREATE.{obj_stream}.>",
            f"{api}.CONSUMER.INFO.{obj_stream}.*",
            f"{api}.CONSUMER.DELETE.{obj_stream}.*",
            f"$JS.FC.{obj_stream}.>",
            f"$O.{bucket}.>",
        ]
    return {"publish": {"allow": _unique(publish)}, "subscribe": {"allow": _unique(subscribe)}}


# The provisioner's user (cdp_kit.provision; the chart's provisioning Job): the one identity besides the
# operator that may create and update streams. It publishes and reads nothing else.
PROVISIONER = "provision"


def provisioner_permissions() -> dict[str, dict[str, list[str]]]:
    """What the provisioner's user may do: create, update and look up every stream cdp runs on, the
    ownership bucket's and the model store's; list the consumers of cdp's streams (a stream made before
    the partition count was recorded shows its count in its consumers' names: `cdp_kit.bus.partition_count`);
    never delete or purge a stream, never publish or read a message, never touch a consumer."""
    api = "$JS.API"
    streams = [*subjects.STREAM_SUBJECTS, f"KV_{OWNERSHIP_BUCKET}", f"OBJ_{MODEL_BUCKET}"]
    publish = [f"{api}.INFO"]
    for stream in streams:
        publish += [f"{api}.STREAM.INFO.{stream}", f"{api}.STREAM.CREATE.{stream}", f"{api}.STREAM.UPDATE.{stream}"]
    publish += [f"{api}.CONSUMER.LIST.{stream}" for stream in subjects.STREAM_SUBJECTS]
    return {"publish": {"allow": publish}, "subscribe": {"allow": [f"{inbox_prefix(PROVISIONER)}.>"]}}


def expand(perms: Mapping[str, Mapping[str, list[str]]], *, partitions: int, replicas: int) -> dict:
    """`perms` with each subject naming `PARTITION` spelled out for partitions 0..partitions-1 and each
    naming `ORDINAL` for ordinals 0..replicas-1, in place and in that order (NATS wildcards match whole
    tokens only, so `identity-p*` cannot be said). The chart does the same (templates/_nats.tpl)."""
    if partitions < 1 or replicas < 1:
        raise ValueError("partitions and replicas must be at least 1")
    out: dict[str, dict[str, list[str]]] = {}
    for direction, rules in perms.items():
        allow: list[str] = []
        for subject in rules["allow"]:
            if PARTITION in subject:
                allow += [subject.replace(PARTITION, str(p)) for p in range(partitions)]
            elif ORDINAL in subject:
                allow += [subject.replace(ORDINAL, str(o)) for o in range(replicas)]
            else:
                allow.append(subject)
        out[direction] = {"allow": allow}
    return out


def default_partitions(environ: Mapping[str, str] | None = None) -> int:
    """The partition count the services of `cdpctl up` run with: CDP_PARTITIONS (they inherit cdpctl's
    environment), or the kit's default."""
    from cdp_kit.settings import ServiceSettings

    value = (os.environ if environ is None else environ).get("CDP_PARTITIONS", "").strip()
    if not value:
        return ServiceSettings.__dataclass_fields__["partitions"].default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"CDP_PARTITIONS={value!r} is invalid: must be a whole number, at least 1")
    return int(value)


def permissions_document() -> dict[str, dict[str, dict[str, list[str]]]]:
    """Every role's permissions with their `PARTITION` / `ORDINAL` placeholders, as the Helm chart reads
    them (deploy/helm/cdp/files/nats-permissions.json, written by `python -m cdp_kit.natsauth`; tests/deploy
    checks it is current); the chart expands them for its partitions and each component's replicas."""
    document = {name: permissions(role) for name, role in sorted(ROLES.items())}
    document[PROVISIONER] = provisioner_permissions()
    return document


# ------------------------------------------------------------------------------------ credentials


def new_password() -> str:
    return secrets.token_urlsafe(32)


def write_credentials(path: Path, user: str, password: str) -> None:
    """Write a service's credentials file, readable by its owner only from the moment it holds the password
    (replaced in one rename).

    Each write stages under a name of its own beside `path` (`<name>.<random>.new`, made 0600 by `mkstemp`
    before anything is written to it), removed when the write fails: two writers of one file at once each
    rename a whole file into place, the last one wins. With one staging name for both, the second's open
    emptied what the first had staged: the first renamed an emptied file into place, or its rename failed,
    the second's rename having taken the staging file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".new")
    try:
        with os.fdopen(fd, "wb") as staged:
            staged.write((json.dumps({"user": user, "password": password}) + "\n").encode())
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        raise


def read_credentials(path: Path) -> tuple[str, str]:
    """(user, password) of a credentials file; ValueError naming the file when it is malformed."""
    try:
        document = json.loads(path.read_text())
        user, password = document["user"], document["password"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f'CDP_NATS_CREDENTIALS_FILE {path} must be JSON {{"user": …, "password": …}}') from exc
    if not isinstance(user, str) or not isinstance(password, str) or not user or not password:
        raise ValueError(f"CDP_NATS_CREDENTIALS_FILE {path}: user and password must be non-empty strings")
    return user, password


class CredentialsFile:
    """The user and password of a credentials file, read again whenever nats.py sends CONNECT (at
    connect and at every reconnect). nats.py asks for the user first, then the password, one after the
    other with nothing in between (`Client._connect_command`): the user call reads the file, the password
    call answers from that same read, and only then do those credentials count as sent.

    `user` is also what anyone holding the connection asks for its user (`nc.options["user"]`: the
    consumers' lag poll does, for the role, at its first poll of each consumer). That lookup sends nothing:
    taken as sent, a lookup between a rotation's rewrite and the next look of `changed` hid the rewrite,
    and the connection stayed on the old user for good (`cdpctl nats-rotate` gave up after 30 s)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sent = read_credentials(path)  # a bad file at start-up stops the service
        self._read = self._sent  # what the last `user` call read, for the `password` call after it
        self._on_file = self._sent  # the file's last readable credentials
        self._seen = self._stamp()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()  # follows the symlink a Kubernetes Secret volume swaps
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_ino

    def changed(self) -> bool:
        """True while the file holds readable credentials different from those the connection last sent.

        Not once per rewrite: a reconnect asked for that did not happen (the client was between states,
        or it came back without calling `user`) is asked for again at the next look, until a CONNECT has
        read the file. The file is read again only when it was rewritten, or when reading it failed (a
        broken file waits for the next rewrite)."""
        stamp = self._stamp()
        if stamp is not None and stamp != self._seen:
            try:
                self._on_file = read_credentials(self.path)
            except ValueError:
                pass  # broken: the last good one stands
            except OSError:
                return self._on_file != self._sent  # not read (replaced meanwhile, no descriptor left): next look
            self._seen = stamp
        return self._on_file != self._sent

    def user(self) -> str:
        try:
            self._on_file = read_credentials(self.path)
        except (OSError, ValueError) as exc:
            log.warning("nats credentials file unreadable; keeping the last good one: %s", type(exc).__name__)
        self._read = self._on_file
        return self._read[0]

    def password(self) -> str:
        self._sent = self._read
        return self._sent[1]


# ------------------------------------------------------------------------------------ the server


# bcrypt's work factor slows down guessing a password from its hash, which matters for a password a person
# chose. cdp's are 256 random bits (`new_password`): no work factor changes whether they can be guessed, so
# the hash is bcrypt's cheapest. The factor is paid by nats-server on every CONNECT and, at every reload
# (a rotation reloads twice), once per connected client, since it checks each connection's credentials
# again: at cost 11 (what `nats server passwd` makes, meant for chosen passwords) that was 0.16 s per
# connection and 3 s for a reload with 20 clients connected, against 3 ms and 30 ms at 4 (docs/security.md).
BCRYPT_COST = 4
# bcrypt reads no further than this: a longer password would be cut, and bcrypt refuses it.
_BCRYPT_MAX_BYTES = 72


def password_hash(password: str, cost: int = BCRYPT_COST) -> str:
    """The bcrypt hash of `password` that nats-server checks a client's password against: `$2a$`, the
    variant every nats-server release recognises (newer ones read `$2b$` too)."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost, prefix=b"2a")).decode()


def _quoted(value: str) -> str:
    return json.dumps(value)


def _block(perms: Mapping[str, Mapping[str, list[str]]]) -> str:
    parts = []
    for direction in ("publish", "subscribe"):
        allow = ", ".join(_quoted(s) for s in perms[direction]["allow"])
        parts.append(f"{direction}: {{ allow: [{allow}] }}")
    return "{ " + ", ".join(parts) + " }"


def authorization_config(
    passwords: Mapping[str, str],
    *,
    operator_password: str | None = None,
    partitions: int | None = None,
    replicas: int = 1,
) -> str:
    """The nats-server `authorization` block: one user per entry of `passwords` (user -> password), with
    the permissions of its service's role (`role_of(user)`) for `partitions` (default: `default_partitions`)
    and `replicas` per service; with `operator_password`, an unrestricted `cdpctl` user. Each password is
    written as its bcrypt hash (`password_hash`); the clients keep sending the password itself."""
    partitions = default_partitions() if partitions is None else partitions
    everyone = {**passwords, **({OPERATOR: operator_password} if operator_password is not None else {})}
    for user, password in everyone.items():
        if len(password.encode()) > _BCRYPT_MAX_BYTES:
            raise ValueError(
                f"the NATS password of user {user!r} is longer than {_BCRYPT_MAX_BYTES} bytes, which bcrypt cannot "
                "hash: make it with cdp_kit.natsauth.new_password()"
            )
    lines = ["authorization {", "  users = ["]
    for user, password in passwords.items():
        role = role_of(user)
        if role == PROVISIONER:
            perms = _block(provisioner_permissions())
        elif role not in ROLES:
            raise KeyError(f"no NATS role for service {role!r}; add it to cdp_kit.natsauth.ROLES")
        else:
            perms = _block(expand(permissions(ROLES[role]), partitions=partitions, replicas=replicas))
        hashed = _quoted(password_hash(password))
        lines.append(f"    {{ user: {_quoted(user)}, password: {hashed}, permissions: {perms} }}")
    if operator_password is not None:
        lines.append(f"    {{ user: {_quoted(OPERATOR)}, password: {_quoted(password_hash(operator_password))} }}")
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ServerTls:
    """TLS for nats-server's client port; with `client_ca`, clients must present a certificate it signed."""

    cert_file: Path
    key_file: Path
    client_ca: Path | None = None

    def config(self) -> str:
        lines = ["tls {", f"  cert_file: {_quoted(str(self.cert_file))}", f"  key_file: {_quoted(str(self.key_file))}"]
        if self.client_ca is not None:
            lines += [f"  ca_file: {_quoted(str(self.client_ca))}", "  verify: true"]
        lines.append("}")
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ the client


@dataclasses.dataclass(frozen=True)
class NatsClientSettings:
    """How a process authenticates to NATS and checks it. Read by `Bus.connect` from the environment
    (every service, cdpctl), so no service declares them; documented in docs/security.md."""

    credentials_file: Path | None = env(
        "CDP_NATS_CREDENTIALS_FILE",
        None,
        help='JSON {"user","password"} of this service\'s NATS user; re-read at every reconnect (rotation)',
    )
    tls_ca_file: Path | None = env(
        "CDP_NATS_TLS_CA_FILE", None, help="CA (PEM) that signed the NATS server's certificate"
    )
    tls_cert_file: Path | None = env("CDP_NATS_TLS_CERT_FILE", None, help="client certificate (PEM) for mutual TLS")
    tls_key_file: Path | None = env("CDP_NATS_TLS_KEY_FILE", None, help="client private key (PEM)", secret=True)
    provision_wait: float = env(
        "CDP_NATS_PROVISION_WAIT",
        0.0,
        help="seconds a service waits at start for its streams to be provisioned as specified before it "
        "stops (0: stops at once; the chart sets it, its provisioning Job running beside the services)",
    )

    def validate(self) -> list[str]:
        problems = []
        for variable, path in (
            ("CDP_NATS_CREDENTIALS_FILE", self.credentials_file),
            ("CDP_NATS_TLS_CA_FILE", self.tls_ca_file),
            ("CDP_NATS_TLS_CERT_FILE", self.tls_cert_file),
            ("CDP_NATS_TLS_KEY_FILE", self.tls_key_file),
        ):
            if path is not None and not path.is_file():
                problems.append(f"{variable}={str(path)!r} is not a readable file")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            problems.append("CDP_NATS_TLS_CERT_FILE and CDP_NATS_TLS_KEY_FILE must be set together")
        if self.provision_wait < 0:
            problems.append(f"CDP_NATS_PROVISION_WAIT={self.provision_wait:g} is invalid: must be 0 or more")
        if self.credentials_file is not None and self.credentials_file.is_file():
            try:
                read_credentials(self.credentials_file)
            except (OSError, ValueError) as exc:
                problems.append(str(exc))
        return problems

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> NatsClientSettings:
        return load_settings(cls, environ)

    def tls_context(self) -> ssl.SSLContext | None:
        """A client TLS context when a CA or a client certificate is configured (None: plain TCP)."""
        if self.tls_ca_file is None and self.tls_cert_file is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls_ca_file) if self.tls_ca_file else None)
        if self.tls_cert_file is not None and self.tls_key_file is not None:
            context.load_cert_chain(str(self.tls_cert_file), str(self.tls_key_file))
        return context

    def credentials(self) -> CredentialsFile | None:
        return CredentialsFile(self.credentials_file) if self.credentials_file is not None else None

    def connect_options(self, credentials: CredentialsFile | None = None) -> dict[str, Any]:
        """Keyword arguments for `nats.aio.client.Client.connect`. With credentials, replies arrive on
        the service's own inbox prefix (the only one its permissions let it subscribe to)."""
        options: dict[str, Any] = {}
        if credentials is not None:
            options.update(
                user=credentials.user,
                password=credentials.password,
                inbox_prefix=inbox_prefix(role_of(credentials.user())),
            )
        tls = self.tls_context()
        if tls is not None:
            options["tls"] = tls
        return options


def client_tls_context(files: Mapping[str, str] | None) -> ssl.SSLContext | None:
    """The TLS context a client presents from a {"ca_file", "cert_file", "key_file"} record (run.json's
    "tls" under `cdpctl up --tls`); None, plain TCP, without one."""
    if not files:
        return None
    return NatsClientSettings(
        tls_ca_file=Path(files["ca_file"]),
        tls_cert_file=Path(files["cert_file"]),
        tls_key_file=Path(files["key_file"]),
    ).tls_context()


if __name__ == "__main__":
    print(json.dumps(permissions_document(), indent=2))


__all__ = [
    "ACTION_CHANNELS",
    "ANY",
    "MODEL_BUCKET",
    "OPERATOR",
    "ORDINAL",
    "OWNERSHIP_BUCKET",
    "PARTITION",
    "PROVISIONER",
    "ROLES",
    "BusRole",
    "Consumer",
    "CredentialsFile",
    "NatsClientSettings",
    "ServerTls",
    "SettingsError",
    "authorization_config",
    "client_tls_context",
    "default_partitions",
    "dispatch_durable",
    "expand",
    "inbox_prefix",
    "new_password",
    "password_hash",
    "permissions",
    "permissions_document",
    "provisioner_permissions",
    "read_credentials",
    "role_of",
    "write_credentials",
]
