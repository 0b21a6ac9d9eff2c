"""A service's NATS credentials file as the bus watches it for a rotation (cdp_kit.natsauth.CredentialsFile):
the bus asks for a reconnect while the file holds credentials other than those its connection last sent,
not once per rewrite, so a reconnect that did not happen is asked for again."""

from __future__ import annotations

import contextlib
import errno
import os

import pytest

from cdp_kit import natsauth
from cdp_kit.natsauth import CredentialsFile, read_credentials, write_credentials


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


def test_the_password_is_never_on_disk_readable_by_others(tmp_path, monkeypatch):
    """Before: the staging file was written under the umask (0644) and restricted after; a process that died
    between the two (here: the permission change never comes) left the password readable to every user of
    the machine in `<file>.new`, and a staging file so left stayed that way when written again."""
    path = tmp_path / "profile.json"
    previous = os.umask(0o022)
    try:

        def dies(*_args, **_kwargs):
            raise SystemExit("killed before the permissions changed")

        with monkeypatch.context() as patched:
            patched.setattr(os, "chmod", dies)
            patched.setattr(os, "fchmod", dies)
            with contextlib.suppress(SystemExit):
                write_credentials(path, "profile", "secret-password")
        holding = [p for p in tmp_path.iterdir() if "secret-password" in p.read_text()]
        assert all(p.stat().st_mode & 0o077 == 0 for p in holding), [oct(p.stat().st_mode) for p in holding]
        write_credentials(path, "profile", "secret-password")  # again, over whatever was left
        assert [oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()] == ["0o600"]
    finally:
        os.umask(previous)


def test_a_lookup_of_the_user_is_not_a_connect(tmp_path):
    """Anyone holding the connection may ask it for its user (the consumers' lag poll does, for the role):
    that sends nothing. Taken as sent, a lookup after a rotation's rewrite hid the rewrite for good."""
    path = tmp_path / "profile.json"
    write_credentials(path, "profile", "old-password")
    credentials = CredentialsFile(path)
    write_credentials(path, "profile.2", "new-password")

    assert credentials.user() == "profile.2"  # a lookup, no CONNECT
    assert credentials.changed()
    assert credentials.changed()

    assert (credentials.user(), credentials.password()) == ("profile.2", "new-password")  # the CONNECT
    assert not credentials.changed()


def test_a_read_that_failed_is_tried_again_at_the_next_look(tmp_path, monkeypatch):
    """A rewrite whose read failed (out of descriptors, say) was remembered as seen and never read again."""
    path = tmp_path / "identity.json"
    write_credentials(path, "identity", "old")
    credentials = CredentialsFile(path)
    write_credentials(path, "identity.2", "new")

    def no_descriptor(_path):
        raise OSError(errno.EMFILE, "Too many open files")

    with monkeypatch.context() as patched:
        patched.setattr(natsauth, "read_credentials", no_descriptor)
        assert not credentials.changed()
    assert credentials.changed()


def test_two_writers_of_one_file_at_once_each_write_a_whole_file(tmp_path, monkeypatch):
    """Both stage, then rename: here the second writes and renames between the first's write and rename.
    With one staging name for both, the second's open emptied the first's staged file and its rename took
    it, so the first's rename failed (FileNotFoundError). Each now stages under a name of its own, made
    0600 before the password is in it, and the last rename wins."""
    path = tmp_path / "profile.json"
    replace = os.replace
    staged_modes = []

    def second_writer_meanwhile(source, target):
        staged_modes.append(os.stat(source).st_mode & 0o777)
        if len(staged_modes) == 1:
            write_credentials(path, "profile.3", "third")
        replace(source, target)

    previous = os.umask(0o022)
    try:
        with monkeypatch.context() as patched:
            patched.setattr(os, "replace", second_writer_meanwhile)
            write_credentials(path, "profile.2", "second")
    finally:
        os.umask(previous)
    assert staged_modes == [0o600, 0o600]
    assert read_credentials(path) == ("profile.2", "second")  # the last rename
    assert [p.name for p in tmp_path.iterdir()] == ["profile.json"]


def test_a_write_that_fails_leaves_no_staging_file(tmp_path, monkeypatch):
    path = tmp_path / "profile.json"
    write_credentials(path, "profile", "old")

    def fails(_source, _target):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    with monkeypatch.context() as patched:
        patched.setattr(os, "replace", fails)
        with pytest.raises(OSError):
            write_credentials(path, "profile.2", "new")
    assert [p.name for p in tmp_path.iterdir()] == ["profile.json"]
    assert read_credentials(path) == ("profile", "old")
