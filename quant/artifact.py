"""An artifact: a deployable file (ONNX, engine, TorchScript) plus its manifest.

The manifest says everything needed to trust and reproduce the file: model, variant and
bit config, input shape and dtype, sha256, producer versions and export settings. It is
written next to the file as `<file>.manifest.json` and travels with it to the device.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_stem(name: str, limit: int = 60) -> str:
    """`name` (a model path, `package.module:factory`, `config:PATH.json`) as one piece of a
    file name: separators replaced, and a long one cut to its last `limit` characters plus a
    hash of the whole, since a file name holds 255 bytes and a deep path alone can exceed it."""
    stem = name.strip("/").replace(":", "_").replace("/", "_")
    if len(stem) <= limit:
        return stem
    return f"{stem[-limit:].lstrip('_.')}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class Artifact:
    path: str
    manifest: dict

    @property
    def sha256(self) -> str:
        return self.manifest["sha256"]

    @property
    def manifest_path(self) -> Path:
        return Path(self.path + ".manifest.json")

    @classmethod
    def create(cls, path: str | Path, **manifest) -> Artifact:
        """Hash the file and write its manifest beside it."""
        path = Path(path)
        manifest = {**manifest, "file": path.name, "sha256": sha256_file(path),
                    "size_bytes": path.stat().st_size}
        art = cls(str(path), manifest)
        art.manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return art

    @classmethod
    def load(cls, path: str | Path) -> Artifact:
        """Open an artifact and check its file against the manifest's sha256."""
        path = Path(path)
        mpath = Path(str(path) + ".manifest.json")
        if not path.is_file():
            raise FileNotFoundError(2, "artifact not found", str(path))
        if not mpath.is_file():
            raise FileNotFoundError(2, "artifact manifest not found", str(mpath))
        manifest = json.loads(mpath.read_text())
        actual = sha256_file(path)
        if actual != manifest.get("sha256"):
            raise ValueError(f"artifact {path} does not match its manifest (sha256 {actual[:12]} "
                             f"!= {str(manifest.get('sha256'))[:12]}): corrupt or replaced file")
        return cls(str(path), manifest)
