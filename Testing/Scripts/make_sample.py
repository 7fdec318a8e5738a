"""Cut the bundled demo CT from LIDC-IDRI-0001 (run once; the result is committed).

    python Testing/Scripts/make_sample.py ../shared/data/scans/LIDC-IDRI-0001.nii.gz LungNoduleAI/Resources/Sample/LIDC-IDRI-0001_sample.nii.gz

Keeps 40 axial slices (100 mm) around the LUNA16 reference nodule and the
body's in-plane bounding box, in the original voxels and world coordinates
(int16 HU, field-of-view padding set to -1000 HU).
"""

import sys

import numpy as np
import SimpleITK as sitk

NODULE_LPS = (56.20840547, 86.34341278, -115.8675792)  # LIDC-IDRI-0001.annotations.csv


def main(src: str, dst: str, slices: int = 40) -> None:
    img = sitk.ReadImage(src)
    k = int(round(img.TransformPhysicalPointToContinuousIndex(NODULE_LPS)[2]))
    arr = sitk.GetArrayFromImage(img)
    k0 = max(0, min(k - slices // 2, arr.shape[0] - slices))
    body = (arr[k0 : k0 + slices] > -500).any(axis=0)
    ys, xs = np.nonzero(body)
    # the table also exceeds -500 HU; keep it, it is part of a real scan
    y0, y1, x0, x1 = max(ys.min() - 5, 0), min(ys.max() + 6, arr.shape[1]), max(xs.min() - 5, 0), min(xs.max() + 6, arr.shape[2])
    out = img[int(x0) : int(x1), int(y0) : int(y1), k0 : k0 + slices]
    a = sitk.GetArrayFromImage(out)
    a[a < -1024] = -1000
    res = sitk.GetImageFromArray(a.astype(np.int16))
    res.CopyInformation(out)
    sitk.WriteImage(res, dst, useCompression=True)
    print(dst, res.GetSize(), res.GetSpacing(), res.GetOrigin())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
