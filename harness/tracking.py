"""MLflow tracking for every FuseLab run: one `Tracker` per process, runs nested by explicit parent ids.

Why a client, not MLflow's fluent API: the fluent API keeps one global active run per thread, which
breaks when a study worker opens a trial run, the pipeline opens its own runs below it, and a second
tracker (another store) lives in the same process (tests). Here every call names its run id.

Store: the config's `tracking.uri`, else `MLFLOW_TRACKING_URI`, else `sqlite:///<workdir>/mlflow.db` with
artifacts under `<workdir>/mlartifacts`. On a tracking server (`http(s)://`, `databricks`) a new experiment takes
the server's artifact root (`mlflow-artifacts:/...` when the server proxies artifacts), never a path of this
machine. MLflow's own client variables (MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN / _INSECURE_TLS /
_SERVER_CERT_PATH, MLFLOW_HTTP_REQUEST_*) reach the server through `MlflowClient`. `fuselab ui` (`ui_main`)
serves a store: the work dir's, or any database URI, as a server other machines can log to.

While an experiment runs, `ExperimentRuns` streams to MLflow as stages finish: one child run per contestant
(source, target, CLM-only, FuseLLM, ensemble, expert, merge) with its own params, created when its first
stage finishes, its training curve logged at every Trainer logging step, ended when its evaluation is logged.
"""
from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
import socket
import tempfile
import time
import traceback
import urllib.parse
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pandas as pd

if TYPE_CHECKING:  # config imports the fusion registries; keep `import harness.tracking` light
    from harness.config import ExperimentConfig

MAX_PARAM_VALUE_CHARS = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH (3.17)
MAX_KEY_CHARS = 250  # MAX_ENTITY_KEY_LENGTH
MAX_TAG_VALUE_CHARS = 8000  # MAX_TAG_VAL_LENGTH
PARAMS_PER_BATCH = 100  # MAX_PARAMS_TAGS_PER_BATCH
METRICS_PER_BATCH = 1000  # MAX_METRICS_PER_BATCH

TAG_ROLE = "fuselab.role"  # "experiment" | "method" | "study" | "trial" | "heldout" | "report"
TAG_STUDY = "fuselab.study"
TAG_CONFIG_HASH = "fuselab.config_hash"
TAG_EXPERIMENT = "fuselab.experiment"
# Which process owns a run: a RUNNING run whose process is gone (kill -9, power loss) is ended KILLED by the
# next Tracker on that host (`Tracker.close_dead_runs`).
TAG_HOST = "fuselab.host"
TAG_PID = "fuselab.pid"
TAG_PID_START = "fuselab.pid_start"  # the process's start time (clock ticks after boot): pids are reused
PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI uses to nest runs
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"

_BAD_NAME_CHARS = re.compile(r"[^/\w.\- :]")


def quiet_mlflow() -> None:
    """MLflow's INFO lines (database migrations, "View run ... at") and artifact download bars off, unless
    the user set MLFLOW_LOGGING_LEVEL / MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR; takes effect after import too."""
    import logging

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if "MLFLOW_LOGGING_LEVEL" not in os.environ:
        os.environ["MLFLOW_LOGGING_LEVEL"] = "WARNING"  # read when mlflow is first imported
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)  # and for an mlflow imported before


class _DropNotice:
    """A logging filter that drops records whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes: str):
        self.prefixes = prefixes

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_third_party() -> None:
    """Notices of the libraries FuseLab drives that say nothing to its user, off by default (our stage lines
    are the progress report): MLflow's INFO lines and artifact bars (`quiet_mlflow`); DeepSpeed's
    "Setting accelerator to CPU" warning on machines without a GPU (a filter on its logger, installed before
    DeepSpeed is imported, since DeepSpeed resets the logger's level on import); lm-eval's two warnings on
    every evaluation of a model passed already loaded (what the pipeline does on purpose). Imports nothing."""
    import logging

    quiet_mlflow()
    notices = {
        "DeepSpeed": ("Setting accelerator to CPU", "Setting ds_accelerator to"),
        "lm_eval.models.huggingface": ("`pretrained` model kwarg is not of type `str`",
                                       "Passed an already-initialized model through `pretrained`"),
    }
    for name, prefixes in notices.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) for f in logger.filters):
            logger.addFilter(_DropNotice(*prefixes))


def resolve_tracking_uri(uri: str | None, workdir: Path) -> str:
    """The store to log to: `uri` (the config's tracking.uri), else MLFLOW_TRACKING_URI, else the work dir's
    SQLite file (`default_tracking_uri`)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workdir)


def resolve_experiment_name(configured: str | None, default: str) -> str:
    """The MLflow experiment to log to: `configured` (tracking.experiment, a study's `experiment`), else
    MLFLOW_EXPERIMENT_NAME, else `default` (the experiment's or the study's name)."""
    return configured or os.environ.get("MLFLOW_EXPERIMENT_NAME") or default


class TrackingError(RuntimeError):
    """A tracking store or UI problem the user can fix (a busy port, a store that cannot be served); one line."""


def is_server_uri(uri: str) -> bool:
    """True for a tracking server (`http://`, `https://`, `databricks...`): it owns its artifact root."""
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    return scheme in ("http", "https") or scheme.startswith("databricks")


def artifact_location(uri: str, workdir: Path) -> str | None:
    """Where a new experiment of store `uri` keeps its artifacts: None on a tracking server (the server's
    default artifact root: `mlflow-artifacts:/<experiment id>` when it runs with `--serve-artifacts`, so
    artifacts travel to it over HTTP and every machine sees them); `file://<workdir>/mlartifacts` for a store
    this machine opens itself (SQLite, a file store, a database URL)."""
    if is_server_uri(uri):
        return None
    return (Path(workdir).expanduser().resolve() / "mlartifacts").as_uri()


def default_tracking_uri(workdir: Path) -> str:
    """`sqlite:///<absolute workdir>/mlflow.db` (the directory is created)."""
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{workdir / 'mlflow.db'}"


def sanitize_name(name: str) -> str:
    """A metric/param key MLflow accepts: only `[/\\w.\\- :]`, no empty, `.`/`..` or leading-`/` segments,
    at most 250 characters. `eval/bbh (3-shot)` -> `eval/bbh _3-shot_`."""
    text = _BAD_NAME_CHARS.sub("_", str(name))
    # MLflow rejects names that normalise to another path (`a//b`, `./a`, `a/..`).
    parts = [p for p in text.split("/") if p not in ("", ".", "..")]
    text = "/".join(parts) or "_"
    return text[:MAX_KEY_CHARS]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists -> `{"a.b.0.c": value}` (lists indexed like config overrides). Empty
    containers are kept as their own value so that `merges: []` still shows up."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict) and obj:
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(obj, (list, tuple)) and obj:
        for i, value in enumerate(obj):
            out.update(flatten(value, f"{prefix}.{i}" if prefix else str(i)))
    else:
        out[prefix or "value"] = obj
    return out


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (processes on this machine); used around SQLite schema creation, which
    races when two workers open a fresh database at the same moment."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URL, else None."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    return None


def _lock_for(uri: str, workdir: Path) -> Path:
    db = sqlite_path(uri)
    return db.with_name(db.name + ".lock") if db else Path(workdir) / ".tracking.lock"


class Tracker:
    """Logs to one MLflow experiment of one tracking store.

    `uri`: any MLflow tracking URI (`None` -> `resolve_tracking_uri`); `experiment`: created on
    first use with its artifacts at `artifact_location` (the server's root on a server, else
    `<workdir>/mlartifacts`); `workdir`: scratch space for artifacts.
    Runs opened with `run()` form a stack: `log_*` calls go to the innermost open run unless `run_id` is
    given.
    """

    def __init__(self, uri: str | None, experiment: str, workdir: Path):
        from mlflow.tracking import MlflowClient

        self.workdir = Path(workdir).expanduser().resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        quiet_mlflow()
        self.uri = resolve_tracking_uri(uri, self.workdir)
        if not experiment or not str(experiment).strip():
            raise ValueError("Tracker: experiment name is empty (set tracking.experiment or the experiment name)")
        self.experiment_name = str(experiment)
        self._stack: list[str] = []
        with file_lock(_lock_for(self.uri, self.workdir)):
            # The client migrates a new SQLite schema on creation; two workers doing it at once collide.
            self.client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = self._open_experiment()
        with contextlib.suppress(Exception):  # bookkeeping of earlier runs never stops this one
            self.close_dead_runs()

    def _open_experiment(self) -> str:
        """The id of experiment `experiment_name`, created when missing (artifacts: `artifact_location`)."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(self.experiment_name)
        if exp is None:
            try:
                exp_id = self.client.create_experiment(
                    self.experiment_name, artifact_location=artifact_location(self.uri, self.workdir))
            except MlflowException:  # another host created it between our two calls
                exp_id = self.client.get_experiment_by_name(self.experiment_name).experiment_id
        else:
            if exp.lifecycle_stage == "deleted":
                raise ValueError(
                    f"MLflow experiment {self.experiment_name!r} in {self.uri} is deleted; restore it "
                    f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or use another name"
                )
            exp_id = exp.experiment_id
            if is_server_uri(self.uri) and exp.artifact_location.startswith("file:"):
                warnings.warn(f"MLflow experiment {self.experiment_name!r} on {self.uri} keeps its artifacts at "
                              f"{exp.artifact_location}, a path of one client machine (created by an older "
                              "FuseLab): other machines never see them; set tracking.experiment to a new name "
                              "to get the server's artifact root", stacklevel=3)
        if exp is None or EXPERIMENT_KIND_TAG not in exp.tags:
            # Without it MLflow 3's UI opens a GenAI trace dashboard instead of the runs table.
            self.client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, "custom_model_development")
        return exp_id

    # -- runs -------------------------------------------------------------------------------------
    enabled = True  # a NullTracker's is False

    def run_status(self, run_id: str) -> str:
        """RUNNING, FINISHED, FAILED or KILLED."""
        return self.client.get_run(run_id).info.status

    @property
    def active_run_id(self) -> str | None:
        return self._stack[-1] if self._stack else None

    def _rid(self, run_id: str | None) -> str:
        rid = run_id or self.active_run_id
        if rid is None:
            raise RuntimeError("Tracker: no run is open; call inside `with tracker.run(...)` or pass run_id")
        return rid

    def start_run(self, name: str, *, tags: dict | None = None, parent_run_id: str | None = None,
                  start_time: int | None = None) -> str:
        """Create a RUNNING run (not pushed on the stack); returns its id. `run()` is the usual way.
        start_time: milliseconds since the epoch (default now)."""
        all_tags = {"mlflow.runName": name, "mlflow.source.name": "fuselab", "mlflow.user": _user(),
                    TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid()),
                    TAG_PID_START: _process_start(os.getpid()) or ""}
        all_tags.update({k: _tag_value(v) for k, v in (tags or {}).items()})
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags, start_time=start_time)
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def close_dead_runs(self) -> list[str]:
        """End KILLED this experiment's runs left RUNNING by a dead process of this host (`close_dead_runs`)."""
        return close_dead_runs(self)

    @contextmanager
    def run(self, name: str, *, nested: bool = False, tags: dict | None = None, parent_run_id: str | None = None):
        """Open a run; yields the `mlflow.entities.Run`. `nested=True` without `parent_run_id` nests under
        the innermost open run. On an exception the run ends FAILED (KILLED for Ctrl-C) with a
        `traceback.txt` artifact and the exception propagates."""
        if parent_run_id is None and nested:
            parent_run_id = self.active_run_id
            if parent_run_id is None:
                raise RuntimeError(f"Tracker.run({name!r}, nested=True): no open run to nest under")
        run_id = self.start_run(name, tags=tags, parent_run_id=parent_run_id)
        self._stack.append(run_id)
        try:
            yield self.client.get_run(run_id)
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            with contextlib.suppress(Exception):  # never mask the real error with a logging error
                self.log_text("".join(traceback.format_exception(exc)), "traceback.txt", run_id=run_id)
                self.client.set_tag(run_id, "fuselab.error", _tag_value(f"{type(exc).__name__}: {exc}"))
            with contextlib.suppress(Exception):
                self.end_run(run_id, status)
            raise
        else:
            self.end_run(run_id, "FINISHED")
        finally:
            self._stack.remove(run_id)

    # -- values -----------------------------------------------------------------------------------
    def set_tags(self, tags: dict, run_id: str | None = None) -> None:
        from mlflow.entities import RunTag

        rid = self._rid(run_id)
        items = [RunTag(sanitize_name(k) if not k.startswith("mlflow.") else k, _tag_value(v)) for k, v in tags.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(rid, tags=items[i : i + PARAMS_PER_BATCH])

    def log_params(self, params: dict, run_id: str | None = None) -> None:
        """Nested dicts are flattened to dotted keys; values are stringified and cut at 6000 characters
        (MLflow's limit). Logging an existing key again with the same value is a no-op."""
        from mlflow.entities import Param

        rid = self._rid(run_id)
        existing = self.client.get_run(rid).data.params
        items = []
        for key, value in flatten(params).items():
            key = sanitize_name(key)
            text = _param_value(value)
            if existing.get(key) == text:
                continue
            if key in existing:
                raise ValueError(
                    f"Tracker.log_params: param {key!r} of run {rid} is already {existing[key]!r}, cannot change "
                    f"it to {text!r} (MLflow params are immutable; log it as a metric or in a nested run)"
                )
            items.append(Param(key, text))
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(rid, params=items[i : i + PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, run_id: str | None = None) -> None:
        """Scalar metrics; names MLflow rejects are sanitised (`sanitize_name`); `None` values are skipped.
        A non-numeric value raises, naming the metric."""
        from mlflow.entities import Metric

        rid = self._rid(run_id)
        now = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            if value is None:
                continue
            items.append(Metric(sanitize_name(key), _as_float(key, value), now, int(step or 0)))
        for i in range(0, len(items), METRICS_PER_BATCH):
            self.client.log_batch(rid, metrics=items[i : i + METRICS_PER_BATCH])

    def log_curve(self, name: str, points: list[tuple[int, float]], run_id: str | None = None) -> None:
        """A metric history: `points` = [(step, value)], e.g. the training loss per optimizer step."""
        from mlflow.entities import Metric

        rid = self._rid(run_id)
        key = sanitize_name(name)
        now = int(time.time() * 1000)
        items = [Metric(key, _as_float(name, v), now, int(s)) for s, v in points]
        for i in range(0, len(items), METRICS_PER_BATCH):
            self.client.log_batch(rid, metrics=items[i : i + METRICS_PER_BATCH])

    # -- artifacts --------------------------------------------------------------------------------
    def log_artifact(self, path: Path, artifact_path: str | None = None, run_id: str | None = None) -> None:
        """A file or a whole folder (its contents go under `artifact_path`)."""
        rid = self._rid(run_id)
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"Tracker.log_artifact: {path} does not exist")
        if path.is_dir():
            self.client.log_artifacts(rid, str(path), artifact_path)
        else:
            self.client.log_artifact(rid, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str, run_id: str | None = None) -> None:
        rid = self._rid(run_id)
        with tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
            local = Path(tmp) / Path(artifact_file).name
            local.write_text(text)
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(rid, str(local), None if parent == "." else parent)

    def log_table(self, df: pd.DataFrame, artifact_file: str, run_id: str | None = None) -> None:
        """`df` as `<artifact_file>` (CSV, index kept when it is named) and the same table as `.md` beside it."""
        rid = self._rid(run_id)
        artifact_file = artifact_file if artifact_file.endswith(".csv") else artifact_file + ".csv"
        keep_index = any(n is not None for n in df.index.names)
        with tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
            csv = Path(tmp) / Path(artifact_file).name
            df.to_csv(csv, index=keep_index)
            csv.with_suffix(".md").write_text(df.to_markdown(index=keep_index) + "\n")
            parent = str(Path(artifact_file).parent)
            for f in (csv, csv.with_suffix(".md")):
                self.client.log_artifact(rid, str(f), None if parent == "." else parent)

    def log_config(self, cfg: "ExperimentConfig", run_id: str | None = None) -> None:
        """All config fields as dotted params, the resolved config as `config/resolved.yaml`, and tags
        (config hash, experiment name, target, sources)."""
        import yaml

        rid = self._rid(run_id)
        data = cfg.model_dump(mode="json")
        self.log_params(data, run_id=rid)
        self.log_text(yaml.safe_dump(data, sort_keys=False), "config/resolved.yaml", run_id=rid)
        self.set_tags({TAG_CONFIG_HASH: cfg.content_hash(), TAG_EXPERIMENT: cfg.name, "fuselab.target": cfg.target.label,
                       "fuselab.sources": ",".join(s.label for s in cfg.sources)}, run_id=rid)

    # -- queries ----------------------------------------------------------------------------------
    def find_runs(self, tags: dict[str, str], *, include_deleted: bool = False) -> list:
        """Runs of this experiment whose tags equal `tags`, oldest first (ties by run id)."""
        from mlflow.entities import ViewType

        clauses = [f"tags.`{k}` = '{str(v)}'" for k, v in tags.items()]
        runs = self.client.search_runs([self.experiment_id], filter_string=" and ".join(clauses), max_results=10000,
                                       run_view_type=ViewType.ALL if include_deleted else ViewType.ACTIVE_ONLY)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    def ensure_run(self, name: str, tags: dict[str, str], *, parent_run_id: str | None = None) -> str:
        """The oldest run carrying `tags`, created when there is none. Safe when several processes call
        it at once: each creates at most one, then all agree on the oldest and the extra ones are deleted."""
        with file_lock(_lock_for(self.uri, self.workdir)):
            found = self.find_runs(tags)
            if found:
                return found[0].info.run_id
            mine = self.start_run(name, tags=tags, parent_run_id=parent_run_id)
        found = self.find_runs(tags)
        chosen = found[0].info.run_id if found else mine
        if chosen != mine:  # lost a race with another host (the file lock covers this host only)
            self.client.delete_run(mine)
        return chosen


def close_dead_runs(tracker: "Tracker") -> list[str]:
    """End KILLED the runs of this experiment that are still RUNNING although the process that opened them
    on this host is gone (killed with SIGKILL, a crash of the machine); returns their ids. Runs of other
    hosts are left alone (their processes cannot be seen from here)."""
    host = socket.gethostname()
    running = tracker.client.search_runs([tracker.experiment_id], filter_string=(
        f"attributes.status = 'RUNNING' and tags.`{TAG_HOST}` = '{host}'"), max_results=10000)
    closed = []
    for run in running:
        tags = run.data.tags
        if tags.get(TAG_ROLE) == "study":
            continue  # shared by all of a study's workers, whoever created it; run_study closes it when done
        try:
            pid = int(tags.get(TAG_PID, ""))
        except ValueError:
            continue
        started = _process_start(pid)
        if started is not None and started == tags.get(TAG_PID_START, started):
            continue  # its process is alive
        tracker.client.set_tag(run.info.run_id, "fuselab.error",
                               f"process {pid} on {host} ended without closing this run (killed)")
        tracker.end_run(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    return closed


class NullTracker:
    """`Tracker`'s interface with no store (`fuselab study --no-track`): runs get the id "" and nothing is
    logged. `enabled` is False (a `Tracker`'s is True), so callers can skip work that only feeds tracking."""

    enabled = False
    uri = None
    active_run_id = None

    @contextmanager
    def run(self, name: str, **_):
        from types import SimpleNamespace

        yield SimpleNamespace(info=SimpleNamespace(run_id=""))

    def start_run(self, name: str, **_) -> str:
        return ""

    def ensure_run(self, name: str, tags: dict[str, str], **_) -> str:
        return ""

    def run_status(self, run_id: str) -> str:
        return "RUNNING"  # never ended: whoever closes a study does so once, under its lock

    def _ignore(self, *args, **kwargs) -> None:
        return None

    end_run = set_tags = log_params = log_metrics = log_curve = _ignore
    log_artifact = log_text = log_table = log_config = _ignore


class ExperimentRuns:
    """The MLflow runs of one executing experiment: its (open) parent run and one child run per contestant.

    `child(label, ...)` creates a contestant's run on first use, tagged `fuselab.model` / `fuselab.method`, with
    the contestant's params; the pipeline logs each stage's outputs to it as the stage finishes, training
    curves through `curve_sink` at every logging step, and ends it (`finish`) once its evaluation is logged.
    `close` ends the runs still open (FAILED / KILLED when the experiment raised). Child start times strictly
    increase in creation order, so the results table read back from MLflow keeps the pipeline's row order.
    `logged` records what went out live ("curve:<label>", "eval:<label>", "stage:<name>"), so the summary
    logged at the end does not repeat it.
    """

    def __init__(self, tracker: Tracker, parent_run_id: str, tags: dict | None = None):
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        self.tags = dict(tags or {})
        self.runs: dict[str, str] = {}
        self.finished: set[str] = set()
        self.logged: set[str] = set()
        self._sent: dict[str, set[str]] = {}
        self._last_start_ms = 0

    def child(self, label: str, *, method: str | None = None, params: dict | None = None,
              tags: dict | None = None) -> str:
        """The run id of contestant `label`, created (with `params` and tags) when it does not exist yet."""
        if label in self.runs:
            return self.runs[label]
        start = max(int(time.time() * 1000), self._last_start_ms + 1)
        self._last_start_ms = start
        all_tags = {**self.tags, "fuselab.model": label, **(tags or {})}
        if method is not None:
            all_tags["fuselab.method"] = method
        run_id = self.tracker.start_run(label, tags=all_tags, parent_run_id=self.parent_run_id, start_time=start)
        self.runs[label] = run_id
        if params:
            self.tracker.log_params(params, run_id=run_id)
        return run_id

    def log_new(self, run_id: str, metrics: dict[str, float]) -> None:
        """Scalar metrics not yet sent to `run_id` by this object (a value logged live is not repeated by the
        summary at the end)."""
        sent = self._sent.setdefault(run_id, set())
        fresh = {k: v for k, v in metrics.items() if k not in sent and v is not None}
        if fresh:
            self.tracker.log_metrics(fresh, run_id=run_id)
            sent.update(fresh)

    def finish(self, label: str, status: str = "FINISHED") -> None:
        if label in self.runs and label not in self.finished:
            self.finished.add(label)
            self.tracker.end_run(self.runs[label], status)

    def close(self, status: str = "FINISHED") -> None:
        """End every child run still open with `status`."""
        for label in list(self.runs):
            with contextlib.suppress(Exception):  # closing must not hide the error that made us close
                self.finish(label, status)

    def log_stage(self, stage: str, seconds: float, metrics: dict[str, float] | None = None,
                  label: str | None = None) -> None:
        """A finished stage: `stage_seconds/<stage>` on the parent run; `metrics` (e.g. its statistics) on the
        child run of contestant `label` (which must exist), else on the parent."""
        self.log_new(self.parent_run_id, {f"stage_seconds/{stage}": seconds})
        self.logged.add(f"stage:{stage}")
        if metrics:
            self.log_new(self.runs[label] if label else self.parent_run_id, metrics)

    def curve_sink(self, label: str):
        """A `fusion.trainer.train_target(on_log=...)` sink for contestant `label`'s training: at every logging
        step the child run gets `train_loss`, `train_clm_loss`, `train_fusion_loss` (nats per token),
        `train/learning_rate` and `train/grad_norm`; the parent gets `loss/<label>`, `loss/<label>/clm_loss`
        and `loss/<label>/fusion_loss` (the curves the report draws)."""
        run_id = self.runs[label]

        def sink(step: int, logs: dict) -> None:
            if "loss" not in logs:
                return  # the end-of-training summary: the stage's own outputs are logged when it finishes
            mine = {"train_loss": logs["loss"]}
            parent = {f"loss/{label}": logs["loss"]}
            for term in ("clm_loss", "fusion_loss"):
                if term in logs:
                    mine[f"train_{term}"] = logs[term]
                    parent[f"loss/{label}/{term}"] = logs[term]
            for extra in ("learning_rate", "grad_norm"):
                if isinstance(logs.get(extra), (int, float)):
                    mine[f"train/{extra}"] = logs[extra]
            self.tracker.log_metrics(mine, step=step, run_id=run_id)
            self.tracker.log_metrics(parent, step=step, run_id=self.parent_run_id)
            self.logged.add(f"curve:{label}")

        return sink


def _process_start(pid: int) -> str | None:
    """Start time of a live process (field 22 of /proc/PID/stat, clock ticks after boot); None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        if Path("/proc/self/stat").exists():
            return None
    try:  # no /proc (macOS): alive or not, start time unknown
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ""


def _user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "fuselab"


def _tag_value(value: Any) -> str:
    return str(value)[:MAX_TAG_VALUE_CHARS]


def _param_value(value: Any) -> str:
    text = "" if value is None else str(value)
    if len(text) > MAX_PARAM_VALUE_CHARS:
        suffix = "...[truncated]"
        text = text[: MAX_PARAM_VALUE_CHARS - len(suffix)] + suffix
    return text


def _as_float(key: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r}: value {value!r} ({type(value).__name__}) is not a number") from None
    return out if not math.isinf(out) else math.copysign(1.7976931348623157e308, out)


# -- `fuselab ui` ----------------------------------------------------------------------------------
