"""Fixtures the kit's top-level tests share."""

from __future__ import annotations

import pytest

from cdp_kit.natsauth import OPERATOR, PROVISIONER, ROLES, authorization_config, new_password, write_credentials
from cdp_kit.natsserver import NatsServer


@pytest.fixture
def secured(tmp_path):
    """A nats-server with a user per service and the provisioner's (credentials in `tmp_path/<name>.json`),
    made for 2 partitions; `operator_url` connects as cdpctl's operator."""
    passwords = {name: new_password() for name in [*ROLES, PROVISIONER]}
    for name, password in passwords.items():
        write_credentials(tmp_path / f"{name}.json", name, password)
    operator = new_password()
    config = authorization_config(passwords, operator_password=operator, partitions=2)
    with NatsServer(store_dir=tmp_path / "nats", config=config) as server:
        server.operator_url = server.url.replace("nats://", f"nats://{OPERATOR}:{operator}@", 1)  # type: ignore[attr-defined]
        server.secrets = tmp_path  # type: ignore[attr-defined]
        yield server
