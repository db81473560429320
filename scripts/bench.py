"""Benchmark grex_locks against raw flock, portalocker, filelock and fasteners.

    python scripts/bench.py [--quick] [--dir DIR] [--json] [--plot FILE.png] [--only SCENARIO ...]

Where it measures. Lock files live in a scratch directory made under ``--dir``
(default: the first of $TMPDIR or /tmp, /var/tmp, the current directory that is
on a disk file system). The file system's type is printed with every run, since
it changes the figures (an owner record's write costs about twice as much on
ext4 as on tmpfs); the bench refuses tmpfs and other memory file systems unless
``--allow-tmpfs`` is given, and then says so in the report.

How busy the machine was. The 1-minute load average is printed before and after
the run, and a warning given when it is above half the CPU count at the start.
During the run, every scenario also measures the CPU time the rest of the
machine used (all CPU time in /proc/stat less this run's own processes): a
scenario that shared the machine with someone else's test run is named in the
report. ``--wait-quiet SECONDS`` waits for the load to fall before starting.

The scenarios live in ``bench_scenarios.py`` (one function each), the libraries
behind the adapters of ``bench_peers.py``. The closing table lists every target
of issue 11 ("Where it stands") and of earlier issues, each with its grex_locks
figure, the peers' figures from the same run, and whether it was met. The
``floors`` scenario sets no target: it measures, in the same run, what bare
thread locks and raw flock allow at all (a first-come-first-served baton among
4 threads; 4 processes re-taking one flock after G µs between unlock and lock;
a raw flock hand-off whose waiter runs W µs of Python right after its wake-up),
the floors under the 4-thread, 4-process and hand-off targets; and it runs the
threads scenario's loop once more with its process pinned to one CPU, where no
hand-off between threads crosses CPUs. ``scripts/profile_handoff.py`` shows,
step by step, where a hand-off's time goes in the process that gets the lock.

The process exits non-zero when a lock let two holders in at once where it
promises not to, when a scenario failed, or when grex_locks could not be
imported.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench_peers import GREX_FINGERPRINT, GREX_IMPORT_ERROR, grex_locks, label
from bench_scenarios import CAVEAT, FULL, QUICK, SCENARIOS, Bench, Report

try:
    import psutil
except ImportError:  # only the share of CPU this run's worker processes used is lost
    psutil = None  # type: ignore[assignment]

#: File systems that keep files in memory: lock files there skip the disk's costs.
MEMORY_FS = frozenset({"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"})
#: A 1-minute load average above this many per CPU counts as a busy machine.
LOADED_PER_CPU = 0.5
#: CPU used by other processes during a scenario, per CPU, above which its figures are suspect.
OTHERS_PER_CPU = 0.25
PEER_DISTS = ("portalocker", "filelock", "fasteners", "psutil", "loguru")


# ---------------------------------------------------------------- the file system


@dataclass(frozen=True)
class FileSystem:
    """Where the lock files live, as the kernel's mount table says."""

    path: str
    fstype: str
    source: str
    mount_point: str
    options: str

    @property
    def in_memory(self) -> bool:
        return self.fstype in MEMORY_FS

    def describe(self) -> str:
        return f"{self.fstype} ({self.source} mounted at {self.mount_point}, {self.options})"


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (a space is written \\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _under(path: str, mount_point: str) -> bool:
    return mount_point in ("/", path) or path.startswith(mount_point + "/")


def file_system(path: Path) -> FileSystem:
    """The file system ``path`` is on: from /proc/self/mountinfo, else from ``stat -f``."""
    real = os.path.realpath(path)
    st_dev = os.stat(real).st_dev
    device = f"{os.major(st_dev)}:{os.minor(st_dev)}"
    best: tuple[bool, int, FileSystem] | None = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if "-" not in fields[6:]:
                continue
            sep = fields.index("-", 6)
            mount = _unescape(fields[4])
            if not _under(real, mount) or len(fields) < sep + 3:
                continue
            found = FileSystem(real, fields[sep + 1], _unescape(fields[sep + 2]), mount, fields[5])
            rank = (fields[2] == device, len(mount))
            if best is None or rank >= best[:2]:  # the later of two equal mounts is on top
                best = (*rank, found)
    if best is not None:
        return best[2]
    out = subprocess.run(
        ["stat", "-f", "-c", "%T", real], check=False, capture_output=True, text=True
    )
    return FileSystem(real, out.stdout.strip() or "unknown", "?", "?", "?")


def lock_dir(asked: Path | None, allow_memory: bool) -> tuple[Path, FileSystem]:
    """The directory to make the scratch directory in, and its file system; exit if refused."""
    if asked is not None:
        existing = asked.absolute()
        while not existing.exists():  # judge the file system before creating anything on it
            existing = existing.parent
        fs = file_system(existing)
        if fs.in_memory and not allow_memory:
            sys.exit(
                f"bench: {asked} is on {fs.fstype}, a memory file system: lock files there skip "
                "the disk's costs and flatter every library. Choose a directory on a disk file "
                "system, or pass --allow-tmpfs to measure there anyway."
            )
        asked.mkdir(parents=True, exist_ok=True)
        return asked, file_system(asked)
    candidates = [Path(tempfile.gettempdir()), Path("/var/tmp"), Path.cwd()]  # noqa: S108
    found = [(c, file_system(c)) for c in candidates if c.is_dir() and os.access(c, os.W_OK)]
    for candidate, fs in found:
        if not fs.in_memory:
            return candidate, fs
    if allow_memory and found:
        return found[0]
    sys.exit(
        "bench: no disk file system among "
        + ", ".join(f"{c} ({fs.fstype})" for c, fs in found)
        + "; pass --dir DIR on a disk, or --allow-tmpfs"
    )


# ---------------------------------------------------------------- how busy the machine is


@dataclass(frozen=True)
class CpuSample:
    wall: float
    busy: float  # seconds of CPU the whole machine spent running anything
    steal: float  # seconds the hypervisor gave our virtual CPUs to someone else
    own: float  # seconds of CPU this run's processes used


def _own_cpu() -> float:
    """CPU seconds of this process, its reaped children, and its live children."""
    times = os.times()
    total = times.user + times.system + times.children_user + times.children_system
    if psutil is not None:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    cpu = child.cpu_times()
                    total += cpu.user + cpu.system
    return total


def cpu_sample() -> CpuSample:
    try:
        with open("/proc/stat") as stat:
            ticks = [int(t) for t in stat.readline().split()[1:]] + [0] * 8
    except OSError:
        ticks = [0] * 8
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks[:8]
    hz = os.sysconf("SC_CLK_TCK")
    busy = (user + nice + system + irq + softirq) / hz
    return CpuSample(time.monotonic(), busy, steal / hz, _own_cpu())


def cpu_between(a: CpuSample, b: CpuSample) -> dict[str, float]:
    """Average CPUs in use between two samples: by this run, by everyone else, stolen."""
    wall = max(b.wall - a.wall, 1e-9)
    own = (b.own - a.own) / wall
    return {
        "seconds": round(wall, 1),
        "own_cpus": round(own, 2),
        "other_cpus": round(max(0.0, (b.busy - a.busy) / wall - own), 2),
        "steal_cpus": round((b.steal - a.steal) / wall, 2),
        "load1": round(os.getloadavg()[0], 2),
    }


def wait_quiet(limit: float, cpus: int) -> None:
    """Wait up to ``limit`` seconds for the 1-minute load to fall to half the CPU count."""
    quiet = LOADED_PER_CPU * cpus
    end = time.monotonic() + limit
    while os.getloadavg()[0] > quiet and time.monotonic() < end:
        load = os.getloadavg()[0]
        print(f"waiting for a quiet machine: load {load:.2f} > {quiet:.1f}", file=sys.stderr)
        time.sleep(10)


# ---------------------------------------------------------------- what ran


def _git(path: Path, *args: str) -> str:
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(path), *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def grex_source() -> str:
    """Which grex_locks was measured: its directory, commit, and uncommitted changes."""
    if grex_locks is None:
        return f"NOT IMPORTABLE ({GREX_IMPORT_ERROR})"
    # The source hash: every worker checks it imported the same (the tree may change mid-run).
    where = Path(str(grex_locks.__file__)).parent
    head = _git(where, "log", "-1", "--format=%h %cs")
    if not head:
        return f"{GREX_FINGERPRINT} (not in a git work tree)"
    dirty = _git(where, "status", "--porcelain", "--", ".").splitlines()
    return f"{GREX_FINGERPRINT} at {head}, {len(dirty)} uncommitted change(s) in it"


def machine(root: Path, fs: FileSystem) -> dict[str, Any]:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    grex_version = getattr(grex_locks, "__version__", None) or version("grex-locks")
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count() or 1,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "lock_dir": str(root),
        "file_system": asdict(fs),
        "load_before": os.getloadavg(),
        "grex_locks": grex_source(),
        "versions": {"grex-locks": grex_version} | {d: version(d) for d in PEER_DISTS},
    }


# ---------------------------------------------------------------- output


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  " + "  ".join(cells))
    return lines


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render(report: Report, info: dict[str, Any], loads: list[dict[str, Any]]) -> str:
    fs = info["file_system"]
    before, after = info["load_before"], info["load_after"]
    lines = [
        "grex_locks benchmark",
        f"  command: {info['command']}",
        f"  machine: {info['platform']}, {info['cpus']} CPUs, {info['python']}",
        f"  lock files: {info['lock_dir']} on {FileSystem(**fs).describe()}",
        f"  load average 1/5/15 min: {before[0]:.2f} / {before[1]:.2f} / {before[2]:.2f} "
        f"before, {after[0]:.2f} / {after[1]:.2f} / {after[2]:.2f} after (this run's own "
        f"processes included); {info['cpus']} CPUs",
        f"  other processes used {info['other_cpus']:.2f} CPUs on average during the run "
        f"(most in one scenario: {info['other_cpus_max']:.2f}); steal {info['steal_cpus']:.2f}",
        f"  grex_locks: {info['grex_locks']}",
        "  versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        f"  run took {info['seconds']} s; method: same machine, same run, same worker processes;"
        " repetitions interleaved across libraries; medians with p10-p90 (or min-max)",
    ]
    lines += ["", "Machine load per scenario (CPUs in use on average; 'others' = not this run)"]
    lines += _table(
        ["scenario", "seconds", "this run", "others", "steal", "load 1 min after"],
        [
            [
                row["scenario"],
                f"{row['seconds']:.1f}",
                f"{row['own_cpus']:.2f}",
                f"{row['other_cpus']:.2f}",
                f"{row['steal_cpus']:.2f}",
                f"{row['load1']:.2f}",
            ]
            for row in loads
        ],
    )
    for i, sec in enumerate(report.sections, 1):
        lines += ["", f"{i}. {sec.title}"]
        lines += textwrap.wrap(sec.method, 100, initial_indent="  (", subsequent_indent="   ")
        lines[-1] += ")"
        if sec.rows:
            lines += _table(sec.header, sec.rows)
        lines += [f"  note: {note}" for note in sec.notes]
    lines += ["", "Where it stands: the targets of issue 11 (and of earlier issues), same run", ""]
    verdicts = {True: "met", False: "**MISSED**", None: "not measured"}
    lines += _markdown(
        ["figure", "grex_locks", "peers, same run", "measured", "target", "met?"],
        [
            [t.figure, t.grex, t.peers, t.measured, t.target, verdicts[t.met]]
            for t in report.targets
        ],
    )
    lines += ["", *textwrap.wrap("Caveat: " + CAVEAT, 100)]
    for note in report.notes:
        lines += ["", *textwrap.wrap("WARNING: " + note, 100)]
    if report.failures:
        lines += ["", "FAILURES:"] + [f"  {f}" for f in report.failures]
    return "\n".join(lines)


def plot(report: Report, path: Path, caption: str, counts: Sequence[int]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5), layout="constrained")
    hand = report.section("handoff")
    if hand and hand.data:
        keys = list(hand.data)
        colors = ["tab:orange" if k.startswith("grex") else "tab:blue" for k in keys]
        medians = [hand.data[k]["median"] * 1e3 for k in keys]
        left.barh([label(k) for k in keys], medians, color=colors)
        left.set_xscale("log")
        left.set_xlabel("median handoff latency, ms (log scale; lower is better)")
        left.invert_yaxis()
        left.set_title("Handoff: holder releases -> waiter has the lock")
    cont = report.section("contention")
    if cont and cont.data:
        keys = list(dict.fromkeys(k.split("@")[0] for k in cont.data))
        width = 0.8 / len(counts)
        for j, n in enumerate(counts):
            xs = [i + j * width for i in range(len(keys))]
            right.bar(
                xs,
                [cont.data[f"{k}@{n}"]["cycles_per_s"] for k in keys],
                width,
                label=f"{n} processes",
            )
        right.set_xticks(
            [i + width for i in range(len(keys))], [label(k) for k in keys], rotation=30, ha="right"
        )
        right.set_yscale("log")
        right.set_ylabel("cycles/s (log scale; higher is better)")
        right.set_title("Contended throughput (zero think time)")
        right.legend()
    fig.suptitle(caption, fontsize="small")
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}", file=sys.stderr)


# ---------------------------------------------------------------- running


def run(b: Bench, scenarios: Sequence[Callable[[Bench], None]]) -> list[dict[str, Any]]:
    """Run each scenario; return how busy the machine was during each."""
    loads = []
    for i, scenario in enumerate(scenarios, 1):
        name = scenario.__name__
        print(f"[{i}/{len(scenarios)}] {name} ...", file=sys.stderr, flush=True)
        start = cpu_sample()
        try:
            scenario(b)
        except Exception as exc:  # noqa: BLE001 - one broken scenario must not hide the others
            b.report.fail(f"scenario {name} failed: {type(exc).__name__}: {exc}")
            b.drop_workers()
        load = {"scenario": name} | cpu_between(start, cpu_sample())
        loads.append(load)
        print(
            f"      {load['seconds']:.1f} s; CPUs used by this run {load['own_cpus']:.2f}, "
            f"by other processes {load['other_cpus']:.2f}, stolen {load['steal_cpus']:.2f}",
            file=sys.stderr,
            flush=True,
        )
    return loads


def judge_load(report: Report, info: dict[str, Any], loads: list[dict[str, Any]]) -> None:
    """Warn about every sign that the machine was shared during the run."""
    cpus = info["cpus"]
    if info["load_before"][0] > LOADED_PER_CPU * cpus:
        report.notes.append(
            f"the machine was loaded when the run began (1-minute load {info['load_before'][0]:.2f}"
            f" > {LOADED_PER_CPU} x {cpus} CPUs): figures and ratios may be off; rerun when quiet "
            "(--wait-quiet)"
        )
    busy = [row for row in loads if row["other_cpus"] > OTHERS_PER_CPU * cpus]
    if busy:
        report.notes.append(
            "other processes used the CPUs during "
            + ", ".join(f"{row['scenario']} ({row['other_cpus']:.2f} CPUs)" for row in busy)
            + f" (threshold {OTHERS_PER_CPU * cpus:.2f}): those figures are unreliable"
        )
    stolen = [row for row in loads if row["steal_cpus"] > OTHERS_PER_CPU * cpus]
    if stolen:
        report.notes.append(
            "the hypervisor gave our CPUs away during "
            + ", ".join(f"{row['scenario']} ({row['steal_cpus']:.2f} CPUs)" for row in stolen)
        )
    if info["file_system"]["fstype"] in MEMORY_FS:
        report.notes.append(
            f"lock files were on {info['file_system']['fstype']} (--allow-tmpfs): a memory file "
            "system, cheaper than the disk grex's packs live on; do not quote these figures"
        )
    if grex_locks is None:
        report.fail(f"grex_locks could not be imported: {GREX_IMPORT_ERROR}")


@contextlib.contextmanager
def scratch(base: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="grex-bench-", dir=base) as tmp:
        yield Path(tmp)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run under a minute")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="draw handoff and throughput")
    parser.add_argument(
        "--only", nargs="+", choices=[s.__name__ for s in SCENARIOS], help="run only these"
    )
    parser.add_argument(
        "--dir", type=Path, help="where the lock files go (default: a disk file system)"
    )
    parser.add_argument(
        "--allow-tmpfs", action="store_true", help="measure on a memory file system anyway"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help=f"first wait up to SECONDS for the 1-min load to fall to {LOADED_PER_CPU} x CPUs",
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    scenarios = [s for s in SCENARIOS if not args.only or s.__name__ in args.only]
    base, fs = lock_dir(args.dir, args.allow_tmpfs)
    cpus = os.cpu_count() or 1
    if args.wait_quiet:
        wait_quiet(args.wait_quiet, cpus)
    load = os.getloadavg()[0]
    print(f"lock files under {base}: {fs.describe()}", file=sys.stderr)
    print(f"load average (1 min) {load:.2f} on {cpus} CPUs", file=sys.stderr)
    if load > LOADED_PER_CPU * cpus:
        print(
            f"WARNING: the machine is loaded ({load:.2f} > {LOADED_PER_CPU} x {cpus} CPUs): "
            "the figures will be noisy",
            file=sys.stderr,
        )
    if grex_locks is None:
        print(f"WARNING: grex_locks is not importable: {GREX_IMPORT_ERROR}", file=sys.stderr)
    began = cpu_sample()
    with scratch(base) as root:
        info = machine(root, fs)
        info["command"] = "python scripts/bench.py " + " ".join(
            sys.argv[1:] if argv is None else argv
        )
        b = Bench(settings, root)
        try:
            loads = run(b, scenarios)
        finally:
            b.drop_workers()
        whole = cpu_between(began, cpu_sample())
        info |= {"load_after": os.getloadavg(), "seconds": round(whole["seconds"])}
        info |= {"other_cpus": whole["other_cpus"], "steal_cpus": whole["steal_cpus"]}
        info["other_cpus_max"] = max((row["other_cpus"] for row in loads), default=0.0)
        print(f"total {info['seconds']} s", file=sys.stderr)
        judge_load(b.report, info, loads)
        publish(args, b.report, info, loads)
        print(f"removing {root} ...", file=sys.stderr, flush=True)
    return 1 if b.report.failures else 0


def publish(
    args: argparse.Namespace, report: Report, info: dict[str, Any], loads: list[dict[str, Any]]
) -> None:
    """Print the report (table or JSON) and draw the plot, if asked."""
    settings = QUICK if args.quick else FULL
    if args.json:
        out: dict[str, Any] = {"machine": info, "settings": asdict(settings), "load": loads}
        out |= {"sections": {s.key: s.data | {"notes": s.notes} for s in report.sections}}
        out |= {"targets": [asdict(t) for t in report.targets], "failures": report.failures}
        out |= {"warnings": report.notes}
        print(json.dumps(out, indent=2, default=str), flush=True)
    else:
        print(render(report, info, loads), flush=True)
    if args.plot:
        caption = (
            f"{info['command']}  |  {info['platform']}, {info['cpus']} CPUs, {info['python']}, "
            f"lock files on {info['file_system']['fstype']}"
        )
        plot(report, args.plot, caption, settings.process_counts)


if __name__ == "__main__":
    sys.exit(main())
