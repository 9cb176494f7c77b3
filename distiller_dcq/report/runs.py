"""Running Distiller's compress_classifier.py: following its log while it trains, reading its results,
and writing its command so that a reader on another machine can run it."""
import datetime
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - "
_EPOCH_STARTS = _STAMP + r"Training epoch:"


def _seconds(stamp):
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def parse_distiller_log(text):
    """From a compress_classifier log file: per-epoch validation top-1 and training seconds (from the
    log's timestamps, validation excluded), the final test top-1, DCQ's stitched-network top-1s."""
    starts = [_seconds(s) for s in re.findall(_EPOCH_STARTS, text, re.M)]
    ends = [_seconds(s) for s in re.findall(_STAMP + r"--- validate \(epoch=\d+\)", text, re.M)]
    tested = text.split("--- test ---")
    top1 = [float(v) for v in re.findall(r"==> Top1: ([\d.]+)", tested[0])]
    test = re.findall(r"==> Top1: ([\d.]+)", tested[1]) if len(tested) > 1 else []
    return {"train_seconds": [e - s for s, e in zip(starts, ends)], "val_top1": top1,
            "test_top1": float(test[-1]) if test else None,
            "stitched_top1": [float(s) for s in re.findall(r"stitched network validation Top1: ([\d.]+)", text)]}


def epochs_started(text):
    """How many training epochs a compress_classifier log (complete or still growing) has started."""
    return len(re.findall(_EPOCH_STARTS, text, re.M))


DEVICES = ("auto", "cpu", "cuda")


def add_device_options(parser, what="each run"):
    """``--device`` and ``--workers``, as every results tool takes them."""
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where to train and test (auto, the default: cuda when torch sees a GPU, else cpu)")
    parser.add_argument("--workers", type=int, help=f"data-loader processes of {what} (default: 0 on the CPU, "
                                                    "the CPUs shared out among the jobs on CUDA)")


def resolve_device(requested, workers, jobs=1, gpu_available=None):
    """(device, workers): ``auto`` made ``cuda`` or ``cpu``; ``cuda`` without a GPU and negative ``workers``
    refused (``ValueError``); ``workers`` None: 0 on the CPU (the measured setting: one process a run),
    on CUDA each of the ``jobs`` runs gets its share of the CPUs, one left for its own process."""
    import torch
    gpu_available = torch.cuda.is_available() if gpu_available is None else gpu_available
    if requested == "cuda" and not gpu_available:
        raise ValueError("--device cuda, but torch sees no GPU (torch.cuda.is_available() is False): use "
                         "--device cpu, or auto")
    device = ("cuda" if gpu_available else "cpu") if requested == "auto" else requested
    if workers is None:
        workers = 0 if device == "cpu" else max(1, (os.cpu_count() or 2) // max(1, jobs) - 1)
    if workers < 0:
        raise ValueError(f"--workers is a number of data-loader processes (>= 0), got {workers}")
    return device, workers


def same_run(cmd, other):
    """Whether two commands run the same training: equal but for ``-j``/``--workers`` (loader processes, which
    the defaults tie to --jobs and the machine's CPUs), so that a study resumed another way reuses its runs."""
    def without_workers(c):
        c = [str(part) for part in c]
        return [part for i, part in enumerate(c) if part not in ("-j", "--workers")
                and (i == 0 or c[i - 1] not in ("-j", "--workers"))]
    return without_workers(cmd) == without_workers(other)


def device_options(device, workers):
    """compress_classifier.py's options to run on ``device`` (its default is every GPU it sees)."""
    return (["--cpu"] if device == "cpu" else []) + ["-j", str(workers)]


def device_description(device):
    """The machine the runs used, for a results file: the GPU's name on CUDA."""
    import platform
    import torch
    if device == "cuda":
        return f"torch {torch.__version__} on CUDA ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} GPU(s))"
    return f"torch {torch.__version__} on CPU ({platform.machine()}, {os.cpu_count()} cores)"


def with_pythonpath(directory, environ=None):
    """A copy of ``environ`` (default: this process's) with ``directory`` first on PYTHONPATH."""
    environ = dict(os.environ if environ is None else environ)
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(directory), environ.get("PYTHONPATH")]))
    return environ


def portable_paths(text, places):
    """``text`` with this machine's absolute paths written as another machine can follow them.

    ``places`` maps an absolute path to how to write it: e.g. the interpreter -> ``python``, Distiller's
    source -> ``$DISTILLER_SRC``, a path the user typed -> as typed, and ``""`` for the directory the
    commands run from (paths inside it become relative). The longest matching path wins."""
    places = {str(path).rstrip("/"): written for path, written in places.items() if str(path).rstrip("/")}
    if not places:
        return text
    pattern = re.compile(r"(?<![\w./-])(" + "|".join(map(re.escape, sorted(places, key=len, reverse=True)))
                         + r")(/|(?![\w.-]))")

    def write(match):
        written, slash = places[match[1]], match[2]
        return written + slash if written else ("" if slash else ".")
    return pattern.sub(write, text)


def _newest_log(out_dir, name, since=0.0):
    logs = [p for p in Path(out_dir).glob(f"{name}___*/*.log") if p.stat().st_mtime >= since]
    return max(logs, key=os.path.getmtime, default=None)


def _wait_following_log(process, out_dir, name, since, on_epoch, poll_seconds):
    """Wait for ``process``; return its wait status and resource usage. Meanwhile call ``on_epoch(k)``
    whenever its log shows that training epoch k (1-based) has started."""
    shown = 0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            return status, usage
        log = _newest_log(out_dir, name, since) if on_epoch else None
        started = epochs_started(log.read_text()) if log else 0
        if started > shown:
            shown = started
            on_epoch(started)
        time.sleep(poll_seconds)


def run_compress_classifier(cmd, out_dir, name, rerun=False, log=print, env=None, on_epoch=None, poll_seconds=1.0):
    """Run ``cmd`` (a compress_classifier.py command writing its logs under ``out_dir`` with
    ``--name name``) in environment ``env`` and return the parsed log plus wall seconds and peak RSS
    (MiB) of that process; ``on_epoch(k)`` hears of each epoch it starts. A finished run of the same
    command found in ``out_dir`` is reused unless ``rerun``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(c) for c in cmd]
    cached = out_dir / "result.json"
    if cached.exists() and not rerun:
        result = json.loads(cached.read_text())
        if same_run(result["cmd"], cmd):
            log(f"[{time.strftime('%H:%M:%S')}] {name}: finished earlier, reusing {cached}")
            return result
    start = time.time()
    with open(out_dir / "stderr.txt", "w") as stderr:  # a file, not a pipe: a full pipe would block the run
        process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, cwd=out_dir, env=env)
        status, usage = _wait_following_log(process, out_dir, name, start, on_epoch, poll_seconds)
    returncode = os.waitstatus_to_exitcode(status)
    if returncode != 0:
        lines = (out_dir / "stderr.txt").read_text().strip().splitlines() or ["no message"]
        log(f"    {name} FAILED (exit {returncode}): {lines[-1]}")
        return {"failed": f"exit {returncode}: {lines[-1]}", "cmd": cmd}
    result = {**parse_distiller_log(_newest_log(out_dir, name).read_text()), "seconds": time.time() - start,
              "peak_mib": usage.ru_maxrss / 1024, "cmd": cmd}
    cached.write_text(json.dumps(result))
    log(f"    {name}: test top-1 {result['test_top1']}  val {result['val_top1']}  train s/epoch "
        f"{[round(s) for s in result['train_seconds']]}  peak {result['peak_mib']:.0f} MiB")
    return result


def exit_if_any_failed(results, runs_dir):
    """Stop with a message naming the runs of ``results`` (name -> result) that failed, if any."""
    failed = [name for name, result in results.items() if "failed" in result]
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(failed)} (their stderr.txt under {runs_dir})")


class Progress:
    """Says how far a series of runs has got: runs done of the total, the runs in flight and their epochs,
    and the time left, estimated from the epochs trained so far (reused runs train none). Several runs may
    be in flight at once (``jobs`` of them, from as many threads)."""

    def __init__(self, runs, say=lambda message: print(message, flush=True), jobs=1):
        """``runs``: (name, epochs, fraction of the training set per epoch) of every run, in order."""
        self.runs = {name: (int(epochs), float(fraction)) for name, epochs, fraction in runs}
        self.say, self.jobs = say, jobs
        self.left_work = sum(e * f for e, f in self.runs.values())  # in epochs over the full training set
        self.trained_work = self.trained_seconds = 0.0  # summed over runs, each timed alone
        self.done = 0
        self.in_flight = {}  # name -> [start time, epoch started, when it started]
        self.lock = threading.Lock()

    def start(self, name):
        with self.lock:
            self.in_flight[name] = [time.time(), 0, time.time()]
            self._report()

    def on_epoch(self, name, epoch):
        with self.lock:
            self.in_flight[name][1:] = epoch, time.time()
            self._report()

    def finish(self, name):
        with self.lock:
            started, epoch, _ = self.in_flight.pop(name)
            epochs, fraction = self.runs[name]
            if epoch:  # it trained here (not reused): its time tells the pace
                self.trained_work += epochs * fraction
                self.trained_seconds += time.time() - started
            self.left_work -= epochs * fraction
            self.done += 1

    def _report(self):
        now = time.time()
        # per run in flight: its epochs already trained and the seconds they took (the current one's not yet)
        flying = [(max(epoch - 1, 0) * self.runs[name][1], epoch_started - started if epoch > 1 else 0.0)
                  for name, (started, epoch, epoch_started) in self.in_flight.items()]
        in_flight = sum(work for work, _ in flying)
        work, seconds = self.trained_work + in_flight, self.trained_seconds + sum(s for _, s in flying)
        eta = ""
        if work:
            left = seconds / work * (self.left_work - in_flight) / min(self.jobs, len(self.runs) - self.done)
            eta = f"; about {_duration(left)} left (done near {time.strftime('%a %H:%M', time.localtime(now + left))})"
        now_running = " and ".join(name + (f", epoch {epoch} of {self.runs[name][0]}" if epoch else "")
                                   for name, (_, epoch, _) in self.in_flight.items())
        self.say(f"[{time.strftime('%H:%M:%S')}] {self.done} of {len(self.runs)} runs done; now {now_running}{eta}")


def _duration(seconds):
    minutes = max(1, round(seconds / 60))
    return f"{minutes // 60}h {minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"
