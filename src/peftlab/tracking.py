"""MLflow mirror of the result records, with a durable queue for when the store is away.

Files drive the DAG; MLflow mirrors them. Each job (finetune, evaluate, the analyses) becomes
one MLflow run: params, metric curves (with their steps), tags (``model``, ``task``,
``method``, ``variant``, ``seed``, ``rule``, ``git_commit``, ``config_hash``, ``status``)
and the record as an artifact (plus the stored weights when ``mlflow.log_weights`` is on).

Never losing a run:

1. **Disk first.** The job writes its record, then ``log_record`` writes a queue entry
   ``<results>/mlflow_pending/<rule>__<model>__<task>__<method>__<variant>__<seed>.json``
   (atomically, one per run identity: a rerun overwrites its own entry) *before* talking to
   MLflow, and removes it once the run is in the store. A store that is unreachable, locked
   past the timeout, or a job killed mid-logging leaves the entry behind; the job itself
   never fails because of tracking.
2. **Synced later** by whoever next reaches the store: every later job that logs
   successfully also syncs a few pending entries, the ``aggregate`` rule syncs them all, and
   ``python -m peftlab sync-mlflow`` does it by hand.
3. **Replace, not pile up.** A run's identity is (model, task, method, variant, seed, rule);
   logging it again moves the earlier MLflow run of that identity to MLflow's *deleted*
   lifecycle stage (hidden from searches and the UI, restorable until ``mlflow gc``), so
   the store shows exactly one run per identity, the latest. An entry whose record is
   already in the store unchanged (same record hash) is not logged twice.
4. **Concurrency.** Writers to a SQLite store (the embedded default) are serialised by a
   file lock beside the database, so parallel jobs never hit "database is locked"; a lock
   error that still slips through (another program holding the database) is retried.
   A job holds a lock on its own queue entry while it logs it, so a sync by another
   process skips that entry instead of racing the job for it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .io import fingerprint, read_json, write_json

log = logging.getLogger(__name__)

IDENTITY_TAGS = ("model", "task", "method", "variant", "seed")
# the extra tag of a tuning trial's queue entry: its selection's identity (JSON), resolved to
# mlflow.parentRunId when the entry is logged
PARENT_TAG = "peftlab.parent"
PENDING = "mlflow_pending"
# bounds so an unreachable server costs seconds, not MLflow's default minutes of retries
PROBE_TIMEOUT_S = 5.0
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
LOCK_TIMEOUT_S = 900
LOCKED_RETRIES = 5
SYNC_AFTER_LOG = 20  # pending entries a successful job syncs on its way out


def default_store(results_dir: str | Path) -> str:
    """The embedded default: a SQLite file in the results folder (absolute path)."""
    return str(Path(results_dir).resolve() / "mlflow.db")


def tracking_uri(mlflow_config: dict) -> str:
    """``MLFLOW_TRACKING_URI`` > config's ``mlflow.tracking_uri`` > sqlite ``default_store``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if mlflow_config.get("tracking_uri"):
        return mlflow_config["tracking_uri"]
    return f"sqlite:///{mlflow_config['default_store']}"


def display_uri(uri: str) -> str:
    """The URI without credentials (for logs and the report)."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        return parts._replace(netloc=netloc).geturl()
    return uri


def pending_dir(mlflow_config: dict) -> Path:
    """The queue folder: ``<results>/mlflow_pending`` (beside the default store)."""
    return Path(mlflow_config["default_store"]).parent / PENDING


# ---------------------------------------------------------------------------------------
# Record -> MLflow content
# ---------------------------------------------------------------------------------------


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _metrics_of(record: dict) -> list[tuple[str, float, int]]:
    """(key, value, step) triples: curves for finetune (and subspace runs), test metrics for
    evaluate, the statistics of the analyses (d90: score per d with step = d). A failed
    run keeps what it measured before failing (its curves so far)."""
    rows: list[tuple[str, Any, int]] = []
    rule = record["rule"]
    if rule == "gradient_sparsity":
        summary = record.get("summary") or {}
        for k in ("top1_share", "gini", "jaccard", "jaccard_chance", "sift_pafi_overlap", "overlap_chance"):
            rows.append((k, summary.get(k), 0))
        shares = ((record.get("curves") or {}).get("all") or {}).get("per_batch", [])
        for p, share in zip(summary.get("percents", []), shares, strict=False):
            rows.append((f"top_share_permille_{round(p * 10)}", share, 0))
    elif rule == "d90":
        for d, score in (record.get("scores") or {}).items():
            rows.append(("test_score_by_d", score, int(d)))
        for k in ("d90", "threshold", "reference", "d90_fraction_of_D"):
            rows.append((k, record.get(k), 0))
    elif rule == "tune":  # the grid's mean validation score by trial, and the chosen one
        for row in record.get("grid") or []:
            rows.append(("validation_by_trial", row.get("mean"), row["trial"]))
        rows.append(("chosen_validation", (record.get("chosen") or {}).get("validation"), 0))
        rows.append(("chosen_trial", (record.get("chosen") or {}).get("trial"), 0))
    elif rule in ("finetune", "intrinsic_dimension"):
        if rule == "intrinsic_dimension":
            for k, v in (record.get("test") or {}).items():
                rows.append((f"test_{k}", v, 0))
            rows.append(("d", record.get("d"), 0))
        curves = record.get("curves") or {}
        for step, loss in curves.get("train_loss", []):
            rows.append(("train_loss", loss, step))
        for step, lr in curves.get("learning_rate", []):
            rows.append(("learning_rate", lr, step))
        for point in curves.get("validation", []):
            for k, v in point.items():
                if k != "step":
                    rows.append((f"validation_{k}", v, point["step"]))
        for k in ("trainable_params", "trainable_percent", "train_time_s", "stored_size_bytes", "steps"):
            rows.append((k, record.get(k), 0))
        for k, v in (record.get("peak_memory") or {}).items():
            rows.append((f"peak_{k}", v, 0))
    else:
        for k, v in (record.get("metrics") or {}).items():
            rows.append((f"test_{k}", v, 0))
        for name, part in (record.get("test_sets") or {}).items():  # each test set's own metrics
            for k, v in part["metrics"].items():
                rows.append((f"test_{name}_{k}", v, 0))
        for k in ("eval_time_s", "examples_per_s"):
            rows.append((k, record.get(k), 0))
        for k, v in (record.get("inference") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                rows.append((f"inference_{k}", v, 0))
    out = []
    for k, v, s in rows:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf"):
            out.append((k, float(v), int(s)))
    return out


def _params_of(record: dict) -> dict[str, Any]:
    rule = record["rule"]
    if rule == "finetune":
        return _flatten({k: record[k] for k in ("config", "task", "model") if isinstance(record.get(k), dict)})
    if rule == "evaluate":
        return {k: record[k] for k in ("split", "n_examples") if k in record}
    return _flatten(record.get("params") or {})


def identity(record: dict) -> dict[str, str]:
    """The run's identity tags; analyses carry their kind in ``method`` (tags stay comparable);
    a tuning trial adds its grid point's index."""
    out = {k: str(record["run"].get(k, "-")) for k in IDENTITY_TAGS} | {"rule": record["rule"]}
    return out | ({"trial": str(record["run"]["trial"])} if "trial" in record["run"] else {})


def config_hash(record: dict) -> str:
    """The record's own ``config_hash``, else a hash of its settings (analyses)."""
    if record.get("config_hash"):
        return str(record["config_hash"])
    return fingerprint(record["rule"], record.get("params") or record.get("config") or {},
                       {k: v for k, v in identity(record).items() if k not in ("seed",)})


def _run_name(ident: dict[str, str]) -> str:
    where = "{model}/{task}/{method}/{variant}".format(**ident)
    if ident["rule"] == "tune":
        return f"{where} [tuning]"
    trial = f"/trial{ident['trial']}" if "trial" in ident else ""
    return f"{where}{trial}/seed{ident['seed']} [{ident['rule']}]"


def run_tags(record: dict, record_sha: str, extra: dict | None = None) -> dict[str, str]:
    ident = identity(record)
    failure = record.get("failure") or {}
    tags = ident | {
        "git_commit": str(record.get("git_commit") or "unknown"),
        "config_hash": config_hash(record),
        "status": str(record.get("status", "")),
        "record_sha256": record_sha,
        "mlflow.runName": _run_name(ident),
    }
    for key in ("device_name", "precision"):  # what the run's times and memory were measured on, and how
        if record.get(key):
            tags[key] = str(record[key])
    if failure:
        tags["failure_reason"] = str(failure.get("reason", ""))[:5000]
        if failure.get("step") is not None:
            tags["failure_step"] = str(failure["step"])
    tags.update({k: str(v) for k, v in (extra or {}).items() if v is not None})
    return tags


# ---------------------------------------------------------------------------------------
# The queue
# ---------------------------------------------------------------------------------------


def _entry_name(ident: dict[str, str]) -> str:
    return "__".join(ident[k] for k in ("rule", *IDENTITY_TAGS, *(["trial"] if "trial" in ident else []))) + ".json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def enqueue(record: dict, record_path: str | Path, mlflow_config: dict, artifacts=(), tags=None) -> Path:
    """Write the durable queue entry of one record (before any MLflow call)."""
    record_path = Path(record_path).resolve()
    entry = {
        "identity": identity(record),
        "record_path": str(record_path),
        "record_sha256": _sha256(record_path),
        "artifacts": [str(Path(a).resolve()) for a in artifacts],
        "tags": dict(tags or {}),
        "tracking_uri": tracking_uri(mlflow_config),
        "experiment": mlflow_config.get("experiment", "peftlab"),
        "queued_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    path = pending_dir(mlflow_config) / _entry_name(entry["identity"])
    write_json(path, entry)
    return path


def pending_entries(mlflow_config: dict) -> list[Path]:
    d = pending_dir(mlflow_config)
    # a tuning selection before its trials, which nest under it
    return sorted(d.glob("*.json"), key=lambda p: (not p.name.startswith("tune__"), p.name)) if d.is_dir() else []


def _store_lock(uri: str):
    """Writers to a SQLite store take turns (SQLite allows one writer; MLflow's own retries
    give up with "database is locked" under a burst of parallel jobs)."""
    from filelock import FileLock

    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(db) + ".lock", timeout=LOCK_TIMEOUT_S)
    return contextlib.nullcontext()


def _owner_lock(mlflow_config: dict, entry_name: str):
    """Held by the job that owns a queue entry while it logs it: a sync by another process
    skips entries whose job is still at work instead of racing it."""
    from filelock import FileLock

    d = pending_dir(mlflow_config) / ".locks"
    d.mkdir(parents=True, exist_ok=True)
    return FileLock(str(d / entry_name) + ".lock", timeout=LOCK_TIMEOUT_S)


@contextlib.contextmanager
def _bounded_http():
    """MLflow's HTTP retries bounded for the duration of our calls."""
    old = {k: os.environ.get(k) for k in HTTP_ENV}
    for k, v in HTTP_ENV.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)


def reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """A TCP connect to an http(s) store (other stores are tried directly)."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return True
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


class StoreUnavailable(RuntimeError):
    """The MLflow store cannot be reached now; the entry stays queued."""


class ParentNotLogged(LookupError):
    """A tuning trial's selection is not in the store yet."""


class BadEntry(ValueError):
    """A queued entry whose record cannot be logged (it stays queued, others go on)."""


class _Store:
    """One MlflowClient for a batch of entries of one (uri, experiment)."""

    def __init__(self, uri: str, experiment: str):
        from mlflow.tracking import MlflowClient

        if not reachable(uri):
            raise StoreUnavailable(f"nothing answers at {display_uri(uri)}")
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.locked_retries = 0
        exp = self._retry(self.client.get_experiment_by_name, experiment)
        if exp is None:
            location = None
            if uri.startswith("sqlite:///"):
                location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
            self.experiment_id = self._retry(self.client.create_experiment, experiment, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id

    def _retry(self, fn, *args, **kwargs):
        """Retry SQLite lock errors that get past the file lock (another program on the db)."""
        for attempt in range(LOCKED_RETRIES + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if "database is locked" not in str(exc) or attempt == LOCKED_RETRIES:
                    raise
                self.locked_retries += 1
                log.warning("MLflow store busy (database is locked), retry %d", attempt + 1)
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def _runs_of(self, ident: dict[str, str]) -> list:
        query = " and ".join(f"tags.{k} = '{v}'" for k, v in ident.items())
        runs = self._retry(self.client.search_runs, [self.experiment_id], filter_string=query, max_results=1000)
        # the record's identity tags only: a trial's ``trial`` tag must not match a final run
        return [r for r in runs if ("trial" in ident) == ("trial" in r.data.tags)]

    def _parent_id(self, extra_tags: dict) -> dict[str, str]:
        """``mlflow.parentRunId`` of a tuning trial: its selection's run, which is logged first;
        ParentNotLogged while it is not in the store yet (the entry waits)."""
        parent = (extra_tags or {}).get(PARENT_TAG)
        if not parent:
            return {}
        runs = self._runs_of(json.loads(parent))
        if not runs:
            raise ParentNotLogged(parent)
        return {"mlflow.parentRunId": max(runs, key=lambda r: r.info.start_time).info.run_id}

    def log(self, record: dict, record_path: Path, record_sha: str, artifacts: list[str], extra_tags: dict) -> str:
        from mlflow.entities import Metric, Param

        c = self.client
        existing = self._runs_of(identity(record))
        parent = self._parent_id(extra_tags)
        done = [r for r in existing if r.data.tags.get("record_sha256") == record_sha
                and r.info.status in ("FINISHED", "FAILED")
                and all(r.data.tags.get(k) == v for k, v in parent.items())]
        if len(done) == 1 and len(existing) == 1:
            return done[0].info.run_id  # already in the store, unchanged: nothing to do
        tags = run_tags(record, record_sha, {k: v for k, v in (extra_tags or {}).items() if k != PARENT_TAG}) | parent
        run_id = self._retry(c.create_run, self.experiment_id, tags=tags).info.run_id
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, s) for k, v, s in _metrics_of(record)]
        params = [Param(k, str(v)[:500]) for k, v in _params_of(record).items()]
        for i in range(0, len(params), 100):  # MLflow's per-batch limits: 100 params, 1000 metrics
            self._retry(c.log_batch, run_id, params=params[i:i + 100])
        for i in range(0, len(metrics), 1000):
            self._retry(c.log_batch, run_id, metrics=metrics[i:i + 1000])
        self._retry(c.log_artifact, run_id, str(record_path))
        for path in artifacts:
            if Path(path).exists():
                self._retry(c.log_artifact, run_id, str(path))
            else:
                log.warning("artifact %s is gone; run %s logged without it", path, run_id)
        self._retry(c.set_terminated, run_id, "FINISHED" if record.get("status") == "completed" else "FAILED")
        # only now, with the new run complete, retire the earlier ones of this identity
        for old in existing:
            self._retry(c.delete_run, old.info.run_id)
        return run_id


def _sync_entry(store: _Store, entry_path: Path) -> str | None:
    """Log one queued entry; returns the run id, or None when the entry must wait (its
    record is being rewritten by a rerun that will queue itself)."""
    entry = read_json(entry_path)
    record_path = Path(entry["record_path"])
    if not record_path.exists() or _sha256(record_path) != entry["record_sha256"]:
        return None
    try:
        record = read_json(record_path)
        identity(record)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BadEntry(f"{record_path} is not a result record ({type(exc).__name__}: {exc})") from exc
    try:
        run_id = store.log(record, record_path, entry["record_sha256"], entry.get("artifacts", []), entry.get("tags"))
    except ParentNotLogged:
        return None
    # dequeue unless a newer entry of this identity replaced it meanwhile; files the queue
    # owns (a merged model exported for the store only) go with it
    try:
        if read_json(entry_path)["record_sha256"] == entry["record_sha256"]:
            entry_path.unlink()
            owned = entry_path.parent.resolve()
            for a in map(Path, entry.get("artifacts", [])):
                if owned in a.parents:
                    a.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
    return run_id


def log_record(record: dict, record_path: str | Path, mlflow_config: dict, artifacts=(),
               tags: dict | None = None) -> str | None:
    """Mirror one result record into MLflow; returns the run id, or None when the store is
    unavailable (the record stays queued on disk and is synced later). Never raises.

    ``mlflow_config``: config.yaml's ``mlflow`` section plus ``default_store``; ``tags``:
    extra tags (e.g. an evaluate run's ``config_hash``, taken from its finetune record).
    """
    uri = tracking_uri(mlflow_config)
    owner = None
    try:
        owner = _owner_lock(mlflow_config, _entry_name(identity(record)))
        owner.acquire()
        entry_path = enqueue(record, record_path, mlflow_config, artifacts, tags)
    except Exception as exc:  # noqa: BLE001 - tracking must never fail training
        log.warning("could not queue %s for MLflow (%s: %s); the record is kept", record_path,
                    type(exc).__name__, exc)
        if owner is not None and owner.is_locked:
            owner.release()
        return None
    try:
        import mlflow.entities  # noqa: F401 - imported before taking the store lock (seconds of CPU)
        import mlflow.tracking  # noqa: F401

        if uri.startswith("sqlite:"):
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
        t0 = time.perf_counter()
        with _bounded_http(), _store_lock(uri):
            t1 = time.perf_counter()
            store = _Store(uri, mlflow_config.get("experiment", "peftlab"))
            run_id = _sync_entry(store, entry_path)
        log.info("MLflow run %s at %s (waited %.2f s for the store lock, logged in %.2f s, %d lock retries)",
                 run_id, display_uri(uri), t1 - t0, time.perf_counter() - t1, store.locked_retries)
    except Exception as exc:  # noqa: BLE001 - tracking must never fail training
        log.warning("MLflow store %s unavailable (%s: %s); %s stays queued in %s and is synced "
                    "later (python -m peftlab sync-mlflow)", display_uri(uri), type(exc).__name__,
                    str(exc).splitlines()[0][:300] if str(exc) else "", record_path, entry_path.parent)
        return None
    finally:
        owner.release()
    # the store is up: take along what earlier jobs left queued
    sync_pending(mlflow_config, limit=SYNC_AFTER_LOG)
    return run_id


def sync_pending(mlflow_config: dict, limit: int | None = None, tracking_uri_override: str | None = None) -> dict:
    """Log queued entries to their stores; returns counts {synced, waiting, failed, left}.

    Never raises: an entry that cannot be logged stays queued. ``tracking_uri_override``
    sends every entry to that store instead of the one it was queued for.
    """
    from filelock import Timeout

    entries = pending_entries(mlflow_config)[:limit] if limit else pending_entries(mlflow_config)
    counts = {"synced": 0, "waiting": 0, "failed": 0}
    groups: dict[tuple[str, str], list[Path]] = {}
    for path in entries:
        try:
            entry = read_json(path)
        except (OSError, json.JSONDecodeError):
            continue  # being replaced right now
        uri = tracking_uri_override or entry["tracking_uri"]
        groups.setdefault((uri, entry.get("experiment", "peftlab")), []).append(path)
    for (uri, experiment), paths in groups.items():
        done = 0
        try:
            with _bounded_http(), _store_lock(uri):
                store = _Store(uri, experiment)
                for path in paths:
                    owner = _owner_lock(mlflow_config, path.name)
                    try:
                        owner.acquire(timeout=0)
                    except Timeout:
                        counts["waiting"] += 1  # its job is logging it right now
                        done += 1
                        continue
                    try:
                        counts["waiting" if _sync_entry(store, path) is None else "synced"] += 1
                    except FileNotFoundError:
                        pass  # another process synced it
                    except BadEntry as exc:
                        counts["failed"] += 1
                        log.warning("%s", exc)
                    finally:
                        owner.release()
                    done += 1
        except Exception as exc:  # noqa: BLE001 - keep the queue, report
            counts["failed"] += len(paths) - done
            log.warning("MLflow store %s unavailable (%s: %s); %d entries stay queued", display_uri(uri),
                        type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "", len(paths))
    counts["left"] = len(pending_entries(mlflow_config))
    if counts["synced"] or counts["left"]:
        log.info("MLflow sync: %s", counts)
    return counts


def runs_table(mlflow_config: dict, tracking_uri_override: str | None = None):
    """All active runs of the experiment as a DataFrame (``run_id``, ``status``, ``tags.*``,
    ``metrics.*``, ``params.*``), without touching the process's global MLflow settings."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri_override or tracking_uri(mlflow_config))
    exp = client.get_experiment_by_name(mlflow_config.get("experiment", "peftlab"))
    rows, token = [], None
    while exp is not None:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        for r in page:
            rows.append({"run_id": r.info.run_id, "status": r.info.status, "start_time": r.info.start_time}
                        | {f"tags.{k}": v for k, v in r.data.tags.items()}
                        | {f"metrics.{k}": v for k, v in r.data.metrics.items()}
                        | {f"params.{k}": v for k, v in r.data.params.items()})
        token = page.token
        if not token:
            break
    return pd.DataFrame(rows)


MLFLOW_UI_DEFAULT = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def ui_url(mlflow_config: dict) -> str:
    """The MLflow UI runs are linked to: config ``mlflow.ui_url``, else the tracking URI when it
    is a server's (without credentials), else ``mlflow ui``'s default address."""
    if mlflow_config.get("ui_url"):
        return str(mlflow_config["ui_url"]).rstrip("/")
    uri = tracking_uri(mlflow_config)
    return display_uri(uri).rstrip("/") if urlsplit(uri).scheme in ("http", "https") else MLFLOW_UI_DEFAULT


def run_links(mlflow_config: dict) -> dict:
    """Each run's MLflow UI address by (rule, model, task, method, variant, seed), for the
    report; raises StoreUnavailable when the store does not answer."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(mlflow_config)
    if not reachable(uri):
        raise StoreUnavailable(f"nothing answers at {display_uri(uri)}")
    with _bounded_http():
        exp = MlflowClient(uri).get_experiment_by_name(mlflow_config.get("experiment", "peftlab"))
        runs = runs_table(mlflow_config) if exp is not None else None
    base, out = ui_url(mlflow_config), {}
    for r in (runs.to_dict("records") if runs is not None and len(runs) else []):
        if isinstance(r.get("tags.trial"), str):  # a tuning trial: not a run of the report
            continue
        key = tuple(str(r.get(f"tags.{k}")) for k in ("rule", *IDENTITY_TAGS))
        out[key] = f"{base}/#/experiments/{exp.experiment_id}/runs/{r['run_id']}"
    return out
