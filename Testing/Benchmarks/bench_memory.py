"""Peak memory of ``detect`` on a long CT, against the input's own size.

    .venv/bin/python Testing/Benchmarks/bench_memory.py [--slices 600] [--scan CT] [--device cpu] [--model M.json]

Makes a long volume (default: LIDC-IDRI-0001 from ../shared/data resampled to
600 slices of 512 x 512, int16, as thin-slice or whole-body CTs come; the
bundled sample stacked when the shared data is absent), then runs detection in
a fresh process and prints, per stage, the resident memory when the stage
began and the peak so far, with:

* ``input``: the CT's int16 size (voxels x 2 bytes);
* ``model``: resident memory with the network loaded, before the CT is read
  (torch, MONAI and the weights: the network's working set is on top of it);
* ``peak``: the process's peak resident memory;
* the network's working set: how far the peak rose during inference;
* the budget (issue 24): peak <= model + network working set + 4 x input.
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
import json, os, resource, sys, time
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**3
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
from LungNoduleAILib.pipeline import Detector
det = Detector(sys.argv[3] or None, sys.argv[4])
det.predictor
model_rss = rss()
stages = []
last = [None]
def progress(done, total, stage):
    if stage != last[0]:
        last[0] = stage
        stages.append((stage, rss(), peak()))
t = time.perf_counter()
res = det.detect_to_files(sys.argv[1], sys.argv[2], overwrite=True, progress=progress)
stages.append(("end", rss(), peak()))
print(json.dumps({"model_rss_gb": model_rss, "peak_gb": peak(), "stages": stages, "seconds": time.perf_counter() - t,
                  "size": list(res.ct.image.GetSize()), "candidates": len(res.candidates)}))
"""


def make_long_ct(slices: int, folder: Path) -> Path:
    import numpy as np
    import SimpleITK as sitk

    scan = REPO.parent / "shared" / "data" / "scans" / "LIDC-IDRI-0001.nii.gz"
    src = sitk.ReadImage(str(scan if scan.exists() else REPO / "LungNoduleAI" / "Resources" / "Sample" / "LIDC-IDRI-0001_sample.nii.gz"))
    size, spacing = src.GetSize(), src.GetSpacing()
    length = size[2] * spacing[2]
    out_spacing = (spacing[0], spacing[1], length / slices)
    ref = sitk.Image([size[0], size[1], slices], src.GetPixelID())
    ref.SetSpacing(out_spacing)
    ref.SetOrigin(src.GetOrigin())
    ref.SetDirection(src.GetDirection())
    img = sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkInt16)
    path = folder / f"long_{slices}.nii.gz"
    sitk.WriteImage(img, str(path), useCompression=True)
    del img, src
    assert np.prod(sitk.ReadImage(str(path)).GetSize()) == size[0] * size[1] * slices
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=600)
    ap.add_argument("--scan", type=Path, default=None, help="use this CT instead of making a long one")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        scan = args.scan or make_long_ct(args.slices, Path(tmp))
        proc = subprocess.run([sys.executable, "-c", CHILD, str(scan), str(Path(tmp) / "out"), args.model, args.device], capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr, file=sys.stderr)
        return 1
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    voxels = r["size"][0] * r["size"][1] * r["size"][2]
    input_gb = voxels * 2 / 1024**3
    print(f"CT {'x'.join(map(str, r['size']))}: input (int16) {input_gb:.3f} GB, {r['candidates']} candidates, {r['seconds']:.1f} s")
    print(f"{'stage begins':<14}{'RSS GB':>8}{'peak so far':>13}")
    for stage, rss, peak in r["stages"]:
        print(f"{stage:<14}{rss:>8.2f}{peak:>13.2f}")
    begins = {stage: (rss, peak) for stage, rss, peak in r["stages"]}
    network = max(0.0, begins["candidates"][1] - begins["inference"][0]) if "candidates" in begins and "inference" in begins else 0.0
    budget = r["model_rss_gb"] + network + 4 * input_gb
    print(f"model loaded {r['model_rss_gb']:.2f} GB, network working set (inference's rise) {network:.2f} GB, peak {r['peak_gb']:.2f} GB")
    print(
        f"(peak - model) / input = {(r['peak_gb'] - r['model_rss_gb']) / input_gb:.1f}x; (peak - model - network) / input = "
        f"{(r['peak_gb'] - r['model_rss_gb'] - network) / input_gb:.1f}x; budget (model + network + 4 x input) {budget:.2f} GB: "
        f"{'met' if r['peak_gb'] <= budget else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
