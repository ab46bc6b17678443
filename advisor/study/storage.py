"""Study storage: Optuna's RDB storage through SQLAlchemy, plus the study's binary artifacts.

Studies stay plain Optuna studies (readable by ``optuna`` and optuna-dashboard); what
Optuna has no place for, the trained baseline's weights, goes into one extra table,
``advisor_blobs``, in the same database, so every worker that can reach the study can
reuse them without training the baseline again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from advisor.errors import AdvisorError, first_line
from advisor.files import flock

DEFAULT_URL = "sqlite:///studies/advisor.db"

_metadata = sa.MetaData()
_blobs = sa.Table(
    "advisor_blobs", _metadata,
    sa.Column("study_name", sa.String(512), primary_key=True),
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("created", sa.DateTime, nullable=False),
)


def parse_url(url: str) -> URL:
    """The storage URL, or one line saying what a URL looks like."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise AdvisorError(
            f"--storage must be a SQLAlchemy URL such as {DEFAULT_URL} or "
            f"postgresql+psycopg://user@host/dbname; got {url!r}"
        ) from None
    return parsed


def display(url: str) -> str:
    """The URL as it may be printed: never with its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "<malformed URL>"


def open_storage(url: str, heartbeat_s: int | None = None) -> optuna.storages.RDBStorage:
    """Connect to (and, for a new SQLite file, create) the study storage.

    With ``heartbeat_s``, the storage of a worker: its running trial records a heartbeat
    every ``heartbeat_s`` seconds, and a trial whose heartbeat is older than twice that (its
    worker was killed) is failed by the next worker that asks for a trial and retried once
    with the same knobs (Optuna's ``fail_stale_trials`` and ``RetryHeartbeatStaleTrialCallback``).
    """
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    shown = display(url)
    try:
        # Several workers may open a new database at once: create the schema one at a time.
        with lock(url, "schema"):
            with warnings.catch_warnings():  # heartbeats are experimental in Optuna: not the user's note
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                beats = {} if heartbeat_s is None else {
                    "heartbeat_interval": heartbeat_s, "grace_period": 2 * heartbeat_s,
                    "heartbeat_stale_trial_callback":
                        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)}
                storage = optuna.storages.RDBStorage(url, **beats)
            with storage.engine.begin() as connection:
                _metadata.create_all(connection, checkfirst=True)
    except (NoSuchModuleError, ImportError, ModuleNotFoundError) as exc:
        raise AdvisorError(
            f"--storage {shown}: the database driver is not installed ({_first_line(exc)}); "
            f"install it, for PostgreSQL: pip install 'psycopg[binary]'"
        ) from None
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError, OSError) as exc:
        raise AdvisorError(f"--storage {shown}: cannot open the storage: {_first_line(exc)}") from None
    return storage


@contextlib.contextmanager
def lock(url: str, name: str) -> Iterator[None]:
    """Hold a lock named ``name`` that every worker of the storage ``url`` sees.

    PostgreSQL: a session advisory lock (workers on other machines wait too). SQLite: an
    exclusive ``flock`` on a file beside the database (SQLite is one machine's storage).
    Other databases: no lock (study creation then relies on Optuna's ``load_if_exists``).
    """
    parsed = parse_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        key = int.from_bytes(hashlib.sha1(f"advisor:{name}".encode()).digest()[:8], "big", signed=True)
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as connection:
                connection.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": key})
                try:
                    yield
                finally:
                    connection.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                    connection.commit()
        finally:
            engine.dispose()
    elif backend == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database).expanduser()
        with flock(path.with_name(path.name + ".lock")):
            yield
    else:
        yield


def _first_line(exc: BaseException) -> str:
    """The database driver's own message where SQLAlchemy wraps one."""
    return first_line(getattr(exc, "orig", None) or exc) or type(exc).__name__


def put_blob(storage: optuna.storages.RDBStorage, study: str, key: str, data: bytes) -> None:
    with storage.engine.begin() as connection:
        connection.execute(sa.delete(_blobs).where(_blobs.c.study_name == study,
                                                   _blobs.c.key == key))
        connection.execute(sa.insert(_blobs).values(study_name=study, key=key, data=data,
                                                    created=dt.datetime.now(dt.UTC)))


def get_blob(storage: optuna.storages.RDBStorage, study: str, key: str) -> bytes | None:
    with storage.engine.connect() as connection:
        row = connection.execute(sa.select(_blobs.c.data).where(
            _blobs.c.study_name == study, _blobs.c.key == key)).first()
    return bytes(row[0]) if row else None


def study_names(storage: optuna.storages.RDBStorage) -> list[str]:
    return [s.study_name for s in storage.get_all_studies()]
