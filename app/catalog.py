"""What the API knows about the model, read from the checkpoint's ``config.json`` with ``json`` (no torch).

Class names, schedule length and provenance come from the same file the worker loads; the
weights' SHA-256 (the hash written into every PNG) is computed once per file version.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"  # as in diffusion.checkpoint


class CheckpointMissing(Exception):
    """The configured checkpoint directory has no readable config.json.  ``path``: the directory, which the API's
    503 names by its last part only (the log gives it whole)."""

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.path = path

    def public(self) -> str:
        return str(self).replace(str(self.path), Path(self.path).name) if self.path else str(self)


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    config: dict

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.config["class_names"])

    @property
    def num_timesteps(self) -> int:
        return int(self.config.get("schedule", {}).get("timesteps", 1000))

    @property
    def sha256(self) -> str | None:
        weights = self.path / WEIGHTS_FILE
        if not weights.is_file():
            return None
        st = weights.stat()
        return _sha256(str(weights), st.st_size, st.st_mtime_ns)


def model_info(path: Path) -> ModelInfo:
    """The checkpoint at ``path`` (re-read when its config.json changes)."""
    cfg = path / CONFIG_FILE
    try:
        mtime = cfg.stat().st_mtime_ns
    except OSError:
        raise CheckpointMissing(f"no checkpoint at {path} (no {CONFIG_FILE}); set DREAMDATA_CHECKPOINT", path) from None
    return _read(str(path.resolve()), mtime)


@lru_cache(maxsize=8)
def _read(path: str, mtime_ns: int) -> ModelInfo:
    try:
        config = json.loads((Path(path) / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointMissing(f"unreadable checkpoint config {path}/{CONFIG_FILE}: {e}", path) from e
    if not isinstance(config.get("class_names"), list) or not config["class_names"]:
        raise CheckpointMissing(f"{path}/{CONFIG_FILE} has no class_names", path)
    return ModelInfo(Path(path), config)


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
