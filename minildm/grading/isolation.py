"""How `minildm grade` runs student code: in a worker process walled off as far as this machine allows.

Three levels, the best available is used and named in the report:

    root      as root: fresh mount/PID/network/IPC namespaces (launch.py), the worker runs under an unprivileged
              user id of its own (worker_user); it sees the system's folders and Python read-only, the grading
              folder read-only (but for out/), and nothing else: no reference, no tests, no student folder, no
              home folders
    userns    without root but with user namespaces: the same namespaces, but the worker keeps your user id
              (files it can still see are only the system's and Python's, mounted read-only)
    none      a plain child process with resource limits: student code can read and write whatever you can

In every level: resource limits (address space, CPU seconds, processes, open files, file size, no core files) and
a clean environment (no inherited secrets). With namespaces, every process the worker starts dies with it (it is
pid 1 of its PID namespace), and it has no network.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import resource
import shutil
import site
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = "/tmp/work"                 # where launch.py mounts the grading folder inside the namespaces
KEEP_AT_ROOT = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "dev", "proc", "sys", "tmp"}
NAMESPACES = ["--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "--net", "--ipc"]
DESCRIPTIONS = {
    "root": "root: namespaces (mount, PID, network, IPC), a dedicated unprivileged user id, read-only view without the "
            "reference, the tests or the student's folder, resource limits",
    "userns": "user namespace: namespaces (mount, PID, network, IPC) and resource limits, but student code runs "
              "with your user id",
    "none": "none: a plain child process with resource limits",
}
WARNINGS = {
    "root": "",
    "userns": "grading without root: student code ran in a user namespace with your user id; it could not see the "
              "reference or the tests, but grade as root for the full isolation",
    "none": "NO ISOLATION: neither root nor user namespaces were available, so student code ran as you, could "
            "read the reference and the tests and could forge its grade; do not use these grades for marks",
}


@dataclass(frozen=True)
class Limits:
    address_space: int = 4 << 30     # bytes: torch needs about 2 GiB of address space to start
    cpu_seconds: int = 1800          # the whole worker's CPU time; each test is also held to --timeout
    processes: int = 256             # threads count too (torch starts one per core)
    open_files: int = 256
    file_size: int = 64 << 20        # bytes, per file written
    tmp_size: str = "64m"

    def rlimits(self, processes: int) -> dict[str, int]:
        return {"as": self.address_space, "cpu": self.cpu_seconds, "nproc": processes,
                "nofile": self.open_files, "fsize": self.file_size, "core": 0}


@functools.lru_cache(maxsize=1)
def available_level() -> str:
    """The best isolation this machine allows (probed once: `unshare` with and without a user namespace)."""
    if os.name != "posix" or shutil.which("unshare") is None:
        return "none"
    tries = ([("root", [])] if os.geteuid() == 0 else []) + [("userns", ["--user", "--map-root-user"])]
    for level, extra in tries:
        probe = subprocess.run(["unshare", *extra, *NAMESPACES, "true"], capture_output=True, timeout=30, check=False)
        if probe.returncode == 0:
            return level
    return "none"


def essential_paths() -> list[str]:
    """Folders Python and its packages live in: kept visible (read-only) in the worker."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
             *site.getsitepackages()}
    for entry in sys.path:                      # installed packages only: not the tests' folder, not the reference
        if entry.endswith(("site-packages", "dist-packages")) and os.path.isdir(entry):
            paths.add(entry)
    found = {os.path.realpath(p) for p in paths if os.path.isdir(p) and os.path.realpath(p) != "/"}
    return sorted(p for p in found if not any(p.startswith(q + "/") for q in found))    # the outermost only


def hidden_paths(essential: list[str]) -> tuple[list[str], list[str], list[tuple[str, list[str]]]]:
    """What the worker must not see: (folders, files) to cover, and the folders to rebuild.

    A top-level entry of / is covered unless it is a system folder or leads to an essential one; a folder that
    leads to an essential one (/root for ~/.pyenv) is rebuilt: an empty tmpfs with only the ways to the essential
    folders bound into it (so /root's mode does not matter and nothing else of it shows). minildm's own install
    in site-packages is covered too."""
    dirs, files, rebuild = [], [], []

    def leads(path: str) -> bool:
        return any(e.startswith(path + "/") for e in essential)

    for entry in sorted(os.scandir("/"), key=lambda e: e.name):
        if entry.is_symlink() or entry.name in KEEP_AT_ROOT or entry.path in essential or leads(entry.path):
            continue
        (dirs if entry.is_dir() else files).append(entry.path)
    ancestors = sorted({str(p) for e in essential for p in Path(e).parents if leads(str(p)) and str(p) != "/"},
                       key=lambda p: p.count("/"))
    for folder in ancestors:
        if folder.split("/")[1] in KEEP_AT_ROOT:
            continue
        keep = sorted({e[len(folder) + 1:].split("/")[0] for e in essential if e.startswith(folder + "/")})
        rebuild.append((folder, keep))
    for packages in site.getsitepackages():            # an installed minildm (or its editable finder) names the tree
        if os.path.isdir(packages):
            for entry in os.scandir(packages):
                if "minildm" in entry.name and not entry.is_symlink():
                    (dirs if entry.is_dir() else files).append(entry.path)
    return dirs, files, rebuild


def clean_env(root: str) -> dict[str, str]:
    """Only what the worker needs: no tokens, keys or paths of the grader's environment."""
    env = {"PATH": os.pathsep.join([os.path.dirname(sys.executable), "/usr/bin", "/bin"]), "HOME": "/tmp",
           "LANG": "C.UTF-8", "PYTHONPATH": root, "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1",
           "MINILDM_DEVICE": os.environ.get("MINILDM_DEVICE", "cpu")}
    return env


def own_processes() -> int:
    """How many processes and threads this user runs now (RLIMIT_NPROC counts them all, not only the worker's)."""
    uid, count = os.getuid(), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue
    return count


@dataclass
class Sandbox:
    """The grading folder: `work` is what the worker sees (read-only), `out` the one folder it may write."""

    trusted: Path          # the grader's own folder (plans); never visible to the worker
    work: Path
    level: str
    limits: Limits = Limits()
    user: tuple[int, int] | None = None       # (uid, gid) of the worker at level root, chosen once per grading

    def __post_init__(self):
        if self.level == "root" and self.user is None:
            self.user = worker_user()

    @property
    def out(self) -> Path:
        return self.work / "out"

    @property
    def root(self) -> str:
        """The grading folder's path as the worker sees it."""
        return WORK if self.level != "none" else str(self.work)

    def seal(self) -> None:
        """Give the work folder to root, readable by all; out/ to the worker's user alone."""
        for path in [self.work, *self.work.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        self.out.mkdir(exist_ok=True)
        if self.level == "root":
            os.chown(self.out, *self.user)
            self.out.chmod(0o700)
            self.work.parent.chmod(0o711)         # the worker may pass through to work/, not list it

    def command(self, argv: list[str], name: str) -> tuple[list[str], dict | None, callable | None]:
        """(argv, env, preexec_fn) that run `argv` (a command inside the worker) at this sandbox's level."""
        if self.level == "none":
            limits = self.limits.rlimits(own_processes() + self.limits.processes)

            def preexec():
                for key, value in limits.items():
                    resource.setrlimit(getattr(resource, f"RLIMIT_{key.upper()}"), (value, value))
            return argv, clean_env(self.root), preexec
        essential = essential_paths()
        dirs, files, rebuild = hidden_paths(essential)
        processes = self.limits.processes + (own_processes() if self.level == "userns" else 0)
        uid, gid = self.user if self.level == "root" else (None, None)
        plan = {"work": str(self.work), "out": str(self.out), "hide_dirs": dirs, "hide_files": files,
                "rebuild": rebuild, "readonly": essential, "tmp_size": self.limits.tmp_size,
                "limits": self.limits.rlimits(processes),
                "uid": uid, "gid": gid, "argv": argv, "env": clean_env(self.root)}
        plan_file = self.trusted / f"plan-{name}.json"
        plan_file.write_text(json.dumps(plan))
        user = [] if self.level == "root" else ["--user", "--map-root-user"]
        return (["unshare", *user, *NAMESPACES, sys.executable, "-E", "-s", str(HERE / "launch.py"),
                 str(plan_file)], None, None)


def worker_user(first: int = 60000, count: int = 5000) -> tuple[int, int]:
    """A user and group id of the worker's own: no account has it and no process runs as it, so the worker owns
    no file and RLIMIT_NPROC counts only its processes (with the shared `nobody`, a fork bomb in one grading would
    starve another). Chosen in 60000-64999 (ids every system can map), from this process's id; `nobody` if all
    are taken."""
    busy = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            busy.add(os.stat(f"/proc/{pid}").st_uid)
        except OSError:
            continue
    for offset in range(count):
        uid = first + (os.getpid() + offset) % count
        try:
            pwd.getpwuid(uid)
            continue
        except KeyError:
            pass
        if uid not in busy:
            return uid, uid
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534
