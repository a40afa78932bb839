"""Single-layer OCI image archives made from local files, for the real node's containerd (no engine, no registry).

``write_image(dest, name, files, entrypoint=..., user=...)`` writes an OCI image layout as a tar
(``oci-layout``, ``index.json``, ``blobs/sha256/...``) that ``ctr images import`` loads; the index names the
image through the ``io.containerd.image.name`` annotation. ``files`` maps a path inside the image to a host
file to copy (mode kept) or to ``Symlink(target)``. The layer is deterministic (sorted entries, zero
timestamps, root ownership), so the same files give the same image digest.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


@dataclass(frozen=True)
class Symlink:
    target: str


def _layer(files: dict[str, Path | Symlink]) -> bytes:
    """An uncompressed tar of ``files`` with every parent directory present."""
    dirs: set[str] = set()
    for inside in files:
        for parent in PurePosixPath(inside.lstrip("/")).parents:
            if str(parent) != ".":
                dirs.add(str(parent))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in sorted(dirs):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for inside, src in sorted(files.items()):
            info = tarfile.TarInfo(inside.lstrip("/"))
            if isinstance(src, Symlink):
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, src.target, 0o777
                tar.addfile(info)
            else:
                data = src.read_bytes()
                info.size, info.mode = len(data), src.stat().st_mode & 0o7777
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _blob(data: bytes) -> tuple[str, bytes]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def write_image(
    dest: Path,
    name: str,
    files: dict[str, Path | Symlink],
    *,
    entrypoint: list[str],
    user: str = "65534:65534",
    env: list[str] | None = None,
) -> Path:
    """Write the image ``name`` (e.g. ``opd.local/pause:v1``) as an OCI archive at ``dest``; returns ``dest``."""
    layer_tar = _layer(files)
    diff_id = "sha256:" + hashlib.sha256(layer_tar).hexdigest()
    layer_digest, layer_gz = _blob(gzip.compress(layer_tar, mtime=0))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": entrypoint,
            "User": user,
            "Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    config_digest, config_bytes = _blob(json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": len(config_bytes),
        },
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": len(layer_gz)}
        ],
    }
    manifest_digest, manifest_bytes = _blob(json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest_bytes),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1],
                },
            }
        ],
    }
    entries = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index, sort_keys=True).encode(),
        **{
            f"blobs/sha256/{d.split(':', 1)[1]}": b
            for d, b in ((layer_digest, layer_gz), (config_digest, config_bytes), (manifest_digest, manifest_bytes))
        },
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w") as tar:
        for path in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(path)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for path, data in entries.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return dest
