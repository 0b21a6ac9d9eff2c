"""What logs and errors show of a server URL: never a user, password or token in it."""

from cdp_kit.urls import without_credentials


def test_users_passwords_and_tokens_are_left_out_of_every_url_of_a_list():
    assert without_credentials("nats://cdpctl:s3cret@127.0.0.1:4222") == "nats://127.0.0.1:4222"
    assert without_credentials("nats://t0ken@a:4222, tls://u:p@b:4222,nats://c:4222") == (
        "nats://a:4222, tls://b:4222, nats://c:4222"
    )
    assert without_credentials("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"
