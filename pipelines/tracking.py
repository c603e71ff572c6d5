"""MLflow tracking of a pipeline run: one parent run, a nested child run per stage (RAY-MLFLOW.md).

```python
tracker = Tracker.connect(cfg.tracking)             # checks the store and the experiment; no Ray involved
parent = tracker.start_run(cfg.name, params=flatten(cfg), tags={...})
child = tracker.start_run("prune", parent_run_id=parent, params={...})
tracker.log_history(child, history)                 # training curves: one metric per key, step = training step
tracker.log_artifacts(child, "runs/.../output", "masks")
tracker.end_run(child)                              # FINISHED, or end_run(child, "FAILED")
```

Everything goes through an explicit :class:`mlflow.MlflowClient` bound to an absolute tracking URI, never through
MLflow's process-global "active run": stage tasks run in Ray worker processes whose working directory is a session
folder, where MLflow's default relative ``sqlite:///mlflow.db`` would point somewhere else (and be deleted).

The embedded default (no ``tracking.uri``, no ``MLFLOW_TRACKING_URI``) is ``sqlite:///<cwd>/mlflow.db`` with artifacts
under ``<cwd>/mlartifacts``: browse it with ``mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.redact import redact, without_userinfo
from vtrans.errors import ConfigError

#: MLflow's per-request limits of ``log_batch``.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_LENGTH = 6000

#: Tags set by vtrans on its runs.
TAG_STAGE = "vtrans.stage"
TAG_STATUS = "vtrans.status"  # ran | cached
TAG_KEY = "vtrans.key"
TAG_SOURCE_RUN = "vtrans.source_run_id"
TAG_MODEL_URI = "vtrans.model_uri"
TAG_PIPELINE = "vtrans.pipeline"
TAG_LOGGED = "vtrans.logged"  # "complete" on a pipeline's parent run once it and its stages are all in MLflow
#: The MLflow UI's experiment kind: vtrans's experiments open as model-training experiments (MLflow 3 shows an
#: untagged one in its GenAI view); an experiment tagged otherwise by its owner is left alone.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")

# MLflow prints tqdm bars for artifact downloads; in log files they are noise.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow's HTTP client retries a dead server for minutes per request (7 retries, backoff factor 2, 120 s timeout);
# vtrans retries each write itself (Tracker.retries) and then goes on without tracking.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
# MLflow's client prints "View run ... at: <tracking URI>" when a run ends, credentials included; vtrans prints its own
# (redacted) link
os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"

#: Substrings of the errors of a tracking server or database that does not answer (or answers 5xx).
UNREACHABLE = ("Max retries exceeded", "Connection refused", "ConnectionError", "Connection aborted", "timed out",
               "Read timed out", "RemoteDisconnected", "Temporary failure in name resolution", "database is locked",
               "error code 502", "error code 503", "error code 504", "TEMPORARILY_UNAVAILABLE")


def unreachable(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it was raised from) says the tracking store could not be reached, as opposed to
    a request it refused (a programming error, which must surface)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, (ConnectionError, TimeoutError)) or any(m in str(e) for m in UNREACHABLE):
            return True
        if type(e).__module__.startswith(("requests", "urllib3")) and "Error" in type(e).__name__:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def resolve_tracking_uri(uri: str | None, cwd: Path | None = None) -> str:
    """The tracking URI to use: ``uri`` (the config), else ``$MLFLOW_TRACKING_URI``, else the embedded SQLite store
    ``sqlite:///<cwd>/mlflow.db``. A relative ``sqlite:///file.db`` is made absolute against ``cwd``; a bare path
    (``runs/mlflow.db``) is read as an SQLite file. File stores (``./mlruns``, ``file:``) are refused."""
    cwd = (cwd or Path.cwd()).resolve()
    key = "tracking.uri"
    if uri is None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or None
        key = "MLFLOW_TRACKING_URI"
    if uri is None:
        return f"sqlite:///{cwd / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path.startswith("/"):
            return uri
        if not path or path.startswith(":memory:"):
            raise ConfigError(f"{key} must name an SQLite file, got {redact(uri)!r}")
        return f"sqlite:///{(cwd / path).resolve()}"
    if uri.startswith(("http://", "https://", "databricks", "postgresql", "mysql", "mssql")):
        return uri
    if uri.startswith("file:") or "://" not in uri and (uri.endswith("mlruns") or Path(uri).is_dir()):
        raise ConfigError(f"{key}={redact(uri)!r} is an MLflow file store, which MLflow 3 refuses; use an SQLite file "
                          f"(sqlite:///path/mlflow.db) or a server (http://host:5000)")
    if "://" not in uri:
        return f"sqlite:///{(cwd / uri).resolve()}"
    raise ConfigError(f"{key} must be sqlite:///..., http(s)://... or a database URL, got {redact(uri)!r}")


def default_artifact_location(tracking_uri: str, artifact_location: str | None) -> str | None:
    """Artifact root of a new experiment: the config's, or ``<folder of the SQLite file>/mlartifacts`` for a local
    SQLite store (a server chooses its own)."""
    if artifact_location is not None:
        if "://" in artifact_location:
            return artifact_location
        return Path(artifact_location).expanduser().resolve().as_uri()
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def ui_hint(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where to look at a run: its URL on a server, or the ``mlflow ui`` command for a local store (credentials
    in the URI redacted)."""
    tracking_uri = redact(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"mlflow ui --backend-store-uri {tracking_uri}  (then open experiment {experiment_id}, run {run_id})"


def _clip(value: str) -> str:
    return value if len(value) <= MAX_PARAM_LENGTH else value[: MAX_PARAM_LENGTH - 3] + "..."


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclass
class Tracker:
    """An MLflow client bound to one tracking URI and experiment; picklable (it travels into Ray stage tasks).

    Every write is retried with backoff (``retries`` times: 1, 2, 4, ... s) when the store does not answer; after
    that the tracker goes **offline** for the rest of the process: writes return None at once and the work goes on.
    Nothing is lost: every stage's outputs, metrics and curves are on the output root, and ``vtrans relog`` uploads
    what is missing once the store is back (:mod:`pipelines.relog`).

    ``uri`` is the real URI (it connects); every param, tag and message goes through :func:`pipelines.redact.redact`
    (:attr:`shown` is the URI as printed)."""

    uri: str
    experiment_id: str
    experiment: str
    retries: int = 3
    offline: bool = False

    @property
    def shown(self) -> str:
        """The URI with its credentials masked: what messages and records show."""
        return redact(self.uri)

    @property
    def online(self) -> bool:
        return not self.offline

    def call(self, what: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, retried with backoff while the store does not answer; None once offline."""
        if self.offline:
            return None
        delay = 1.0
        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if not unreachable(e):
                    raise
                if attempt == self.retries:
                    self.offline = True
                    first = redact((str(e).strip().splitlines() or [type(e).__name__])[0])[:300]
                    print(f"warning: MLflow at {self.shown} does not answer ({what}: {first}); going on without "
                          f"tracking: every output stays on the output root, and `vtrans relog` uploads what is "
                          f"missing once it is back", flush=True)
                    return None
                time.sleep(delay)
                delay *= 2
        return None

    @classmethod
    def connect(cls, uri: str | None, experiment: str, artifact_location: str | None = None) -> Tracker:
        """Open the store (creating the SQLite file and the experiment if needed). An unreachable server or an
        unusable store is a :class:`ConfigError` naming the URI."""
        resolved = resolve_tracking_uri(uri)
        if resolved.startswith(("http://", "https://")):
            check_server(resolved)
        client = _client(resolved)
        try:
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                exp_id = client.create_experiment(experiment, default_artifact_location(resolved, artifact_location),
                                                  tags=dict([EXPERIMENT_KIND]))
            elif exp.lifecycle_stage == "deleted":
                raise ConfigError(f"tracking.experiment={experiment!r} is deleted in {redact(resolved)}; restore it "
                                  f"(mlflow experiments restore) or choose another name")
            else:
                exp_id = exp.experiment_id
                if EXPERIMENT_KIND[0] not in exp.tags:
                    client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - any store failure is a configuration problem for the user
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(redact(f"tracking.uri={resolved!r} cannot be used: {first}")) from None
        return cls(uri=resolved, experiment_id=exp_id, experiment=experiment)

    @property
    def client(self):
        return _client(self.uri)

    def start_run(self, name: str, parent_run_id: str | None = None, params: Mapping[str, str] | None = None,
                  tags: Mapping[str, str] | None = None) -> str | None:
        """Create a run (nested under ``parent_run_id``) and log its params; returns the run id (None offline)."""
        all_tags = {k: _clip(redact(str(v))) for k, v in (tags or {}).items()}
        if parent_run_id is not None:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.call("create run", self.client.create_run, self.experiment_id, run_name=name, tags=all_tags)
        if run is None:
            return None
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _clip(redact(str(v)))) for k, v in params.items()]
        for chunk in _chunks(items, MAX_PARAMS_PER_BATCH):
            if run_id is not None:
                self.call("log params", self.client.log_batch, run_id, params=chunk)

    def set_tags(self, run_id: str | None, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, _clip(redact(str(v)))) for k, v in tags.items()]
        for chunk in _chunks(items, MAX_PARAMS_PER_BATCH):
            if run_id is not None:
                self.call("set tags", self.client.log_batch, run_id, tags=chunk)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        """Scalar metrics at one step (non-numbers are skipped)."""
        self.log_history(run_id, [dict(metrics, step=step)])

    def log_history(self, run_id: str, history: Iterable[Mapping[str, Any]], prefix: str = "") -> int:
        """A training curve: every numeric key of every entry at the entry's ``step``; returns the metric count."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for i, entry in enumerate(history):
            step = int(entry.get("step", i))
            for k, v in entry.items():
                if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                items.append(Metric(prefix + k, float(v), now, step))
        for chunk in _chunks(items, MAX_METRICS_PER_BATCH):
            if run_id is not None:
                self.call("log metrics", self.client.log_batch, run_id, metrics=chunk)
        return len(items)

    def log_datasets(self, run_ids: Iterable[str | None], datasets: Iterable[tuple[str, str, str]]) -> None:
        """Each ``(parquet file, name, context)`` as a dataset input of every run of ``run_ids`` (MLflow's
        ``log_input``: the runs' Datasets column): its ``text`` and, when present, ``label`` columns, the file as the
        source, the context (``training``, ``testing``, ``calibration``) as the input's tag."""
        datasets = list(datasets)
        run_ids = [r for r in run_ids if r is not None]
        if not datasets or not run_ids:
            return

        def build():
            import mlflow.data
            import pyarrow.parquet as pq
            from mlflow.entities import DatasetInput, InputTag

            inputs = []
            for path, name, context in datasets:
                columns = [c for c in ("text", "label") if c in pq.read_schema(path).names]
                df = pq.read_table(path, columns=columns).to_pandas()
                ds = mlflow.data.from_pandas(df, source=str(path), name=name,
                                             targets="label" if "label" in columns else None)
                inputs.append(DatasetInput(ds._to_mlflow_entity(), [InputTag("mlflow.data.context", context)]))
            return inputs

        inputs = self.call("read datasets", build)
        for run_id in run_ids if inputs else []:
            self.call("log datasets", self.client.log_inputs, run_id, datasets=inputs)

    def link_model(self, run_id: str | None, model_uri: str | None) -> None:
        """Record the logged model ``models:/m-...`` as an output of ``run_id`` too (the pipeline's parent run: the
        UI's "Logged models" of the run that produced it through a stage)."""
        if run_id is None or not model_uri or not model_uri.startswith("models:/m-"):
            return
        from mlflow.entities import LoggedModelOutput

        self.call("link model", self.client.log_outputs, run_id, [LoggedModelOutput(model_uri[len("models:/"):], 0)])

    def log_artifacts(self, run_id: str | None, local: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file or a directory (recursively) as run artifacts."""
        local = Path(local)
        if run_id is None:
            return
        if local.is_dir():
            self.call("log artifacts", self.client.log_artifacts, run_id, str(local), artifact_path)
        else:
            self.call("log artifact", self.client.log_artifact, run_id, str(local), artifact_path)

    def log_text(self, run_id: str | None, text: str, artifact_file: str) -> None:
        if run_id is not None:
            self.call("log text", self.client.log_text, run_id, redact(text), artifact_file)

    def end_run(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id is not None:
            self.call("end run", self.client.set_terminated, run_id, status=status)

    def run_exists(self, run_id: str | None) -> bool:
        if not run_id or self.offline:
            return False
        try:
            self.client.get_run(run_id)
            return True
        except Exception:  # noqa: BLE001 - "not found" has several exception types across stores
            return False

    def model_exists(self, model_uri: str | None) -> bool:
        """Whether a ``models:/m-...`` logged model exists in this store."""
        if not model_uri or not model_uri.startswith("models:/m-") or self.offline:
            return False
        try:
            self.client.get_logged_model(model_uri[len("models:/"):])
            return True
        except Exception:  # noqa: BLE001
            return False


def check_server(uri: str, timeout: float = 10.0) -> None:
    """Fail fast on a server that does not answer (MLflow's own client retries for minutes). ``/health`` needs no
    credentials: they are left out of the request, and out of the message (redacted)."""
    import urllib.error
    import urllib.request

    shown = redact(uri)
    try:
        with urllib.request.urlopen(f"{without_userinfo(uri).rstrip('/')}/health", timeout=timeout) as r:
            if r.status != 200:
                raise ConfigError(f"tracking.uri={shown!r}: the MLflow server answered /health with HTTP {r.status}")
    except urllib.error.HTTPError as e:
        raise ConfigError(f"tracking.uri={shown!r}: the MLflow server answered /health with HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = redact(str(getattr(e, "reason", e)))
        raise ConfigError(f"tracking.uri={shown!r}: no MLflow server answers there ({reason})") from None


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


__all__ = ["Tracker", "check_server", "default_artifact_location", "resolve_tracking_uri", "ui_hint"]


@contextlib.contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-global tracking URI set to ``uri`` for the block (what its fluent API,
    ``mlflow.pyfunc.log_model`` and the SQL registry's source lookup read), then put back exactly as it was:
    ``mlflow.set_tracking_uri`` also writes ``$MLFLOW_TRACKING_URI``, so without this a later pipeline in the same
    process - one whose config names no store - would log into this run's store."""
    import mlflow
    from mlflow.tracking._tracking_service import utils  # Ray 2.60 / MLflow 3.17 pinned: the explicitly set URI

    env, explicit = os.environ.get("MLFLOW_TRACKING_URI"), utils._tracking_uri
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(explicit)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env
