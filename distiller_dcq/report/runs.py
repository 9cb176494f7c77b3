"""Running Distiller's compress_classifier.py and reading its logs, for benchmarks and reproductions."""
import datetime
import json
import os
import re
import subprocess
import time
from pathlib import Path

_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - "


def _seconds(stamp):
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def parse_distiller_log(text):
    """From a compress_classifier log file: per-epoch validation top-1 and training seconds (from the
    log's timestamps, validation excluded), the final test top-1, DCQ's stitched-network top-1s."""
    starts = [_seconds(s) for s in re.findall(_STAMP + r"Training epoch:", text, re.M)]
    ends = [_seconds(s) for s in re.findall(_STAMP + r"--- validate \(epoch=\d+\)", text, re.M)]
    tested = text.split("--- test ---")
    top1 = [float(v) for v in re.findall(r"==> Top1: ([\d.]+)", tested[0])]
    test = re.findall(r"==> Top1: ([\d.]+)", tested[1]) if len(tested) > 1 else []
    return {"train_seconds": [e - s for s, e in zip(starts, ends)], "val_top1": top1,
            "test_top1": float(test[-1]) if test else None,
            "stitched_top1": [float(s) for s in re.findall(r"stitched network validation Top1: ([\d.]+)", text)]}


def run_compress_classifier(cmd, out_dir, name, rerun=False, log=print):
    """Run ``cmd`` (a compress_classifier.py command writing its logs under ``out_dir`` with
    ``--name name``) and return the parsed log plus wall seconds and peak RSS (MiB) of that process.
    A finished run of the same command found in ``out_dir`` is reused unless ``rerun``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(c) for c in cmd]
    cached = out_dir / "result.json"
    if cached.exists() and not rerun:
        result = json.loads(cached.read_text())
        if result["cmd"] == cmd:
            log(f"[{time.strftime('%H:%M:%S')}] {name}: finished earlier, reusing {cached}")
            return result
    log(f"[{time.strftime('%H:%M:%S')}] {name} ...")
    start = time.time()
    with open(out_dir / "stderr.txt", "w") as stderr:  # a file, not a pipe: a full pipe would block the run
        process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, cwd=out_dir)
        _, status, usage = os.wait4(process.pid, 0)
    returncode = os.waitstatus_to_exitcode(status)
    if returncode != 0:
        lines = (out_dir / "stderr.txt").read_text().strip().splitlines() or ["no message"]
        log(f"    FAILED (exit {returncode}): {lines[-1]}")
        return {"failed": f"exit {returncode}: {lines[-1]}", "cmd": cmd}
    logs = sorted(out_dir.glob(f"{name}___*/*.log"), key=os.path.getmtime)
    result = {**parse_distiller_log(logs[-1].read_text()), "seconds": time.time() - start,
              "peak_mib": usage.ru_maxrss / 1024, "cmd": cmd}
    cached.write_text(json.dumps(result))
    log(f"    test top-1 {result['test_top1']}  val {result['val_top1']}  train s/epoch "
        f"{[round(s) for s in result['train_seconds']]}  peak {result['peak_mib']:.0f} MiB")
    return result
