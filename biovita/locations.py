"""Where things are: a local path, or an object-store URI (`s3://`, `gs://`, ...). The one
place that tells them apart; paths are made absolute on the driver, before any Ray worker or
Tune trial (which run in other working directories) sees them."""

from __future__ import annotations

import os
from pathlib import Path


def is_remote(uri: str | os.PathLike) -> bool:
    """An object-store (or other non-file) URI, as opposed to a local path or `file://`."""
    uri = str(uri)
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str | os.PathLike) -> str:
    """A local path or `file://` URI as an absolute path."""
    uri = str(uri)
    return str(Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser().resolve())


def absolute(uri: str | os.PathLike) -> str:
    """An object-store URI unchanged, a local path made absolute ("" stays "")."""
    uri = str(uri)
    return uri if not uri or is_remote(uri) else local_path(uri)


def absolute_sqlite(uri: str) -> str:
    """A SQLite tracking URI with an absolute database path (`sqlite:///rel.db` resolves
    against the working directory, which differs in every Ray worker and Tune trial)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).expanduser().resolve()}"
    return uri


def tracking_uri(uri: str = "") -> str:
    """An MLflow tracking URI: the given one, else $MLFLOW_TRACKING_URI, else a SQLite store
    in the working directory; a SQLite path made absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    return absolute_sqlite(uri)
