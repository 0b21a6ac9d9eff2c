"""What the scoring service's tests share: the settings of one in-process replica on the test's
nats-server, with its store and model directory in the test's temporary folder and no shipped models
(a test deploys what it scores). Keyword overrides change any setting."""

from __future__ import annotations

from typing import Any

from cdp_scoring.settings import ScoringSettings


def settings(nats_server, tmp_path, **overrides: Any) -> ScoringSettings:
    values: dict[str, Any] = dict(
        nats_url=nats_server.url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        auth_mode="none",
        partitions=2,
        shutdown_grace=1.0,
        store_url=f"sqlite:///{tmp_path / 'scoring.db'}",
        model_store=str(tmp_path / "models"),
        ship_models=False,
    )
    return ScoringSettings(**(values | overrides))
