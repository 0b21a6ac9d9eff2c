"""The local platform `cdpctl up` runs: which services exist, their ports, their environment, and the
development companions started beside them.

Each later service adds one `ServiceProcess` entry here (and one component in the Helm chart's values).

Companions (`COMPANIONS`) are local stand-ins for what a deployment reaches outside itself: the channel
providers orchestration sends through (SMTP, Twilio, FCM, Web Push, webhooks: `cdp_testing.channels`) and
the four CRMs (`cdp_crm_emulators`). They are test and development code, never in the image or the chart.
They serve no gRPC health: `cdpctl status` shows them UP while each listener answers a request of its
protocol (an HTTP request, SMTP's greeting) within a short time - a port that accepts connections is not
enough, a stopped (SIGSTOP) or wedged process still accepts them - and a companion that is down does not
make the platform unhealthy (it is not part of it). They start before the services, so a service whose
environment names a companion finds it listening (orchestration checks the FCM key file at start). Their
secrets (the local Twilio's auth token, the webhook signing key) reach them through their environment,
never their command line, which every local user can read (`ps`).

The workspace is its owner's alone: it holds the NATS operator's password (run.json), every token, the
stores and the logs. Folders are 0700 and files 0600 from creation (`private_umask`: cdpctl creates under
umask 077 and its children inherit it, so the services' stores and logs, nats-server's JetStream store and
the companions' files are made so too); `Workspace.make_private` tightens a workspace an older cdpctl
left readable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
import stat
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cdp_kit import ports as port_picks
from cdp_kit.ports import port_is_free

# The kit's auth and natsauth are imported where tokens and NATS users are made or read: they pull in
# grpc and the bus (nats, aiohttp), and every cdpctl command builds a Workspace before it does anything.


@dataclass(frozen=True)
class ServiceProcess:
    name: str
    module: str
    grpc_port: int
    metrics_port: int
    http_port: int | None = None
    # Extra variables; "{home}" stands for the workspace folder (.cdp), "{<name>.<listener>}" for the port
    # a companion or an earlier service listens on (e.g. "{channels.smtp}", "{collector.http}"),
    # "{secret:<name>}" for a dev secret of the workspace and "{write_key}" for the dev source's write key
    # ("{write_key:crm}": the CRM source's).
    env: dict[str, str] = field(default_factory=dict)
    # Variables set only while a companion runs (`cdpctl up --no-companions` leaves them out), by
    # companion name: a provider pointed at a local stand-in is off without it, never half-configured.
    companion_env: dict[str, dict[str, str]] = field(default_factory=dict)
    # Services it calls over gRPC: each becomes CDP_<NAME>_ADDRESS and CDP_<NAME>_TOKEN_FILE, as in the chart.
    calls: tuple[str, ...] = ()
    # Scopes beyond reading the peers it calls (`service_scopes`: its token's).
    extra_scopes: tuple[str, ...] = ()
    # Files written before it starts: path (placeholders as in `env`) -> a template under cdpctl/dev/,
    # filled the same way. A template naming a companion that is not running is written as `empty`.
    files: dict[str, tuple[str, str]] = field(default_factory=dict)


# Orchestration sends through the local channel servers: SMTP without TLS or AUTH (a local server only),
# the Twilio API, FCM with the key file the local FCM server trusts, HMAC-signed webhooks to the local
# receiver. Web Push stays off: its subscriptions come from a browser. In-app needs no provider.
ORCHESTRATION = ServiceProcess(
    "orchestration",
    "cdp_orchestration",
    grpc_port=50056,
    metrics_port=9469,
    # A journey whose conditions read past events is published once profile defines the computed traits
    # behind them (profile:admin), as segmentation's are. A journey's segments must exist in segmentation
    # to be saved or published, and a live journey whose segment was deleted says so.
    calls=("profile", "segmentation"),
    extra_scopes=("profile:admin",),
    env={
        # The feedback loop: outcome events (Message Sent, Bounced, Failed) go in through the collector.
        "CDP_OUTCOMES_URL": "http://127.0.0.1:{collector.http}",
        "CDP_OUTCOMES_WRITE_KEY": "{write_key}",
    },
    companion_env={
        "channels": {
            "CDP_SMTP_HOST": "127.0.0.1",
            "CDP_SMTP_PORT": "{channels.smtp}",
            "CDP_SMTP_SECURITY": "none",
            "CDP_SMTP_FROM": "cdp local <journeys@cdp.local>",
            "CDP_TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
            "CDP_TWILIO_AUTH_TOKEN": "{secret:twilio}",
            "CDP_TWILIO_FROM": "+15005550006",
            "CDP_TWILIO_API_URL": "http://127.0.0.1:{channels.twilio}",
            "CDP_FCM_CREDENTIALS_FILE": "{home}/channels/fcm-key.json",
            "CDP_FCM_PROJECT_ID": "cdp-local",
            "CDP_FCM_API_URL": "http://127.0.0.1:{channels.fcm}",
            "CDP_WEBHOOK_SECRET": "{secret:webhook}",
            "CDP_WEBHOOK_URL": "http://127.0.0.1:{channels.webhook}/hooks/cdp",
            # The companions all listen on loopback, which webhooks reach only when it is listed.
            "CDP_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1,localhost",
            # Web Push is off here, but one turned on (a VAPID key) reaches the local push service only
            # when loopback is listed, as webhooks do.
            "CDP_WEBPUSH_ALLOWED_HOSTS": "127.0.0.1,localhost",
        },
    },
)


# The CRM connector writes to the local CRMs (cdpctl/dev/crm.yaml: HubSpot contacts, segments and tasks,
# Salesforce contacts) with the credentials the emulators accept by default - local stand-ins, not
# secrets. Their changes (a ticket opened in the local HubSpot) come back through the collector: HubSpot's
# at once, since the connector points the local HubSpot app's webhooks at its own endpoint ({crm.http})
# at start, the others read every few seconds. Without companions the connector runs with no connections.
CRM = ServiceProcess(
    "crm",
    "cdp_crm",
    grpc_port=50057,
    metrics_port=9470,
    http_port=8035,  # HubSpot's webhooks (POST /webhooks/hubspot/<connection>)
    # A backfill reaches every person: listed from the profile service's store, read through its API.
    calls=("profile",),
    env={
        "CDP_CRM_CONNECTIONS_FILE": "{home}/crm/connections.yaml",
        "CDP_CRM_WEBHOOK_PORT": "{crm.http}",
        "CDP_CRM_PROFILE_STORE_URL": "sqlite:///{home}/data/profile.db",
        "CDP_CRM_COLLECTOR_URL": "http://127.0.0.1:{collector.http}",
        # A collector source of its own: a trait a CRM user wrote shows the CRM as its provenance.
        "CDP_CRM_COLLECTOR_WRITE_KEY": "{write_key:crm}",
        "CDP_CRM_POLL_SECONDS": "5",
    },
    companion_env={
        "crm-hubspot": {
            "CDP_DEV_HUBSPOT_TOKEN": "pat-local-hubspot",
            "CDP_DEV_HUBSPOT_CLIENT_SECRET": "hubspot-app-secret",
            "CDP_DEV_HUBSPOT_DEVELOPER_KEY": "local-developer-key",
        },
        "crm-salesforce": {
            "CDP_DEV_SALESFORCE_CLIENT_ID": "local-consumer-key",
            "CDP_DEV_SALESFORCE_CLIENT_SECRET": "local-consumer-secret",
        },
    },
    files={"{home}/crm/connections.yaml": ("crm.yaml", "connections: []\n")},
)


SERVICES: tuple[ServiceProcess, ...] = (
    ServiceProcess("collector", "cdp_collector", grpc_port=50051, metrics_port=9464, http_port=8080),
    ServiceProcess("identity", "cdp_identity", grpc_port=50052, metrics_port=9465),
    # Profile asks segmentation what reads a computed trait before deleting it (segmentation:read).
    ServiceProcess("profile", "cdp_profile", grpc_port=50053, metrics_port=9466, calls=("identity", "segmentation")),
    # Scoring reads persons from profile and defines the computed traits its models read (profile:admin).
    ServiceProcess(
        "scoring",
        "cdp_scoring",
        grpc_port=50054,
        metrics_port=9467,
        calls=("profile",),
        extra_scopes=("profile:admin",),
        # Training runs and realised quality read profile's store (read only) in a worker process.
        env={
            "CDP_SCORING_MODEL_STORE": "{home}/models",
            "CDP_SCORING_TRAINING_STORE": "sqlite:///{home}/data/profile.db",
        },
    ),
    # Segmentation defines the computed traits its event conditions compile to on profile (profile:admin),
    # and asks scoring which scores its models write (a segment naming another score is refused), and
    # orchestration which live journeys use a segment or computed trait before either is deleted.
    ServiceProcess(
        "segmentation",
        "cdp_segmentation",
        grpc_port=50055,
        metrics_port=9468,
        calls=("profile", "scoring", "orchestration"),
        extra_scopes=("profile:admin",),
    ),
    ORCHESTRATION,
    CRM,
)


@dataclass(frozen=True)
class Companion:
    """A development stand-in `cdpctl up` runs beside the services (`python -m <module> <args>`).

    `ports` maps each listener to its conventional port; a taken one is replaced by a free one, as for
    services. In `args` and `env`, "{<listener>}" is that listener's port, "{home}" the workspace folder
    and "{secret:<name>}" a dev secret of the workspace (the same value the services' environment gets).
    A secret goes in `env`, never in `args`: a command line is readable by every local user.
    """

    name: str
    module: str
    args: tuple[str, ...]
    ports: dict[str, int]
    # What the companion stands for, as `cdpctl status` shows it.
    role: str = ""
    # How to reach each listener: "{<listener>}" is its port; default http://127.0.0.1:{port}.
    urls: dict[str, str] = field(default_factory=dict)
    # Variables added to its environment (placeholders as in `args`): its secrets.
    env: dict[str, str] = field(default_factory=dict)
    # The protocol each listener answers, for the health probe (`cdpctl status`): "http" unless named
    # ("smtp": its greeting). An HTTP listener is asked `GET <health_path>`; any HTTP answer will do.
    protocols: dict[str, str] = field(default_factory=dict)
    health_path: str = "/"


CHANNELS = Companion(
    "channels",
    "cdp_testing.channels",
    args=(
        "--smtp-port={smtp}",
        "--maildir={home}/mail",
        "--twilio-port={twilio}",
        "--fcm-port={fcm}",
        "--fcm-key-file={home}/channels/fcm-key.json",
        "--webpush-port={webpush}",
        "--webhook-port={webhook}",
    ),
    # The variables its options default to (the same names orchestration reads).
    env={"CDP_TWILIO_AUTH_TOKEN": "{secret:twilio}", "CDP_WEBHOOK_SECRET": "{secret:webhook}"},
    protocols={"smtp": "smtp"},
    ports={"smtp": 1025, "twilio": 8025, "fcm": 8026, "webpush": 8027, "webhook": 8028},
    role="local SMTP (mail in .cdp/mail), Twilio, FCM, Web Push and webhook servers",
    urls={"smtp": "smtp://127.0.0.1:{smtp}", "webhook": "http://127.0.0.1:{webhook}/hooks/cdp"},
)


def _crm(name: str, port: int, title: str) -> Companion:
    return Companion(
        f"crm-{name}",
        "cdp_crm_emulators",
        args=(name, "--port={api}", f"--snapshot={{home}}/crm/{name}.json"),
        ports={"api": port},
        role=f"{title} emulator (records kept in .cdp/crm/{name}.json)",
        # An inspection route: not an API call, so never counted against the CRM's limits nor faulted.
        health_path="/_emulator/budget",
    )


COMPANIONS: tuple[Companion, ...] = (
    CHANNELS,
    _crm("salesforce", 8031, "Salesforce"),
    _crm("hubspot", 8032, "HubSpot"),
    _crm("dynamics", 8033, "Dynamics 365"),
    _crm("zoho", 8034, "Zoho CRM"),
)


def service_scopes(svc: ServiceProcess) -> list[str]:
    """What a service's token may do: read each peer it calls (`calls`, as the chart's) and its extra
    scopes. No more: the token of a service that does not call scoring cannot read scoring."""
    return [*(f"{peer}:read" for peer in svc.calls), *svc.extra_scopes]


_PLACEHOLDER = re.compile(r"\{([a-z0-9_:.-]+)\}")


def fill(text: str, ws: Workspace, ports: dict[str, int]) -> str:
    """`text` with "{home}", "{write_key}" (the dev source's; "{write_key:<source>}" another's),
    "{secret:<name>}" and port placeholders ("{smtp}", "{channels.smtp}") filled.

    An unknown placeholder is a bug in the tables above: KeyError names it."""

    def value(match: re.Match) -> str:
        key = match.group(1)
        if key == "home":
            return str(ws.root)
        if key == "write_key":
            return ws.write_key()
        if key.startswith("write_key:"):
            return ws.write_key(key.removeprefix("write_key:"))
        if key.startswith("secret:"):
            return ws.dev_secret(key.removeprefix("secret:"))
        return str(ports[key])

    return _PLACEHOLDER.sub(value, text)


# The conventional gRPC ports (50051-50057) lie in Linux's ephemeral range: between picking one and its
# service binding it (seconds: the services start one after another, and every gRPC port is picked before
# the first starts, since services call peers started after them), an outgoing connection of anyone's may
# be given it as its own port, and the service then cannot listen there. A socket bound to the port keeps
# the kernel from handing it out; it is closed right before the service that listens there starts
# (`free_held`), which leaves only the service's own start-up as a window.
_EPHEMERAL_FROM = 32_768
_held: dict[int, socket.socket] = {}


def _hold(port: int) -> None:
    if port < _EPHEMERAL_FROM or port in _held:
        return
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return  # taken meanwhile: the service's own bind will say so
    _held[port] = sock


def free_held(*ports: int | None) -> None:
    """Let the service about to start bind these ports (`_hold`)."""
    for port in ports:
        sock = _held.pop(port, None) if port is not None else None
        if sock is not None:
            sock.close()


def pick_port(preferred: int) -> int:
    """The conventional port when free, else a free spare one (a second checkout, a busy laptop); free means
    nothing listens there and no other `cdpctl up` on this machine picked it. CDP_UP_PORTS=any skips the
    conventional ports: several platforms started at once (tests running in parallel) would otherwise all
    want the same ones. Each call gives another port: one this process picked before is taken (nothing
    listens there yet, but another of its listeners is about to). Spare ports and picks: `cdp_kit.ports`."""
    if (
        preferred
        and os.environ.get("CDP_UP_PORTS") != "any"
        and not port_picks.is_mine(preferred)
        and port_is_free(preferred)
        and port_picks.reserve(preferred)
    ):
        _hold(preferred)
        return preferred
    return port_picks.spare_port()


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Files and folders made inside (by this process, and by the children it starts) are the owner's only."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def write_private(path: Path, content: str | bytes) -> None:
    """`content` in `path`, readable by its owner only from the moment it exists (replaced in one rename).

    Each write stages under a name of its own beside `path` (`<name>.<random>.new`, made owner-only by
    `mkstemp`), so two writers of one file at once (`cdpctl up`'s supervisor and `cdpctl nats-rotate`
    both write run.json) each rename a whole file into place - the last one wins, neither garbles the
    other. A staging file never outlives a failed write; readers that list a folder skip `*.new`."""
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".new")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        raise


@dataclass
class Workspace:
    """Everything `cdpctl up` keeps under one project-local folder (default `.cdp/`), its owner's only."""

    root: Path
    # How discovery chose it when it is not the current folder's own (`discover`); "" otherwise.
    found: str = field(default="", compare=False)

    @classmethod
    def default(cls) -> Workspace:
        return cls(Path(os.environ.get("CDP_HOME", ".cdp")).resolve())

    @classmethod
    def discover(cls) -> Workspace:
        """The workspace of the running platform, wherever the command runs from.

        Without CDP_HOME/--home: the folder's own `.cdp` when it or its repository has one (`own`: the
        nearest from the current folder up to the repository's root), running or not - another checkout's
        platform never stands in for this checkout's; elsewhere the `.cdp` of the checkout this cdpctl is
        installed in (`<checkout>/.venv/bin/cdpctl`) if a platform runs there, else the one the last
        `cdpctl up` on this account recorded in `~/.cdp/current.json`; with none running, `./.cdp` (where
        `cdpctl up` starts). `found` says how a workspace other than the folder's own was chosen.
        """
        own = cls.own()
        if own is not None:
            return own
        checkout = Path(sys.prefix).parent
        if (checkout / "pyproject.toml").is_file():
            installed = cls(checkout / ".cdp", found="the running platform of the checkout this cdpctl is installed in")
            if installed.running() is not None:
                return installed
        try:
            recorded = cls(
                Path(json.loads(current_file().read_text())["home"]),
                found="the running platform ~/.cdp/current.json names",
            )
        except (OSError, ValueError, KeyError, TypeError):
            recorded = None
        if recorded is not None and recorded.running() is not None:
            return recorded
        return cls(Path(".cdp").resolve())

    @classmethod
    def own(cls) -> Workspace | None:
        """The `.cdp` of the current folder, or else the nearest of its parents' up to its repository's root
        (the folder holding `.git`); none outside a repository without `./.cdp`. `~/.cdp`, which holds
        current.json only, is no workspace."""
        here = Path.cwd().resolve()
        folders = [here]
        for parent in here.parents:
            if (folders[-1] / ".git").exists():
                break
            folders.append(parent)
        else:
            folders = [here]  # no repository: the current folder alone
        for folder in folders:
            candidate = folder / ".cdp"
            if candidate.is_dir() and candidate != current_file().parent:
                return cls(candidate)
        return None

    @property
    def nats_dir(self) -> Path:
        return self.root / "nats"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def secrets_dir(self) -> Path:
        return self.root / "secrets"

    @property
    def tokens_file(self) -> Path:
        return self.secrets_dir / "tokens.json"

    @property
    def admin_token_file(self) -> Path:
        return self.secrets_dir / "admin.token"

    def service_token_file(self, name: str) -> Path:
        """The token a service presents to the services it calls (`service_scopes`: its own)."""
        return self.secrets_dir / f"{name}.token"

    @property
    def nats_secrets_dir(self) -> Path:
        return self.secrets_dir / "nats"

    def nats_credentials_file(self, service: str) -> Path:
        """A service's NATS user and password (CDP_NATS_CREDENTIALS_FILE); `cdpctl` for the operator."""
        return self.nats_secrets_dir / f"{service}.json"

    @property
    def nats_auth_file(self) -> Path:
        """The users and permissions nats-server reads (included by its nats.conf, beside it)."""
        return self.nats_dir / "auth.conf"

    def nats_users(self, services: tuple[ServiceProcess, ...] | None = None) -> dict[str, str]:
        """user -> password of every service's current credentials file."""
        users = {}
        from cdp_kit.natsauth import read_credentials

        for svc in services or SERVICES:
            user, password = read_credentials(self.nats_credentials_file(svc.name))
            users[user] = password
        return users

    def write_nats_auth(self, extra: dict[str, str] | None = None) -> None:
        """nats-server's users: each service's (plus `extra`, a user being rotated in) and the operator."""
        from cdp_kit.natsauth import OPERATOR, authorization_config, read_credentials

        _user, operator = read_credentials(self.nats_credentials_file(OPERATOR))
        text = authorization_config({**self.nats_users(), **(extra or {})}, operator_password=operator)
        self.nats_dir.mkdir(parents=True, exist_ok=True)
        write_private(self.nats_auth_file, text)

    def nats_operator_url(self, url: str) -> str:
        """`url` with the operator's user and password: what run.json gives cdpctl and tests."""
        from cdp_kit.natsauth import OPERATOR, read_credentials

        _user, password = read_credentials(self.nats_credentials_file(OPERATOR))
        return url.replace("nats://", f"nats://{OPERATOR}:{password}@", 1)

    @property
    def sources_file(self) -> Path:
        return self.secrets_dir / "sources.json"

    @property
    def run_file(self) -> Path:
        return self.root / "run.json"

    @property
    def companion_dirs(self) -> tuple[Path, ...]:
        """Where the companions keep the FCM key and the CRMs' records. Not the maildir (`mail/`): the
        SMTP server makes it with its cur/new/tmp only when the folder does not exist yet."""
        return (self.root / "channels", self.root / "crm")

    def privacy_hash_key_file(self) -> Path:
        """The key profile and the collector hash a deleted person's identifiers with (CDP_PRIVACY_HASH_KEY_FILE),
        made once per home and never replaced: the deletion notices made with it are kept for ever, and a
        notice whose key is gone no longer suppresses its person's events."""
        path = self.secrets_dir / "privacy-hash.key"
        if not path.exists():
            self.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_private(path, secrets.token_hex(32) + "\n")
        return path

    def dev_secret(self, name: str) -> str:
        """A secret the services and the companions share locally (the webhook signing key, the local
        Twilio's auth token), made once per workspace and readable by its owner only."""
        path = self.secrets_dir / f"dev-{name}.secret"
        if not path.exists():
            self.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_private(path, secrets.token_urlsafe(24) + "\n")
        return path.read_text().strip()

    def make_private(self) -> int:
        """Take group and other access away from everything in the workspace (folders 0700, files keep
        their owner's bits only), as an older cdpctl, or a looser umask, left it; how many were changed.
        Symbolic links are left alone (their mode means nothing; what they point at is not ours)."""
        if not self.root.is_dir():
            return 0
        changed = 0
        paths = [self.root]
        for folder, dirs, files in os.walk(self.root):  # not into linked folders
            paths += [Path(folder) / name for name in (*dirs, *files)]
        for path in paths:
            try:
                mode = path.lstat().st_mode
                if stat.S_ISLNK(mode):
                    continue
                wanted = 0o700 if stat.S_ISDIR(mode) else stat.S_IMODE(mode) & 0o700
                if stat.S_IMODE(mode) != wanted:
                    path.chmod(wanted)
                    changed += 1
            except FileNotFoundError:
                continue  # removed meanwhile (a service replacing one of its files)
        return changed

    def prepare(self, services: tuple[ServiceProcess, ...] = SERVICES) -> None:
        """The workspace's folders, tokens, NATS users and sources, made owner-only (whatever the caller's
        umask: see the module docstring)."""
        with private_umask():
            self._prepare(services)

    def _prepare(self, services: tuple[ServiceProcess, ...]) -> None:
        from cdp_kit.auth import new_token, write_tokens_file
        from cdp_kit.natsauth import OPERATOR, new_password, write_credentials

        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for folder in (self.nats_dir, self.data_dir, self.logs_dir, self.secrets_dir, *self.companion_dirs):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.secrets_dir.chmod(0o700)
        # Every platform service that calls another gets its token, whichever are started now: a service
        # started later in the same workspace (a test, `cdpctl up --only`) finds it.
        callers = list({svc.name: svc for svc in (*SERVICES, *services) if svc.calls}.values())
        files = [self.tokens_file, self.admin_token_file, *(self.service_token_file(svc.name) for svc in callers)]
        if not all(f.exists() for f in files):
            # (A workspace from before per-service tokens lacks some: all are made again, with their scopes.)
            token = new_token()
            entries = [("cdpctl-admin", token, ["*"])]
            written = [(self.admin_token_file, token)]
            for svc in callers:
                mine = new_token()
                entries.append((f"cdp-{svc.name}", mine, service_scopes(svc)))
                written.append((self.service_token_file(svc.name), mine))
            write_tokens_file(self.tokens_file, entries)
            (self.secrets_dir / "services.token").unlink(missing_ok=True)  # the shared one, no longer valid
            for path, value in written:
                path.write_text(value + "\n")
                path.chmod(0o600)
        self.nats_secrets_dir.mkdir(parents=True, exist_ok=True)
        self.nats_secrets_dir.chmod(0o700)
        for name in (OPERATOR, *(svc.name for svc in services)):
            if not self.nats_credentials_file(name).exists():
                write_credentials(self.nats_credentials_file(name), name, new_password())
        if not self.sources_file.exists():
            document = {
                "sources": [{"id": "dev", "name": "Local development", "write_key": "wk_dev_" + secrets.token_hex(12)}]
            }
            self.sources_file.write_text(json.dumps(document, indent=2))
            self.sources_file.chmod(0o600)
        document = json.loads(self.sources_file.read_text())
        if not any(source.get("id") == "crm" for source in document["sources"]):
            # The CRM connector posts what CRM users change as a source of its own (a workspace made
            # before it had one gets it now); "dev" stays first, the key `write_key()` gives.
            crm = {"id": "crm", "name": "CRM changes read back", "write_key": "wk_crm_" + secrets.token_hex(12)}
            document["sources"].append(crm)
            self.sources_file.write_text(json.dumps(document, indent=2))
            self.sources_file.chmod(0o600)

    def admin_token(self) -> str:
        return self.admin_token_file.read_text().strip()

    def write_key(self, source: str | None = None) -> str:
        """The dev source's write key, or the named source's."""
        sources = json.loads(self.sources_file.read_text())["sources"]
        return next(s for s in sources if source is None or s["id"] == source)["write_key"]

    def write_run(self, state: dict) -> None:
        """run.json, owner-only: its "nats" URL carries the operator's password (every permission), the
        current one: `cdpctl nats-rotate cdpctl` may have changed it since `state` was made."""
        from cdp_kit.urls import without_credentials

        if state.get("nats") and self.nats_credentials_file("cdpctl").exists():
            state["nats"] = self.nats_operator_url(without_credentials(state["nats"]))
        write_private(self.run_file, json.dumps(state, indent=2))

    def read_run(self) -> dict | None:
        """run.json, when it is this home's: one copied with the home (a backup, a moved folder) names the
        platform of the home it was copied from, its ports and tokens, so acting on it would act there."""
        try:
            state = json.loads(self.run_file.read_text())
        except (OSError, ValueError):
            return None
        home = state.get("home") if isinstance(state, dict) else None
        if home is not None and home != str(self.root.resolve()):
            return None
        return state

    def running(self) -> dict | None:
        """The run state when the `cdpctl up` that wrote it is still alive (a crash leaves a stale file)."""
        state = self.read_run()
        return state if state and pid_alive(state.get("pid", -1)) else None

    def record_current(self) -> None:
        """Let cdpctl find this platform from any folder (`~/.cdp/current.json`)."""
        try:
            current_file().parent.mkdir(parents=True, exist_ok=True)
            current_file().write_text(json.dumps({"home": str(self.root), "pid": os.getpid()}))
        except OSError:
            pass  # a read-only home: cdpctl still finds the platform from the checkout

    def forget_current(self) -> None:
        try:
            if json.loads(current_file().read_text()).get("home") == str(self.root):
                current_file().unlink()
        except (OSError, ValueError, AttributeError):
            pass


def current_file() -> Path:
    return Path.home() / ".cdp" / "current.json"


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    return True


# The services each secret file is given to (the chart's mountSources / mountPrivacyHashKey).
SOURCES_FILE_READERS = frozenset({"collector"})
PRIVACY_HASH_KEY_READERS = frozenset({"collector", "identity", "profile"})


def service_environment(
    ws: Workspace,
    svc: ServiceProcess,
    *,
    nats_url: str,
    grpc_port: int,
    metrics_port: int,
    http_port: int | None,
    peers: dict[str, str] | None = None,
    named_ports: dict[str, int] | None = None,
) -> dict[str, str]:
    """The environment of one service process. `named_ports` maps "<companion or service>.<listener>" to
    the port it listens on, for the service's "{channels.smtp}" and "{collector.http}" placeholders."""
    from cdp_kit.auth import token_file_variable

    env = dict(os.environ)
    env.update(
        {
            "OTEL_SERVICE_NAME": svc.name,
            "CDP_NATS_URL": nats_url,
            "CDP_NATS_CREDENTIALS_FILE": str(ws.nats_credentials_file(svc.name)),
            "CDP_GRPC_HOST": "127.0.0.1",
            "CDP_GRPC_PORT": str(grpc_port),
            "CDP_METRICS_PORT": str(metrics_port),
            "CDP_STORE_URL": f"sqlite:///{ws.data_dir / (svc.name + '.db')}",
            "CDP_AUTH_MODE": "tokens",
            "CDP_AUTH_TOKENS_FILE": str(ws.tokens_file),
            "CDP_LOG_FORMAT": env.get("CDP_LOG_FORMAT", "json"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    # A secret file reaches only the processes that read it, as the chart mounts them: the write keys
    # (the collector's sources) and the key that hashes a deleted person's identifiers (the collector's
    # suppression list, profile's deletion notices).
    for variable, path, readers in (
        ("CDP_COLLECTOR_SOURCES_FILE", ws.sources_file, SOURCES_FILE_READERS),
        ("CDP_PRIVACY_HASH_KEY_FILE", ws.privacy_hash_key_file(), PRIVACY_HASH_KEY_READERS),
    ):
        if svc.name in readers:
            env[variable] = str(path)
        else:
            env.pop(variable, None)
    if http_port is not None:
        env["CDP_HTTP_HOST"] = "127.0.0.1"
        env["CDP_HTTP_PORT"] = str(http_port)
    named_ports = dict(named_ports or {})
    if http_port is not None:
        named_ports[f"{svc.name}.http"] = http_port  # its own listener, for its own variables ("{crm.http}")
    token_file = ws.service_token_file(svc.name)
    for peer in svc.calls:
        name = peer.upper().replace("-", "_")
        env[f"CDP_{name}_ADDRESS"] = (peers or {})[peer]
        # The token from its file (re-read when it changes; it wins over the variable), as the chart
        # mounts it. CDP_<NAME>_TOKEN stays set for development tools that read the environment.
        env[token_file_variable(peer)] = str(token_file)
        env[f"CDP_{name}_TOKEN"] = token_file.read_text().strip()
    env.update({key: fill(value, ws, named_ports or {}) for key, value in svc.env.items()})
    running = {name.partition(".")[0] for name in named_ports or {}}
    for companion, variables in svc.companion_env.items():
        if companion in running:
            env.update({key: fill(value, ws, named_ports or {}) for key, value in variables.items()})
    return env


def next_nats_user(user: str) -> str:
    """The user a rotation brings in: `profile` -> `profile.2` -> `profile.3`."""
    role, _, generation = user.partition(".")
    return f"{role}.{int(generation or 1) + 1}"


# nats-server reads the users from the workspace's auth file (`Workspace.nats_auth_file`), so a rotation
# rewrites that file and asks the server to reload, and a restarted server reads the current users.
NATS_SERVER_CONFIG = 'include "auth.conf"\n'


def nats_server_config(ws: Workspace, *, use_tls: bool = False) -> str:
    """What `cdpctl up` appends to nats-server's configuration: the users, and with `--tls` its
    certificate and the client certificates it requires (`cdpctl.tls.nats_server_config`)."""
    if not use_tls:
        return NATS_SERVER_CONFIG
    from cdpctl import tls

    return NATS_SERVER_CONFIG + tls.nats_server_config(ws.root)


def write_service_files(
    ws: Workspace, svc: ServiceProcess, named_ports: dict[str, int], kept: list[Path] | None = None
) -> list[Path]:
    """Write the service's files (`ServiceProcess.files`) from their templates, ports filled in. A
    template naming a listener nobody runs (`cdpctl up --no-companions`) is replaced by its empty form,
    so a service is never pointed at a CRM that is not there.

    A file the operator edited since it was written (its digest is not the one kept beside it, in
    `<file>.written`) is kept as it is and listed in `kept`: a start never throws an edit away."""
    written = []
    for target, (template, empty) in svc.files.items():
        text = (Path(__file__).parent / "dev" / template).read_text()
        try:
            text = fill(text, ws, named_ports)
        except KeyError:
            text = empty
        path = Path(fill(target, ws, named_ports))
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        stamp = path.with_name(path.name + ".written")
        if path.exists() and stamp.exists() and stamp.read_text().strip() != _digest(path.read_bytes()):
            if kept is not None:
                kept.append(path)
            written.append(path)
            continue
        write_private(path, text)  # the CRM connections name their credentials
        write_private(stamp, _digest(text.encode()) + "\n")
        written.append(path)
    return written


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def companion_command(ws: Workspace, companion: Companion, ports: dict[str, int]) -> list[str]:
    """`python -m <module> <args>` with its ports (by listener) and the workspace filled in (no secret:
    those are in `companion_environment`)."""
    return [sys.executable, "-m", companion.module, *(fill(arg, ws, ports) for arg in companion.args)]


def companion_environment(ws: Workspace, companion: Companion, ports: dict[str, int]) -> dict[str, str]:
    """The companion's environment: cdpctl's, unbuffered output, and its `env` (its secrets) filled in.
    A process's environment is readable by its owner only (/proc/PID/environ), unlike its command line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.update({key: fill(value, ws, ports) for key, value in companion.env.items()})
    return env


def companion_urls(companion: Companion, ports: dict[str, int]) -> dict[str, str]:
    return {
        listener: _PLACEHOLDER.sub(
            lambda m: str(ports[m.group(1)]), companion.urls.get(listener) or f"http://127.0.0.1:{{{listener}}}"
        )
        for listener in companion.ports
    }


def describe(svc: ServiceProcess) -> dict:
    return asdict(svc)
