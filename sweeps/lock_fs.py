"""Whether the file system that holds a driver lock shares POSIX record locks between nodes.

The driver lock on a file system is an `fcntl` record lock (`sweeps.lock`). Some file systems keep
such locks on the node that took them, so that drivers on two nodes would both hold one. The mount
holding a folder is the longest mount point in /proc/self/mountinfo that contains the folder's
resolved path (of mounts stacked on one point, the last); its type and options decide:

- local file systems (ext4, xfs, btrfs, zfs, tmpfs, overlay, ...): the kernel's own locks, right for
  the drivers of this machine, the only ones that see the folder (an NFS server maps its clients'
  locks onto the same kernel locks);
- nfs, nfs4: shared (NLM, or NFSv4's own locks) unless mounted `nolock` or `local_lock=posix|all`,
  which make them local (nfs(5), "local_lock"; the kernel shows both in the options, and
  `nolock` implies `local_lock=all`);
- lustre: shared only with `flock`, "coherent across all client nodes"; `localflock` keeps them on
  the client, and without either (`noflock`) they fail with ENOSYS (mount.lustre(8); the client
  shows the flag in effect, llite's ll_show_options);
- beegfs: client-local unless the client sets tuneUseGlobalFileLocks (default false;
  beegfs-client.conf), which each client instance shows in /proc/fs/beegfs/*/config;
- ceph (the kernel client sends fcntl locks to the MDS, fs/ceph/locks.c), fuse.ceph-fuse (so does
  ceph-fuse), fuse.juicefs ("POSIX record locks (fcntl)", JuiceFS' POSIX compatibility page), gpfs,
  gfs2 and ocfs2 (cluster-wide through their lock managers unless mounted `localflocks`): shared;
- any other fuse.* (s3fs, gcsfuse, goofys, mountpoint-s3, rclone, sshfs, ...): not shared, since
  FUSE keeps locks in the local kernel unless the file system implements them (libfuse's fuse.h);
- any other type: not known to share them, so treated as not sharing them.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import NamedTuple

LOCAL = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "jfs", "reiserfs", "bcachefs", "nilfs2",
    "tmpfs", "ramfs", "overlay", "aufs", "vfat", "exfat", "ntfs", "ntfs3", "fuseblk", "hfsplus"})
SHARED = frozenset({"ceph", "fuse.ceph-fuse", "fuse.juicefs", "gpfs"})
CLUSTER_BLOCK = frozenset({"gfs2", "ocfs2"})  # shared unless mounted localflocks
MOUNTINFO = Path("/proc/self/mountinfo")
BEEGFS_CONFIGS = "/proc/fs/beegfs/*/config"  # one per client instance (mount)
REMEDY = {
    "nfs": "remount without nolock and local_lock, with rpc.statd running for NFSv3",
    "lustre": "remount with -o flock",
    "beegfs": "set tuneUseGlobalFileLocks = true in the client's beegfs-client.conf",
}


class Mount(NamedTuple):
    point: str
    fstype: str
    source: str
    options: frozenset[str]  # the mount's options and its super block's, e.g. "local_lock=none"


class Verdict(NamedTuple):
    ok: bool  # drivers on any node that sees the folder exclude each other
    why: str  # for a refusal: what makes the locks node-local, and the remedy where there is one


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a /proc/PID/mountinfo text, in its order (proc(5): ID PARENT MAJ:MIN ROOT POINT
    OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER_OPTIONS; spaces and the like escaped in octal)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        if "-" not in fields[6:] or len(fields) < 10:
            continue
        dash = fields.index("-", 6)
        fstype, source, super_options = (fields[dash + 1:] + ["", ""])[:3]
        options = frozenset(fields[5].split(",") + super_options.split(",")) - {""}
        mounts.append(Mount(_unescape(fields[4]), fstype, _unescape(source), options))
    return mounts


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def mount_of(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount holding the absolute, resolved `path`: the longest mount point containing it."""
    found = None
    for mount in mounts:
        inside = mount.point == "/" or path == mount.point or path.startswith(mount.point + "/")
        if inside and (found is None or len(mount.point) >= len(found.point)):
            found = mount
    return found


def record_locks(mount: Mount, beegfs_configs: list[str] = ()) -> Verdict:
    """Whether POSIX record locks on `mount` exclude drivers on other nodes (the rules above).
    `beegfs_configs`: the texts of /proc/fs/beegfs/*/config, for a beegfs mount."""
    kind, options = mount.fstype, mount.options
    if kind in LOCAL or kind in SHARED:
        return Verdict(True, "")
    if kind in ("nfs", "nfs4"):
        local = sorted(options & {"nolock", "local_lock=posix", "local_lock=all"})
        return Verdict(not local, f"mounted {','.join(local)}; {REMEDY['nfs']}" if local else "")
    if kind == "lustre":
        if "flock" in options:
            return Verdict(True, "")
        how = "localflock" if "localflock" in options else "without flock (noflock: they fail)"
        return Verdict(False, f"mounted {how}; {REMEDY['lustre']}")
    if kind == "beegfs":
        settings = [re.search(r"^tuneUseGlobalFileLocks\s*=\s*(\S+)", text, re.M)
                    for text in beegfs_configs]
        on = bool(settings) and all(s and s.group(1) in ("1", "true") for s in settings)
        return Verdict(on, "" if on else f"tuneUseGlobalFileLocks is off; {REMEDY['beegfs']}")
    if kind in CLUSTER_BLOCK:
        local = "localflocks" in options
        return Verdict(not local, "mounted localflocks" if local else "")
    if kind.startswith("fuse"):
        return Verdict(False, "a FUSE file system whose locks stay in this node's kernel")
    return Verdict(False, f"file system type {kind!r} is not known to share them")


def check(folder: Path) -> tuple[Mount, Verdict] | None:
    """The mount holding `folder` (or its nearest existing parent) and its verdict; None where
    /proc/self/mountinfo cannot be read (not Linux), which leaves nothing to check."""
    try:
        mounts = parse_mountinfo(MOUNTINFO.read_text())
    except OSError:
        return None
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    mount = mount_of(os.path.realpath(existing), mounts)
    if mount is None:
        return None
    configs = []
    if mount.fstype == "beegfs":
        for name in glob.glob(BEEGFS_CONFIGS):
            try:
                configs.append(Path(name).read_text())
            except OSError:
                continue
    return mount, record_locks(mount, configs)
