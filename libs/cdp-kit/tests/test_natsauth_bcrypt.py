"""The users' file nats-server reads (`authorization_config`, `.cdp/nats/auth.conf` under `make up`) holds
bcrypt hashes, never a password: nats-server starts without its plaintext-password warning, a client with
the right password connects, one with a wrong password does not, and a rotated user connects beside the
old one until the old one is removed."""

from __future__ import annotations

import asyncio

import nats
import nats.errors
import pytest

from cdp_kit.natsauth import OPERATOR, authorization_config, new_password
from cdp_kit.natsserver import NatsServer

PLAINTEXT_WARNING = "Plaintext passwords detected"


@pytest.fixture
def passwords() -> dict[str, str]:
    return {"profile": new_password(), "identity": new_password()}


def test_the_users_file_holds_hashes_and_never_a_password(passwords):
    operator = new_password()
    config = authorization_config(passwords, operator_password=operator, partitions=2)
    for password in (*passwords.values(), operator):
        assert password not in config
    # One hash per user, in the variant every nats-server release reads.
    assert config.count('password: "$2a$') == len(passwords) + 1


def test_a_password_bcrypt_cannot_hash_is_refused_naming_the_user():
    with pytest.raises(ValueError, match=r"'profile'.*72 bytes.*new_password"):
        authorization_config({"profile": "x" * 73}, partitions=1)


async def test_nats_server_checks_the_hashes_without_warning(tmp_path, passwords):
    operator = new_password()
    server = NatsServer(store_dir=tmp_path / "nats", config=authorization_config(passwords, operator_password=operator))
    with server:
        for user, password in (*passwords.items(), (OPERATOR, operator)):
            assert await connects(server.url, user, password)
        assert await refused(server.url, "profile", passwords["identity"])
        # The hash itself is no password.
        hashed = authorization_config({"profile": passwords["profile"]}, partitions=1).split('password: "')[1]
        assert await refused(server.url, "profile", hashed.split('"')[0])
        log = server.log_path.read_text()
    assert PLAINTEXT_WARNING not in log
    assert "Server is ready" in log


async def test_a_rotated_user_connects_beside_the_old_one_then_alone(tmp_path, passwords):
    """Make before break with hashes: the new user is added and reloaded, the old one removed and reloaded."""
    server = NatsServer(store_dir=tmp_path / "nats", config=authorization_config(passwords))
    with server:
        old = await nats.connect(server.url, user="profile", password=passwords["profile"], allow_reconnect=False)
        rotated = {**passwords, "profile.2": new_password()}
        server.reload(authorization_config(rotated))
        await until(lambda: connects(server.url, "profile.2", rotated["profile.2"]))
        await old.flush()  # the old user stays valid until it is removed
        await old.close()
        del rotated["profile"]
        server.reload(authorization_config(rotated))
        await until(lambda: refused(server.url, "profile", passwords["profile"]))
        await until(lambda: connects(server.url, "profile.2", rotated["profile.2"]))
        log = server.log_path.read_text()
    assert PLAINTEXT_WARNING not in log


async def attempt(url: str, user: str, password: str) -> str:
    """ "connected" after a round trip as `user`, "refused" when the server turns the CONNECT down, "unsure"
    when it let the CONNECT in and then closed it (one that arrives while the server reloads its users)."""
    try:
        client = await nats.connect(url, user=user, password=password, allow_reconnect=False, connect_timeout=5)
    except (nats.errors.Error, OSError):
        return "refused"
    try:
        await client.flush(timeout=2)
    except nats.errors.Error:
        return "unsure"
    finally:
        await client.close()
    return "connected"


async def connects(url: str, user: str, password: str) -> bool:
    return await attempt(url, user, password) == "connected"


async def refused(url: str, user: str, password: str) -> bool:
    return await attempt(url, user, password) == "refused"


async def until(check, timeout: float = 10.0) -> None:
    """`check()` true within `timeout` (the server reads its configuration again after SIGHUP)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "not within the time the reload takes"
        await asyncio.sleep(0.1)
