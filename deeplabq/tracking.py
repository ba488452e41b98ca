"""MLflow tracking: one run per job, the resolved config as params, FAILED status on any error, KILLED once
its process is found gone (killed by SIGKILL or the OOM killer, which no ``finally`` survives)."""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket
import tempfile
import traceback
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
from hydra.core.hydra_config import HydraConfig
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from deeplabq import mlflow_view
from deeplabq.errors import ConfigError, SourceError, UserError

PARENT_ENV = "DEEPLABQ_PARENT_RUN_ID"  # set by a sweep or compare.py: its jobs become child runs
RUN_ID_FILE = "mlflow_run.json"  # in the job's output dir: lets `resume=true` continue the same run
CHECKPOINT_DIR = "checkpoints"  # in the job's output dir: the tf.train checkpoints `resume=true` continues
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves
MAX_PARAM_LENGTH = 6000
# Which process a run belongs to (see process_tags), so that a later start can tell a dead run from a live one.
HOST_TAG, PID_TAG, PID_START_TAG = "deeplabq.host", "deeplabq.pid", "deeplabq.pid_start"
ERROR_TAG = "deeplabq.error"  # why a run is FAILED or KILLED


ERROR_LOG = "error.log"  # the traceback of a run that failed on a bug (not a user error)


class RunNotFoundError(UserError, ValueError):
    """An MLflow run id that the tracking store does not know."""


class TrackingAccessError(UserError, PermissionError):
    """The tracking server refused the credentials (HTTP 401) or this user may not do this (HTTP 403)."""


class ArtifactStoreError(OSError):
    """The tracking store does not hold an artifact as this run logged it (an upload cut short). Not a user error:
    the run ends FAILED with its traceback (error.log) and the files in ``deeplabq.error``."""


CREDENTIALS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"


def is_server(tracking_uri: str) -> bool:
    return str(tracking_uri).startswith(("http://", "https://"))


def check_tracking_uri(tracking_uri: str) -> None:
    """Credentials come from the environment only: a URI carrying them would be logged and printed."""
    if is_server(tracking_uri) and urlparse(str(tracking_uri)).password is not None:
        raise ConfigError(f"tracking.tracking_uri must not carry a password (it is logged and printed): give "
                          f"{urlparse(str(tracking_uri)).hostname}'s address alone and set {CREDENTIALS} in the "
                          "environment")


@contextlib.contextmanager
def server_access(what: str):
    """Turn the tracking server's 401 and 403 into one clear line (TrackingAccessError) naming ``what``."""
    try:
        yield
    except mlflow.exceptions.MlflowException as error:
        uri, user = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_USERNAME")
        if error.error_code == "UNAUTHENTICATED":
            said = f"user '{user}' and MLFLOW_TRACKING_PASSWORD" if user else f"no credentials (set {CREDENTIALS})"
            raise TrackingAccessError(f"the tracking server {uri} refused {said} (HTTP 401) while {what}") from None
        if error.error_code == "PERMISSION_DENIED":
            raise TrackingAccessError(f"user '{user}' may not write to the tracking server {uri} (HTTP 403) while "
                                      f"{what}: the experiment's owner or the server's admin can grant EDIT") from None
        raise


def setup_mlflow(tracking_cfg) -> str:
    """Point MLflow at the configured store and return the experiment id (created if needed), with the saved
    runs view of the deploy metrics that :func:`ui_url` links to (see deeplabq.mlflow_view)."""
    check_tracking_uri(tracking_cfg.tracking_uri)
    mlflow.set_tracking_uri(tracking_cfg.tracking_uri)
    with server_access(f"setting up experiment '{tracking_cfg.experiment_name}'"):
        return _setup_experiment(tracking_cfg)


def _setup_experiment(tracking_cfg) -> str:
    client = MlflowClient()
    experiment = client.get_experiment_by_name(tracking_cfg.experiment_name)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        location = tracking_cfg.artifact_location
        if is_server(tracking_cfg.tracking_uri) and location and "://" not in str(location):
            location = None  # a path here means nothing to the server: it stores artifacts where it serves them
        if location and "://" not in str(location):
            Path(location).mkdir(parents=True, exist_ok=True)
            location = Path(location).resolve().as_uri()
        try:
            experiment_id = client.create_experiment(tracking_cfg.experiment_name, artifact_location=location)
        except mlflow.exceptions.MlflowException:
            # Another job of a parallel sweep created it first.
            experiment_id = client.get_experiment_by_name(tracking_cfg.experiment_name).experiment_id
    mlflow_view.configure_experiment(client, experiment_id)
    for line in mark_dead_runs(client, [experiment_id]):
        print(f"deeplabq: {line}")
    return experiment_id


def _process_start(pid: int) -> str | None:
    """When a process started (clock ticks since boot, /proc/<pid>/stat field 22); None if it does not exist
    or there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]  # after "pid (comm) ": fields 3, 4, ...


def process_tags() -> dict[str, str]:
    """Host, PID and (on Linux) start time of this process: a run with them is judged by its own process."""
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    start = _process_start(os.getpid())
    if start is not None:
        tags[PID_START_TAG] = start
    return tags


def _process_alive(pid: int, start: str | None) -> bool:
    if start is not None:  # recorded where /proc exists: the PID must still be the same process
        return _process_start(pid) == start
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: cannot tell, so alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def mark_dead_runs(client: MlflowClient, experiment_ids: list[str]) -> list[str]:
    """Mark KILLED (tag ``deeplabq.error`` saying why) every RUNNING run of these experiments that was started on
    this host by a process that is gone, or whose PID now belongs to a process started later; return a line
    per run. Runs of other hosts, and runs without the tags of :func:`process_tags`, are left alone."""
    host, lines = socket.gethostname(), []
    for run in client.search_runs(experiment_ids, "attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        pid = tags.get(PID_TAG, "")
        if tags.get(HOST_TAG) != host or not pid.isdigit() or int(pid) <= 0 or \
                _process_alive(int(pid), tags.get(PID_START_TAG)):
            continue
        reason = f"process {pid} on {host} is gone"
        try:
            client.set_tag(run.info.run_id, ERROR_TAG, reason)
            client.set_terminated(run.info.run_id, "KILLED")
        except mlflow.exceptions.MlflowException:  # deleted meanwhile
            continue
        lines.append(f"run {run.info.run_name} ({run.info.run_id}) marked KILLED: {reason}")
    return lines


def ui_base_url(tracking_uri: str) -> str:
    """The MLflow UI of a store: the tracking server itself, or what ``mlflow ui`` serves for a local store."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else LOCAL_UI


def browse_lines(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """How to look at a run: the UI command for a local store, the run's page and the runs table."""
    start = "" if tracking_uri.startswith(("http://", "https://")) else \
        f"mlflow ui --backend-store-uri {tracking_uri}, then "
    base = ui_base_url(tracking_uri)
    return (f"  browse: {start}{mlflow_view.run_url(base, experiment_id, run_id)}\n"
            f"  all runs, deploy columns: {mlflow_view.runs_view_url(base, experiment_id)}")


def flatten_config(cfg: DictConfig) -> dict[str, str]:
    """Dotted-key params of the resolved config (``train.learning_rate`` -> ``0.01``)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), child)
        else:
            text = json.dumps(value) if isinstance(value, list) else str(value)
            flat[prefix] = text[:MAX_PARAM_LENGTH]

    walk("", container)
    return flat


def group_choices(cfg: DictConfig) -> dict[str, str]:
    """The group options a run was composed from (from Hydra when running under it, else from values)."""
    try:
        choices = dict(HydraConfig.get().runtime.choices)
    except ValueError:
        choices = {}
    backbone = f"mnv2_dm{int(round(float(cfg.backbone.depth_multiplier) * 100)):03d}"
    return {
        "dataset": choices.get("dataset") or str(cfg.dataset.name),
        "backbone": choices.get("backbone") or backbone,
        "head": choices.get("head") or str(cfg.head.name),
        "quant": choices.get("quant") or str(cfg.quant.mode),
        "experiment": choices.get("experiment") or "none",
    }


def run_name(cfg: DictConfig, mode_parts=()) -> str:
    """Short, with what usually differs between runs first: mode and what its mode adds (``mode_parts``: the
    delay, the PTQ scheme), depth multiplier, output stride, head, dataset
    (``qat_delayed-d100-dm0.5-os16-synthetic``)."""
    if cfg.tracking.get("run_name"):
        return str(cfg.tracking.run_name)
    parts = [str(cfg.quant.mode), *mode_parts]
    parts += [f"dm{float(cfg.backbone.depth_multiplier):g}", f"os{cfg.backbone.output_stride}"]
    if cfg.head.decoder_output_stride is not None:
        parts.append("v3plus")
    parts.append(str(cfg.dataset.name))
    return "-".join(parts)


def with_run_name(cfg: DictConfig, name: str) -> DictConfig:
    """``cfg`` with ``tracking.run_name`` set to ``name`` unless the user chose one."""
    if cfg.tracking.get("run_name"):
        return cfg
    named = cfg.copy()
    named.tracking.run_name = name
    return named


def command_line_overrides() -> list[str]:
    """The overrides the user typed for this job (``key=value``), when running under Hydra."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not under @hydra.main (tests compose configs directly)
        return []


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "asimddp", "i8mm")


def cpu_features() -> str:
    """The CPU flags int8 and float latency depend on (XNNPACK's int8 is ~8x float with VNNI, ~1.3x without),
    so every latency a run logs says which CPU it came from; "unknown" off Linux."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = set(" ".join(line.split(":", 1)[1] for line in text.splitlines()
                         if line.startswith(("flags", "Features")) and ":" in line).split())
    return ",".join(f for f in CPU_FLAGS if f in flags) or "none"


def source_tags() -> dict[str, str]:
    """MLflow's source tags (name, git commit, branch, repo) of the job's entry point (``train.py`` ...) rather than of
    the process running it: under joblib or submitit that is a worker whose ``sys.argv[0]`` is the launcher's own
    file, outside the repository. Empty when not under Hydra (MLflow's own then stand)."""
    from mlflow.utils import git_utils, mlflow_tags

    try:
        entry = Path(os.environ.get("DEEPLABQ_ROOT", "")) / f"{HydraConfig.get().job.name}.py"
    except ValueError:
        return {}
    if not entry.is_file():
        return {}
    found = {mlflow_tags.MLFLOW_SOURCE_NAME: entry.name, mlflow_tags.MLFLOW_GIT_COMMIT: git_utils.get_git_commit(entry),
             mlflow_tags.MLFLOW_GIT_BRANCH: git_utils.get_git_branch(entry),
             mlflow_tags.MLFLOW_GIT_REPO_URL: git_utils.get_git_repo_url(entry)}
    return {k: str(v) for k, v in found.items() if v is not None}


def run_tags(cfg: DictConfig, parent_run_id: str | None = None) -> dict[str, str]:
    c = group_choices(cfg)
    tags = {f"deeplabq.{k}": v for k, v in c.items()}
    tags.update(
        {
            "deeplabq.task": str(cfg.get("task", "train")),
            "deeplabq.quant_mode": str(cfg.quant.mode),
            "deeplabq.depth_multiplier": str(cfg.backbone.depth_multiplier),
            "deeplabq.output_stride": str(cfg.backbone.output_stride),
            "deeplabq.cpu_features": cpu_features(),
        }
    )
    tags.update(process_tags())
    tags.update(source_tags())
    parent = parent_run_id or os.environ.get(PARENT_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    tags.update({str(k): str(v) for k, v in (cfg.tracking.get("tags") or {}).items()})
    return tags


def _existing_run_id(output_dir: Path) -> str | None:
    path = output_dir / RUN_ID_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())["run_id"]


@contextlib.contextmanager
def tracked_run(cfg: DictConfig, output_dir: Path, *, resume: bool = False, parent_run_id: str | None = None,
                name: str | None = None):
    """Start (or resume) the MLflow run of a job; mark it FAILED if the body raises.

    On a fresh run logs the flattened resolved config as params, the resolved config file and tags;
    ``parent_run_id`` nests it under another run (evaluate.py and convert.py under the run of their source);
    ``name`` is the run's name (default: :func:`run_name`).
    """
    experiment_id = setup_mlflow(cfg.tracking)
    output_dir.mkdir(parents=True, exist_ok=True)
    run_id = _existing_run_id(output_dir) if resume else None
    with server_access(f"starting a run in experiment '{cfg.tracking.experiment_name}'"):
        if run_id is not None:
            check_run_exists(run_id)
            # this process's tags before the run is RUNNING again: another job's mark_dead_runs never sees the old PID
            client = MlflowClient()
            for key, value in process_tags().items():
                client.set_tag(run_id, key, value)
            if ERROR_TAG in client.get_run(run_id).data.tags:
                client.delete_tag(run_id, ERROR_TAG)  # the interruption's: the run is live again
        fresh = run_id is None
        run = mlflow.start_run(
            run_id=run_id,
            experiment_id=None if run_id else experiment_id,
            run_name=(name or run_name(cfg)) if fresh else None,
            tags=run_tags(cfg, parent_run_id) if fresh else None,
        )
    try:
        if fresh:
            (output_dir / RUN_ID_FILE).write_text(json.dumps({"run_id": run.info.run_id}))
            mlflow.log_params(flatten_config(cfg))
            with tempfile.TemporaryDirectory() as tmp:
                config_path = Path(tmp) / "config.yaml"
                config_path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
                log_artifact(config_path)
        yield run
        verify_artifacts(run.info.run_id)
    except BaseException as error:
        _LOGGED.pop(run.info.run_id, None)
        with contextlib.suppress(Exception):
            mlflow.set_tag(ERROR_TAG, f"{type(error).__name__}: {error}"[:5000])
            if isinstance(error, Exception) and not isinstance(error, UserError):  # a bug: keep its traceback
                mlflow.log_text("".join(traceback.format_exception(error)), ERROR_LOG)
        mlflow.end_run(status="FAILED" if not isinstance(error, KeyboardInterrupt) else "KILLED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


_LOGGED: dict[str, dict[str, int]] = {}  # run id -> {artifact path: size in bytes} of what this process logged


def log_artifact(local_path: str | Path, artifact_path: str | None = None) -> None:
    """``mlflow.log_artifact`` into the active run, remembering the file's size for :func:`verify_artifacts`."""
    local_path = Path(local_path)
    size = local_path.stat().st_size
    mlflow.log_artifact(str(local_path), artifact_path)
    logged = _LOGGED.setdefault(mlflow.active_run().info.run_id, {})
    logged[posixpath.join(artifact_path or "", local_path.name)] = size


def verify_artifacts(run_id: str) -> None:
    """Check that the store holds every artifact this process logged to the run, at its full size, before the run
    may be FINISHED: an upload cut short (a server restart, a full disk) fails the run instead of leaving a
    truncated file in a run that looks complete. One listing per folder."""
    logged = _LOGGED.pop(run_id, {})
    stored: dict[str, int | None] = {}
    with server_access("checking the run's artifacts"):
        for folder in sorted({posixpath.dirname(path) for path in logged}):
            stored.update({a.path: a.file_size for a in MlflowClient().list_artifacts(run_id, folder or None)})
    wrong = [f"{path} ({'missing' if path not in stored else f'{stored[path]} bytes'}, logged {size})"
             for path, size in sorted(logged.items()) if stored.get(path) != size]
    if wrong:
        raise ArtifactStoreError(f"the tracking store {mlflow.get_tracking_uri()} does not hold {len(wrong)} of the "
                                 f"{len(logged)} artifacts this run logged as logged: {', '.join(wrong[:5])}")


def check_run_exists(run_id: str) -> None:
    try:
        MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as error:
        raise RunNotFoundError(
            f"MLflow run '{run_id}' does not exist in the tracking store {mlflow.get_tracking_uri()}"
        ) from error


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def artifact_cache_dir() -> Path:
    """Where the artifacts of runs on a tracking server are downloaded to: ``$XDG_CACHE_HOME/deeplabq/runs``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deeplabq" / "runs"


def run_artifact_dir(run_id: str) -> Path:
    """Local directory of a run's artifacts: the store's own folder for a file store; for any other (a tracking
    server's ``mlflow-artifacts:``, S3 ...) a download of all of them into :func:`artifact_cache_dir`, made once
    (into a temp folder renamed when complete)."""
    uri = MlflowClient().get_run(run_id).info.artifact_uri
    if uri.startswith("file:"):
        return Path(unquote(urlparse(uri).path))
    cached = artifact_cache_dir() / run_id
    if not cached.is_dir():
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cached.parent, prefix=f".{run_id}-", ignore_cleanup_errors=True) as tmp:
            with server_access(f"downloading the artifacts of run {run_id}"):
                mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=tmp)
            with contextlib.suppress(OSError):  # another process finished the same download first
                Path(tmp).rename(cached)
    if not cached.is_dir():
        raise SourceError(f"could not download the artifacts of run {run_id} from {uri}")
    return cached
