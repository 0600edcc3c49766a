"""The cgroups this process is in, read from the files the kernel writes: proc(5) mountinfo and cgroup, then each
controller's files in the process's cgroup folder and its parents (a limit set on an ancestor, a Kubernetes pod's,
binds a container too). cgroup v1 (one hierarchy per controller), v2 (one unified hierarchy) and hybrid trees (both
mounted) are read alike. Used for the CPU quota (infra.cpus) and the memory limit and out-of-memory kills
(infra.memory)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path


def unescape(field: str) -> str:
    """mountinfo's octal escapes of space, tab, newline and backslash."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts(proc: Path) -> list[tuple[str, str, str, set[str]]]:
    """(root within the file system, mount point, fstype, super options) of the cgroup mounts (proc(5) mountinfo)."""
    out = []
    try:
        lines = (proc / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(rest) < 3 or rest[0] not in ("cgroup", "cgroup2"):
            continue
        out.append((unescape(fields[3]), unescape(fields[4]), rest[0], set(rest[2].split(","))))
    return out


def memberships(proc: Path) -> dict[str, str]:
    """controller (`cpu` for v1, `` for v2) -> the process's cgroup path (proc(7) /proc/self/cgroup)."""
    out: dict[str, str] = {}
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            out[controller] = parts[2]
    return out


def cgroup_dirs(mount_root: str, mount_point: str, path: str) -> list[Path]:
    """The process's cgroup folder under a mount, then each parent up to the mount point (a limit set on an
    ancestor binds too); none where the mount shows another part of the hierarchy. In a container with its own
    cgroup namespace both paths are `/`."""
    rel = os.path.relpath(path, mount_root)
    if rel == ".." or rel.startswith("../"):
        return []
    here = Path(mount_point) / ("" if rel == "." else rel)
    dirs = [here]
    while here != Path(mount_point) and here.parent != here:
        here = here.parent
        dirs.append(here)
    return dirs


def folders(controller: str, proc: Path = Path("/proc")) -> Iterator[tuple[str, Path]]:
    """(`cgroup` or `cgroup2`, folder) for each cgroup folder of this process where `controller`'s files are, from its
    own cgroup up to the mount's root: the v1 hierarchy that carries the controller and the v2 unified one."""
    member = memberships(proc)
    for root, point, fstype, options in mounts(proc):
        if fstype == "cgroup2" and "" in member:
            path = member[""]
        elif fstype == "cgroup" and controller in options and controller in member:
            path = member[controller]
        else:
            continue
        for folder in cgroup_dirs(root, point, path):
            yield fstype, folder
