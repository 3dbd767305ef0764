"""Kills a training run with SIGKILL at random moments, resumes it each time, and checks nothing is lost.

After every kill, every checkpoint in the run folder must load; every third kill also damages last.pt in place
(truncated or zero-filled), and the newest numbered checkpoint must still load. At the end the run must reach
its last step, and its metrics.jsonl must hold each validation once. Prints the number of kills survived and
of checkpoint files lost (which must be 0).

Usage: MT_DATA_PATH=../shared/data python scripts/kill_resume.py [--kills 10] [--steps 400] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mt import checkpoint
from mt.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-wait", type=float, default=4.0, help="seconds before the earliest kill")
    parser.add_argument("--max-wait", type=float, default=12.0, help="seconds before the latest kill")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="mt-kill-"))
    run_dir = workdir / "runs" / "kill"
    command = [sys.executable, "-m", "mt", "train", "--config", args.config, "--quiet", "--set", "name=kill",
               "--set", f"train.max_steps={args.steps}", "--set", "train.valid_every=20",
               "--set", "train.valid_sentences=20", "--set", "train.max_minutes=0"]
    # The runs work in a folder of their own: corpus folders given relative to this one are given absolute.
    data_path = [str(Path(p).resolve()) for p in os.environ.get("MT_DATA_PATH", "").split(os.pathsep) if p]
    env = {**os.environ, "MT_DATA_PATH": os.pathsep.join(data_path)}
    survived = lost = 0
    damaged = None  # (size, modification time) of the last.pt this script damaged
    for kill in range(1, args.kills + 1):
        # --resume from the first start on, as a preemptible job runs it: it also starts a run not begun yet.
        process = subprocess.Popen(command + ["--resume"], cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        wait = rng.uniform(args.min_wait, args.max_wait)
        time.sleep(wait)
        if process.poll() is not None:
            print(f"kill {kill}: the run ended before the kill (exit {process.returncode})")
            break
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        bad = []
        for path in sorted(run_dir.glob("*.pt")):
            if path.name == checkpoint.LAST and _stamp(path) == damaged:  # as this script left it: not a loss
                continue
            try:
                checkpoint.load(path)
            except CheckpointError as e:
                bad.append(str(e))
        lost += len(bad)
        survived += not bad
        step = _step(run_dir)
        print(f"kill {kill} after {wait:.1f} s: newest checkpoint at step {step}; "
              f"{len(bad)} unreadable" + (f": {bad}" if bad else ""))
        if kill % 3 == 0 and (run_dir / checkpoint.LAST).is_file():  # last.pt damaged in place, as a crashed
            damage = "truncated" if kill % 2 else "zero-filled"  # copy tool or an editor leaves it
            size = (run_dir / checkpoint.LAST).stat().st_size
            with open(run_dir / checkpoint.LAST, "r+b") as f:
                f.truncate(0) if damage == "truncated" else f.write(bytes(size))
            damaged = _stamp(run_dir / checkpoint.LAST)
            fallback = _step(run_dir)
            print(f"  last.pt {damage} in place: the newest numbered checkpoint gives step {fallback}")
            lost += fallback is None
    final = subprocess.run(command + ["--resume"], cwd=workdir, env=env, capture_output=True, text=True)
    step = _step(run_dir)
    validated = [r["step"] for r in checkpoint.read_metrics(run_dir) if "valid_bleu" in r and "averaged" not in r]
    twice = sorted({s for s in validated if validated.count(s) > 1})
    print(f"final resume: exit {final.returncode}, last step {step} of {args.steps}")
    print(f"kills survived: {survived}; checkpoint files lost: {lost}; validations recorded twice: {twice or 'none'}")
    ok = final.returncode == 0 and step == args.steps and lost == 0 and not twice
    print("OK" if ok else "FAILED: " + final.stderr.strip()[-500:])
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _step(run_dir: Path) -> int | None:
    try:
        return checkpoint.load_newest_valid(run_dir)["progress"]["step"]
    except CheckpointError:
        return None


if __name__ == "__main__":
    sys.exit(main())
