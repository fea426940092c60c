"""PEP 517 build backend: setuptools, with a byte-reproducible sdist.

setuptools already writes a reproducible wheel when ``SOURCE_DATE_EPOCH`` is set (zip entries are
sorted and dated from it), but its sdist is a tarball of the checkout as found: every member keeps
its file's mtime, the builder's uid/gid and user names, and gzip stamps the build's wall-clock time
into its header. Two fresh checkouts therefore give two different sdists. This backend delegates
everything to ``setuptools.build_meta`` and then rewrites the sdist with members sorted by name,
owned by 0/0 with no names, dated ``SOURCE_DATE_EPOCH`` (a file newer than that is clamped, as
reproducible-builds.org recommends), modes normalised to 0644/0755, and a gzip header dated the
same. Without ``SOURCE_DATE_EPOCH`` the sdist is left exactly as setuptools wrote it.

It imports only the standard library and setuptools, so an isolated build (``backend-path``)
works without the project's own dependencies.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from typing import Any

from setuptools import build_meta as _orig
from setuptools.build_meta import *  # noqa: F403  (re-export every PEP 517/660 hook unchanged)

__all__ = list(_orig.__all__)


def _epoch() -> int | None:
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    return int(raw) if raw else None


def normalize_sdist(path: str, epoch: int) -> None:
    """Rewrite the ``.tar.gz`` at ``path`` in place so its bytes depend on its file contents only."""
    with tarfile.open(path, "r:gz") as src:
        members = sorted(src.getmembers(), key=lambda m: m.name)
        files = {m.name: src.extractfile(m).read() if m.isfile() else None for m in members}  # type: ignore[union-attr]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for m in members:
            m.mtime = min(int(m.mtime), epoch)
            m.uid = m.gid = 0
            m.uname = m.gname = ""
            m.mode = 0o755 if m.isdir() or m.mode & 0o111 else 0o644
            m.pax_headers = {}
            data = files[m.name]
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
    # gzip.GzipFile with an explicit mtime and no filename: the header then carries neither the
    # build's time nor the temporary file's name.
    with open(path, "wb") as out, gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=epoch,
                                                compresslevel=9) as gz:
        gz.write(raw.getvalue())


def build_sdist(sdist_directory: str, config_settings: dict[str, Any] | None = None) -> str:
    name: str = _orig.build_sdist(sdist_directory, config_settings)
    epoch = _epoch()
    if epoch is not None and name.endswith(".tar.gz"):
        normalize_sdist(os.path.join(sdist_directory, name), epoch)
    return name
