"""Time each stage of ``detect`` and measure peak memory, per scan.

    .venv/bin/python Testing/Benchmarks/bench_detect.py [--scans DIR] [--device auto|cpu|cuda] [--model M.json] [--repeat N] [--sequential]

Each scan runs in a fresh process (so its peak resident memory is its own):
the same code path as ``lungnoduleai detect`` (the network loading in the
background while the CT is read and prepared; read, preprocess, lung mask,
inference, candidates, write all outputs into a temporary folder). Prints a
table of wall seconds per stage, the whole run (``total``), the model's
constructor (``+load``), the time detection waited for the background load
(``wait``, inside ``total``, not in any stage), end to end (``e2e`` = total +
load) and peak RSS (GB). ``--sequential`` loads the model first, as before
the background load (``wait`` 0).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from LungNoduleAILib.pipeline import Detector
det = Detector(sys.argv[3] or None, sys.argv[4], background=sys.argv[5] == "background")
t1 = time.perf_counter()
res = det.detect_to_files(sys.argv[1], sys.argv[2], overwrite=True)
t2 = time.perf_counter()
print(json.dumps({"load_model_s": t1 - t0, "detect_s": t2 - t1, "stages_s": res.timings_s, "candidates": len(res.candidates),
                  "device": res.device, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
                  "size": list(res.ct.image.GetSize())}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", type=Path, default=REPO.parent / "shared" / "data" / "scans")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--sequential", action="store_true", help="load the model before reading the CT (no overlap)")
    args = ap.parse_args(argv)
    scans = sorted(args.scans.glob("*.nii.gz")) if args.scans.is_dir() else [args.scans]
    if not scans:
        print(f"no scans in {args.scans}", file=sys.stderr)
        return 1
    print(
        f"{'scan':<26}{'size':>16}{'read':>7}{'prep':>7}{'lung':>7}{'infer':>7}{'cand':>7}{'write':>7}"
        f"{'total':>8}{'+load':>7}{'wait':>6}{'e2e':>7}{'peak GB':>9}{'cands':>6}  device"
    )
    for scan in scans:
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as out:
                proc = subprocess.run(
                    [sys.executable, "-c", CHILD, str(scan), out, args.model, args.device, "sequential" if args.sequential else "background"],
                    capture_output=True,
                    text=True,
                )
            if proc.returncode:
                print(f"{scan.name}: failed\n{proc.stderr}", file=sys.stderr)
                return 1
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            s = r["stages_s"]
            size = "x".join(map(str, r["size"]))
            print(
                f"{scan.name:<26}{size:>16}{s['read']:>7.1f}{s['preprocess']:>7.1f}{s['lung_mask']:>7.1f}{s['inference']:>7.1f}"
                f"{s['candidates']:>7.1f}{s['write']:>7.1f}{r['detect_s']:>8.1f}{r['load_model_s']:>7.1f}{s.get('model_load_wait', 0.0):>6.1f}"
                f"{r['detect_s'] + r['load_model_s']:>7.1f}{r['peak_rss_gb']:>9.2f}{r['candidates']:>6}  {r['device']}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
