"""Where the offline datasets live, and checks that a file is the one we expect."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Union

ENV_VAR = "FASTDNI_DATA"
_REPO_ROOT = Path(__file__).resolve().parents[2]


class DatasetError(RuntimeError):
    """A dataset is missing, incomplete or corrupt; the message says which file and what to do."""


def _candidates() -> list[Path]:
    env = os.environ.get(ENV_VAR)
    found = [Path(env)] if env else []
    return found + [_REPO_ROOT.parent / "shared" / "datasets", Path.cwd().parent / "shared" / "datasets"]


def default_data_root() -> Path:
    """``$FASTDNI_DATA`` if set, else ``../shared/datasets`` beside the repository (or the cwd)."""
    candidates = _candidates()
    for path in candidates:
        if path.is_dir():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise DatasetError(f"no dataset folder found (tried {tried}); pass a path or set ${ENV_VAR}")


def resolve_dataset_dir(name: str, root: Optional[Union[str, Path]] = None) -> Path:
    """The folder of dataset ``name``: ``root/name`` (or ``root`` itself if it holds the files)."""
    base = Path(root) if root is not None else default_data_root()
    if not base.is_dir():
        raise DatasetError(f"data path {str(base)!r} is not a folder")
    return base / name if (base / name).is_dir() else base


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verified_file(folder: Path, filename: str, sha256: str) -> Path:
    """``folder/filename`` after checking it exists and has the expected SHA-256."""
    path = folder / filename
    if not path.is_file():
        raise DatasetError(f"missing dataset file {path}")
    got = sha256_of(path)
    if got != sha256:
        raise DatasetError(f"corrupt dataset file {path}: SHA-256 {got}, expected {sha256}")
    return path
