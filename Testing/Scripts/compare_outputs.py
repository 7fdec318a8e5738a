"""Compare two detection output folders file by file: byte for byte, the _nodules.json as data without its timings, creation time and model path.

Usage: python Testing/Scripts/compare_outputs.py BEFORE_DIR AFTER_DIR  (prints "ALL SAME" or what differs; exit status 1 on a difference)
Used to show that a refactoring leaves detection outputs identical, e.g. on LIDC-IDRI-0001 at the default threshold and at 0.3.
"""

import hashlib
import json
import sys
from pathlib import Path

a, b = Path(sys.argv[1]), Path(sys.argv[2])
ok = True
for f in sorted(a.iterdir()):
    g = b / f.name
    if not g.exists():
        print("MISSING", f.name)
        ok = False
        continue
    if f.suffix == ".json":
        ja, jb = json.loads(f.read_text()), json.loads(g.read_text())
        for j in (ja, jb):
            j.pop("timings_s", None)
            j.pop("created", None)
            j.get("model", {}).pop("path", None)
            for k in list(j):
                if "time" in k or k == "written":
                    j.pop(k)
        same = ja == jb
        if not same:
            print("JSON DIFF", f.name, [k for k in set(ja) | set(jb) if ja.get(k) != jb.get(k)])
    else:
        same = hashlib.sha256(f.read_bytes()).digest() == hashlib.sha256(g.read_bytes()).digest()
    print("same" if same else "DIFF", f.name)
    ok &= same
print("ALL SAME" if ok else "DIFFERENCES")
sys.exit(0 if ok else 1)
