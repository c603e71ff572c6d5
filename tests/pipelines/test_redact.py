"""Issue 15: no credential of a URI in anything vtrans shows or writes. The redaction function itself, then every
output boundary without Ray: MLflow params, tags and texts on a real SQLite store, summary.json / config.yaml / stage
records, `vtrans validate`'s output, error messages, relog asking for the credentials again. The end-to-end check (a
pipeline against a real MLflow server reached with a password in its URI) is in test_tracking_outage.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main
from pipelines.redact import is_redacted, redact, redact_data, without_userinfo
from vtrans.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"
MINILM = str(CONFIGS / "minilm-rotten-tomatoes.yaml")
SECRET = "s3cret-Pa55"


@pytest.mark.parametrize(("text", "shown"), [
    ("postgresql://vt:hunter2@db:5432/mlflow", "postgresql://vt:***@db:5432/mlflow"),
    ("postgresql+psycopg2://vt:hunter2@db/mlflow", "postgresql+psycopg2://vt:***@db/mlflow"),
    ("http://user:tok@127.0.0.1:5000", "http://user:***@127.0.0.1:5000"),
    ("https://ghp_abc123@host/x", "https://***@host/x"),  # a lone user is usually a token
    ("http://u:p@ss@host:1/a@b", "http://u:***@host:1/a@b"),  # a raw "@" in the password is masked whole
    ("s3://AKIA:wJalr/x@bucket/data.csv", "s3://AKIA:***@bucket/data.csv"),
    ("s3://b/x.csv?X-Amz-Signature=abc&X-Amz-Credential=k&v=1", "s3://b/x.csv?X-Amz-Signature=***&X-Amz-Credential=***&v=1"),
    ("postgresql://db/m?user=vt&password=pw", "postgresql://db/m?user=vt&password=***"),
    ("ray://u:pw@head:10001", "ray://u:***@head:10001"),
    ("tracking.uri='http://u:pw@h:1': no server", "tracking.uri='http://u:***@h:1': no server"),
    ("MLflow at http://a:b@h:1 and http://c:d@k:2", "MLflow at http://a:***@h:1 and http://c:***@k:2"),
    # nothing to hide: unchanged
    ("sqlite:////tmp/x/mlflow.db", "sqlite:////tmp/x/mlflow.db"),
    ("http://host:5000/#/experiments/1/runs/2", "http://host:5000/#/experiments/1/runs/2"),
    ("models:/m-0123", "models:/m-0123"),
    ("prune.budget.params=0.5", "prune.budget.params=0.5"),
    ("user@example.com wrote", "user@example.com wrote"),
])
def test_redact(text: str, shown: str) -> None:
    assert redact(text) == shown
    assert redact(shown) == shown  # idempotent
    assert is_redacted(shown) == (shown != text)


def test_redact_data_and_without_userinfo() -> None:
    data = {"tracking": {"uri": "http://u:pw@h:1"}, "files": ["s3://k:sec@b/x.csv", 3], "n": None}
    assert redact_data(data) == {"tracking": {"uri": "http://u:***@h:1"}, "files": ["s3://k:***@b/x.csv", 3],
                                 "n": None}
    assert without_userinfo("http://u:pw@h:1/x") == "http://h:1/x"
    assert without_userinfo("http://h:1/x") == "http://h:1/x"


def test_tracker_records_no_credentials(tmp_path: Path, capsys) -> None:
    """Params, tags (start_run's and set_tags'), texts and the offline warning; the tracker keeps the real URI."""
    from pipelines.tracking import Tracker

    t = Tracker.connect(f"sqlite:///{tmp_path}/mlflow.db", "exp")
    leaky = f"postgresql://vt:{SECRET}@db/mlflow"
    run = t.start_run("p", params={"tracking.uri": leaky, "data.files": f'["s3://AK:{SECRET}@b/x.csv"]'},
                      tags={"where": leaky})
    t.set_tags(run, {"vtrans.error": f"ConfigError: tracking.uri={leaky!r} cannot be used"})
    t.log_text(run, f"Traceback ... {leaky}", "error.txt")
    got = t.client.get_run(run).data
    assert got.params["tracking.uri"] == "postgresql://vt:***@db/mlflow"
    assert got.params["data.files"] == '["s3://AK:***@b/x.csv"]'
    assert got.tags["where"] == "postgresql://vt:***@db/mlflow" and SECRET not in got.tags["vtrans.error"]
    text = Path(t.client.download_artifacts(run, "error.txt", str(tmp_path))).read_text()
    assert SECRET not in text and "vt:***@db" in text

    def dead(*args, **kwargs):
        raise ConnectionError(f"Max retries exceeded with url http://vt:{SECRET}@h:1/api")

    offline = Tracker(uri=f"http://vt:{SECRET}@h:1", experiment_id="0", experiment="e", retries=0)
    assert offline.call("log", dead) is None and offline.offline
    out = capsys.readouterr().out
    assert SECRET not in out and "http://vt:***@h:1" in out
    assert offline.uri == f"http://vt:{SECRET}@h:1"  # the connection keeps the real URI


def test_summary_config_and_stage_records_hold_no_credentials(tmp_path: Path) -> None:
    from pipelines.config import load_config
    from pipelines.dag import PipelineRun, _write_summary
    from pipelines.stages.base import StageResult, save_record

    uri = f"postgresql://vt:{SECRET}@db/mlflow"
    cfg = load_config(MINILM, [f"tracking.uri={uri}", "data.name=", f"data.files=[s3://AK:{SECRET}@bucket/x.csv]",
                               "data.reader=ray"])
    assert cfg.tracking.uri == uri  # the config in memory connects with the real value
    result = StageResult(stage="prune", key="k", dir=str(tmp_path / "stage"), status="ran", outputs={}, metrics={},
                         info={"source": f"s3://AK:{SECRET}@bucket/x.csv"}, started_at=0.0, finished_at=1.0,
                         wall_s=1.0, logging={"params": {"material.data.files": f"[s3://AK:{SECRET}@bucket/x.csv]"}})
    (tmp_path / "stage").mkdir()
    save_record(result)
    run = PipelineRun(name="n", run_id="r", experiment_id="1", tracking_uri=uri, results={"prune": result})
    _write_summary(tmp_path / "n", run, cfg)
    for f in (tmp_path / "n" / "summary.json", tmp_path / "n" / "config.yaml", tmp_path / "stage" / "stage.json"):
        assert SECRET not in f.read_text(), f
    assert json.loads((tmp_path / "n" / "summary.json").read_text())["tracking_uri"] == "postgresql://vt:***@db/mlflow"
    assert yaml.safe_load((tmp_path / "n" / "config.yaml").read_text())["tracking"]["uri"] == \
        "postgresql://vt:***@db/mlflow"


def test_relog_asks_for_redacted_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.relog import _store

    recorded = "http://vt:***@h:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match=r"tracking_uri='http://vt:\*\*\*@h:5000' had its credentials redacted"):
        _store(None, recorded)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://vt:other@elsewhere:1")  # another store: not taken
    with pytest.raises(ConfigError, match="--tracking-uri"):
        _store(None, recorded)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://vt:{SECRET}@h:5000")
    assert _store(None, recorded) == f"http://vt:{SECRET}@h:5000"
    assert _store("http://x:y@z:1", recorded) == "http://x:y@z:1"
    assert _store(None, "sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"


def test_cli_shows_no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """`vtrans validate` prints the config redacted; an error quoting the URI (no server there) is redacted; the
    server check sends no userinfo in the URL (urllib would try to resolve 'vt:pw@127.0.0.1' as a host)."""
    from pipelines.ray_runtime import free_port

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["validate", MINILM, f"tracking.uri=postgresql://vt:{SECRET}@db/mlflow"]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out and "uri: postgresql://vt:***@db/mlflow" in out
    port = free_port()
    assert main(["validate", "--quiet", MINILM, f"tracking.uri=http://vt:{SECRET}@127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert SECRET not in err
    assert f"tracking.uri='http://vt:***@127.0.0.1:{port}': no MLflow server answers there (" in err
    assert "Name or service not known" not in err and "nodename" not in err  # the request went to 127.0.0.1


def test_recorded_hashes_carry_no_credentials() -> None:
    """Cache keys and the config-hash tag are recorded; a hash of a short password could be reversed by trying, so
    credentials are redacted before hashing (a config without any hashes as before)."""
    import hashlib

    from pipelines.config import config_hash

    assert config_hash({"uri": "http://vt:one@h:1"}) == config_hash({"uri": "http://vt:two@h:1"})
    assert config_hash({"uri": "http://h:1"}) == hashlib.sha256(b'{"uri":"http://h:1"}').hexdigest()[:16]
