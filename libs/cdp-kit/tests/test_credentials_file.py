"""A service's NATS credentials file as the bus watches it for a rotation (cdp_kit.natsauth.CredentialsFile):
the bus asks for a reconnect while the file holds credentials other than those its connection last sent,
not once per rewrite, so a reconnect that did not happen is asked for again."""

from __future__ import annotations

import os

from cdp_kit.natsauth import CredentialsFile, write_credentials


def test_new_credentials_are_reported_until_a_connect_has_read_them(tmp_path):
    path = tmp_path / "segmentation.json"
    write_credentials(path, "segmentation", "old-password")
    credentials = CredentialsFile(path)
    assert not credentials.changed()

    write_credentials(path, "segmentation.2", "new-password")
    assert credentials.changed()
    # The reconnect asked for did not happen (the client was between states): still reported.
    assert credentials.changed()
    assert credentials.changed()

    # A CONNECT reads the user, then the password, from the file: now the connection runs on them.
    assert (credentials.user(), credentials.password()) == ("segmentation.2", "new-password")
    assert not credentials.changed()


def test_a_rewrite_with_the_same_credentials_or_a_broken_file_asks_for_nothing(tmp_path):
    path = tmp_path / "profile.json"
    write_credentials(path, "profile", "password")
    credentials = CredentialsFile(path)
    write_credentials(path, "profile", "password")  # a Secret volume swapped with the same content
    assert not credentials.changed()

    path.write_text("{not json")
    os.utime(path, ns=(1, 1))
    assert not credentials.changed()
    assert (credentials.user(), credentials.password()) == ("profile", "password")  # the last good ones


def test_a_broken_file_after_a_rotation_keeps_asking_for_the_last_good_new_credentials(tmp_path):
    path = tmp_path / "scoring.json"
    write_credentials(path, "scoring", "old")
    credentials = CredentialsFile(path)
    write_credentials(path, "scoring.2", "new")
    assert credentials.changed()
    path.write_text("")  # half-written by a careless operator
    os.utime(path, ns=(2, 2))
    assert credentials.changed()
    # The reconnect sends the new credentials it read before the file broke, not the old ones.
    assert (credentials.user(), credentials.password()) == ("scoring.2", "new")
    assert not credentials.changed()
