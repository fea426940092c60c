"""Processes as ``/proc`` shows them: the tests of ``qai serve``'s children use these."""

from __future__ import annotations

from pathlib import Path


def child_pids(parent: int, marker: bytes) -> list[int]:
    """Live (not zombie) children of ``parent`` whose command line contains ``marker``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent and fields[0] != "Z" and marker in cmdline:
            out.append(int(entry.name))
    return sorted(out)


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie (a container's pid 1 may not reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
