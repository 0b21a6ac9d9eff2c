"""`cdpctl models` as a table: every quality figure of the live version whole, never cut mid-name."""

from __future__ import annotations

from click.testing import CliRunner

from cdpctl import cli


def test_the_models_table_shows_every_quality_figure_whole(bus_cli, monkeypatch):
    # fraud_risk's quality read "... precision_at_recall_0.8 0.753, threshold_at_that_r": the line was cut
    # at 80 characters, mid-name, and the last figure was lost.
    quality = {
        "auc": 0.987,
        "holdout_rows": 8000,
        "precision_at_recall_0.8": 0.753,
        "threshold_at_that_recall": 0.412,
        "trained_rows": 32000,
    }
    spec = {"version": "1.3.0", "quality": quality, "outputs": [{"score": "fraud_risk"}]}
    document = {"name": "fraud_risk", "liveVersion": "1.3.0", "versions": [{"role": "ROLE_LIVE", "spec": spec}]}

    async def listed(address, token):
        return [document]

    monkeypatch.setattr(cli, "_models", listed)
    result = CliRunner().invoke(cli.main, ["--home", str(bus_cli.home), "models", "--address", "127.0.0.1:1"])
    assert result.exit_code == 0, result.output
    text = "".join(ch for ch in result.output if ch not in " \n│")
    for name, value in (("threshold_at_that_recall", "0.412"), ("trained_rows", "32000"), ("auc", "0.987")):
        assert f"{name}{value}" in text, result.output
