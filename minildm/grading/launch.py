"""Start one worker process of `minildm grade` inside its namespaces (run by the grader, never by a student).

    unshare --mount --pid --fork --kill-child --mount-proc --net --ipc python -E -s launch.py PLAN.json

runs this file as pid 1's parent-to-be, still with the grader's rights inside fresh mount, PID, network and IPC
namespaces. It reshapes what the worker can see, then drops to an unprivileged user and execs the worker:

- a folder on the way to Python's (/root for ~/.pyenv) becomes an empty tmpfs with only that way bound into it;
- every folder the plan names is covered by an empty read-only tmpfs (the reference, the tests, the student's
  original folder, other people's home folders...), every named file by /dev/null;
- the folders Python needs (its prefix, site-packages) are bind-mounted read-only;
- /tmp and /dev/shm are fresh, small tmpfs (writes there vanish with the namespace);
- the grading folder is bind-mounted read-only at /tmp/work, with only /tmp/work/out writable;
- resource limits, then setgroups/setgid/setuid to the plan's user, no_new_privs, a clean environment, exec.

Standard library only, and it imports nothing from minildm: it runs before any student code, from the grader's
installation. The exec'd worker is pid 1 of the PID namespace: when it ends, the kernel kills every process it
started, daemons included.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG, SIGKILL = 38, 1, 9
WORK = "/tmp/work"
LIMITS = {"as": resource.RLIMIT_AS, "cpu": resource.RLIMIT_CPU, "nproc": resource.RLIMIT_NPROC,
          "nofile": resource.RLIMIT_NOFILE, "fsize": resource.RLIMIT_FSIZE, "core": resource.RLIMIT_CORE}

libc = ctypes.CDLL(None, use_errno=True)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else s.encode()

    if libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def bind(source: str, target: str, readonly: bool) -> None:
    mount(source, target, None, MS_BIND | MS_REC)
    if readonly:
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def main(plan_file: str) -> None:
    with open(plan_file, encoding="utf-8") as f:
        plan = json.load(f)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    work = os.open(plan["work"], os.O_RDONLY | os.O_DIRECTORY)        # reachable after /tmp is covered
    out = os.open(plan["out"], os.O_RDONLY | os.O_DIRECTORY)
    for folder, keep in plan["rebuild"]:                             # parents first
        fds = {name: os.open(os.path.join(folder, name), os.O_RDONLY | os.O_DIRECTORY) for name in keep}
        mount("tmpfs", folder, "tmpfs", MS_NOSUID | MS_NODEV, "size=4k,mode=755")
        for name, fd in fds.items():
            os.mkdir(os.path.join(folder, name))
            bind(f"/proc/self/fd/{fd}", os.path.join(folder, name), readonly=True)
            os.close(fd)
    for folder in plan["hide_dirs"]:
        mount("tmpfs", folder, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=755")
    for file in plan["hide_files"]:
        bind("/dev/null", file, readonly=True)
    for folder in plan["readonly"]:
        bind(folder, folder, readonly=True)
    for folder in ("/tmp", "/dev/shm", "/var/tmp"):
        if os.path.isdir(folder) and folder not in plan["hide_dirs"]:
            mount("tmpfs", folder, "tmpfs", MS_NOSUID | MS_NODEV, f"size={plan['tmp_size']},mode=1777")
    os.makedirs(WORK)
    bind(f"/proc/self/fd/{work}", WORK, readonly=True)
    bind(f"/proc/self/fd/{out}", WORK + "/out", readonly=False)
    os.close(work)
    os.close(out)
    for name, value in plan["limits"].items():
        resource.setrlimit(LIMITS[name], (value, value))
    os.chdir(WORK)
    if plan["uid"] is not None:
        os.setgroups([])
        os.setgid(plan["gid"])
        os.setuid(plan["uid"])
    libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)           # a change of user cleared unshare's --kill-child
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    os.execve(plan["argv"][0], plan["argv"], plan["env"])


if __name__ == "__main__":
    main(sys.argv[1])
