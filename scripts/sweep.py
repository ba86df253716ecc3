"""Run a grid of continual pre-training runs, each a resumable scripts/train.py run.

    python scripts/sweep.py --config configs/demo_scaling.py --workdir sweeps/scaling \
        --grid model=tiny,small,base --grid replay.rate=0,0.25,0.5 --grid seed=0,1 \
        [--parallel 2] [--match flops --budget median] [--config.KEY=VALUE ...] [--print]

Each --grid KEY=V1,V2,... is one axis; the sweep runs the product of the axes, one point
per combination, in WORKDIR/<point> (e.g. model-tiny_replay.rate-0.25_seed-0).
``model=NAME`` picks a shape preset of cpt_jax/presets.py (tiny, small, base at demo
scale; 99m, 560m, 1b for accelerators); any other KEY is a config key, as in train.py's
--config.KEY=VALUE. --config.KEY=VALUE given to the sweep applies to every point.

Points whose results.json is complete are skipped; points that were interrupted resume from
their checkpoints. So after a crash, a kill or a preemption, the same command finishes the
sweep without redoing finished work. A point that fails (bad value, divergence) is recorded
with its error in WORKDIR/index.json and the sweep goes on; the exit status is 1 if any
point failed. Each point's output goes to WORKDIR/<point>/train.log. Ctrl-C or SIGTERM
asks the running points to save and stop (train.py's preemption path), then exits.

--match flops rescales every point's task budgets (all tasks of a point by one factor) so
that every point spends the same training FLOPs: --budget min, max or median of the
points' FLOPs at the configured budgets, or a number. The FLOPs are counted as the run and
scripts/benchmark.py count them.

--print writes WORKDIR/index.json and prints one train.py command per unfinished point
instead of running them, for a cluster scheduler; scripts/analyze_sweep.py WORKDIR reads
the results wherever the commands ran, once their workdirs are under WORKDIR.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import time

from cpt_jax import cli
from cpt_jax import sweep as sweep_lib

POLL_S = 0.5
STOP_GRACE_S = 300  # how long a stopping run may take to save before it is killed


def parse_args(argv):
    overrides, rest = cli.split_overrides(argv)
    ap = cli.config_parser("sweep.py", __doc__)
    ap.add_argument("--workdir", required=True, help="the sweep's directory")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="one axis of the grid (repeat for more axes)")
    ap.add_argument("--parallel", type=int, default=1, help="runs at a time (default 1)")
    ap.add_argument("--match", choices=["none", "flops"], default="none",
                    help="flops: rescale task budgets so every point spends the same FLOPs")
    ap.add_argument("--budget", default="median",
                    help="with --match flops: min, max, median (default) or a FLOPs number")
    ap.add_argument("--print", action="store_true", dest="print_only",
                    help="print one command per unfinished point instead of running them")
    args = ap.parse_args(rest)
    if not args.grid:
        ap.error("give at least one --grid KEY=V1,V2,...")
    if args.parallel < 1:
        ap.error(f"--parallel {args.parallel}: must be >= 1")
    return args, overrides


def plan(args, shared) -> tuple[list, dict]:
    """The points, each validated (a bad key or value stops the sweep before any run)."""
    axes = [sweep_lib.parse_axis(g) for g in args.grid]
    points = sweep_lib.expand_grid(axes)
    budget = None
    if args.match == "flops":
        budget = sweep_lib.match_flops(args.config, shared, points, args.budget)
    for p in points:
        config = sweep_lib.point_config(args.config, shared, p)
        if p.flops is None:
            try:
                p.flops = sweep_lib.config_flops(config)
            except (ValueError, KeyError, TypeError):
                p.flops = None  # the run itself will report what is wrong
    index = {"config": args.config, "grid": axes,
             "shared_overrides": dict(shared), "match": args.match,
             "flops_budget": budget, "points": [p.to_json() for p in points]}
    return points, index


def _die_with_parent():
    """Child side of Popen: on Linux, get SIGTERM (save and stop) if the sweep dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _lock(sweep_dir: str) -> int:
    """Hold WORKDIR/.lock for as long as this sweep or any of its runs lives (the runs
    inherit the descriptor), so a second sweep of the same directory waits for them."""
    fd = os.open(os.path.join(sweep_dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"sweep: waiting for the runs of another sweep of {sweep_dir} to stop",
              file=sys.stderr, flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f.read()[-20000:].splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("error:") or "Error" in ln]
    return (errors or lines or [""])[-1]


def _eta(started: float, done_cost: float, left_cost: float) -> str:
    if done_cost <= 0:
        return "time left unknown until a point finishes"
    s = (time.time() - started) / done_cost * left_cost
    return f"about {s / 60:.0f} min left" if s >= 90 else f"about {s:.0f} s left"


class Runner:
    """Runs the points, at most ``parallel`` at a time, and keeps the index current."""

    def __init__(self, args, shared, points, index, lock_fd):
        self.args, self.shared, self.points, self.index = args, shared, points, index
        self.entries = {e["name"]: e for e in index["points"]}
        self.lock_fd, self.running, self.stopping = lock_fd, {}, False
        known = all(p.flops for p in points)
        self.cost = {p.name: (p.flops if known else 1.0) for p in points}

    def save(self):
        sweep_lib.write_index(self.args.workdir, self.index)

    def progress(self, started, done_cost):
        statuses = [e["status"] for e in self.index["points"]]
        left = sum(self.cost[e["name"]] for e in self.index["points"]
                   if e["status"] not in ("done", "failed"))
        print(f"sweep: {statuses.count('done')}/{len(statuses)} done, "
              f"{statuses.count('failed')} failed, {len(self.running)} running; "
              f"{_eta(started, done_cost, left)}", flush=True)

    def start(self, point):
        workdir = os.path.join(self.args.workdir, point.name)
        os.makedirs(workdir, exist_ok=True)
        log = open(os.path.join(workdir, "train.log"), "a")
        argv = sweep_lib.point_command(self.args.config, self.shared, point, self.args.workdir)
        log.write(f"$ {sweep_lib.shell_line(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent,
                                pass_fds=(self.lock_fd,))
        log.close()
        self.running[point.name] = (proc, time.time())
        self.entries[point.name].update(status="running", error=None)
        self.save()

    def finish(self, name, rc):
        _, t0 = self.running.pop(name)
        entry = self.entries[name]
        workdir = os.path.join(self.args.workdir, name)
        entry["seconds"] = round(entry.get("seconds") or 0.0) + round(time.time() - t0)
        if sweep_lib.is_complete(workdir):
            entry.update(status="done", error=None)
        elif rc == 0 or self.stopping:
            entry.update(status="interrupted", error=None)
        else:
            entry.update(status="failed",
                         error=f"exit status {rc}: {_last_line(os.path.join(workdir, 'train.log'))}")
            print(f"sweep: {name} failed ({entry['error']})", file=sys.stderr, flush=True)
        self.save()
        return entry["status"]

    def fill(self, todo):
        while todo and len(self.running) < self.args.parallel and not self.stopping:
            self.start(todo.pop(0))

    def stop(self, signum, frame):
        self.stopping = True
        for proc, _ in self.running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        todo = []
        for p in self.points:
            if sweep_lib.is_complete(os.path.join(self.args.workdir, p.name)):
                self.entries[p.name]["status"] = "done"
            else:
                todo.append(p)
        self.save()
        started, done_cost = time.time(), 0.0
        self.progress(started, done_cost)
        previous = {s: signal.signal(s, self.stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while todo or self.running:
                self.fill(todo)
                time.sleep(POLL_S)
                finished = False
                for name, (proc, t0) in list(self.running.items()):
                    rc = proc.poll()
                    if rc is None and self.stopping and time.time() - t0 > STOP_GRACE_S:
                        proc.kill()
                    if rc is None:
                        continue
                    finished = True
                    if self.finish(name, rc) == "done":
                        done_cost += self.cost[name]
                if finished:
                    self.fill(todo)
                    self.progress(started, done_cost)
                if self.stopping and not self.running:
                    break
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self.stopping:
            print("sweep: stopped; run the same command to finish it", file=sys.stderr)
            return 130
        failed = [e["name"] for e in self.index["points"] if e["status"] == "failed"]
        if failed:
            print(f"sweep: {len(failed)} point(s) failed: {', '.join(failed)} (errors in "
                  f"{os.path.join(self.args.workdir, sweep_lib.INDEX_FILE)})", file=sys.stderr)
        return 1 if failed else 0


def main(argv) -> int:
    args, shared = parse_args(argv)
    points, index = plan(args, shared)
    os.makedirs(args.workdir, exist_ok=True)
    previous = sweep_lib.read_index(args.workdir) or {}
    seconds = {e["name"]: e.get("seconds") for e in previous.get("points", [])}
    for entry in index["points"]:
        entry.update(status="pending", error=None, seconds=seconds.get(entry["name"]))
    if args.print_only:
        sweep_lib.write_index(args.workdir, index)
        for p in points:
            if not sweep_lib.is_complete(os.path.join(args.workdir, p.name)):
                print(sweep_lib.shell_line(sweep_lib.point_command(
                    args.config, shared, p, args.workdir, python="python")))
        return 0
    lock_fd = _lock(args.workdir)
    try:
        return Runner(args, shared, points, index, lock_fd).run()
    finally:
        os.close(lock_fd)


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
