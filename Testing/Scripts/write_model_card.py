"""Write a model's full record (the long form: every ingredient, every figure) from its metadata and measured figures.

    .venv/bin/python Testing/Scripts/write_model_card.py MODEL.json FIGURES.json [--bench BENCH.txt] [--output FILE]

The output (default ``<model folder>/<name>_<version>_record.md``) becomes the new
version's entry at the top of ``MODEL_HISTORY.md``; ``MODEL_CARD.md``, the short card a
user reads (intended use, data, recipe, figures with intervals, limits), is edited by
hand from it and must stay under 20 KB.

FIGURES.json is what Testing/Scripts/evaluate_model.py --output wrote; BENCH.txt
is the table Testing/Benchmarks/bench_detect.py printed.
"""

import argparse
import json
from pathlib import Path

from LungNoduleAILib.candidates import SPLIT_MAX_DIAMETER_MM
from LungNoduleAILib.model import ModelSpec, file_sha256


def training_lines(t: dict) -> list:
    """The card's lines for one training record (a model's ``training``)."""
    best = t.get("best_validation", {})
    lines = [
        f"- Command: `{t.get('command', '?')}`",
        f"- Started from: `{t.get('init')}`" if t.get("init") else "- Started from: random initialisation",
        f"- Seed {t.get('seed')}, device {t.get('device')}, world size {t.get('world_size', 1)}, {t.get('total_minutes', '?')} minutes, patch "
        f"{t.get('patch')}³, batch {t.get('batch_size')}, lr {t.get('lr')} ({t.get('optimizer')}), loss {t.get('loss')}.",
        f"- Data: {json.dumps(t.get('data', {}))}.",
        "- Positives: the LUNA16 nodule cubes of the training series (real nodules with their masks, in their real surroundings), cropped at random "
        "offsets, and the same nodules pasted (soft max-blend) into nodule-free lung at random positions, 40 % of them against dense tissue (pleura, "
        f"vessels); nodules under 6 mm drawn {t.get('small_weight', 2.0):g} times as often; with --attached-weight, real nodules that touch the pleura or a "
        "vessel (`LungNoduleAILib.train.nodule_context`) drawn that many times as often.",
        *(
            [
                f"- Labels: each cube's own nodule, and the {t['data']['other_nodules_in_cubes']} pieces of other LUNA16 nodules of the same series that "
                "lie in the cubes (before, they were taught as background and mined as false responses)."
            ]
            if t.get("data", {}).get("other_nodules_in_cubes")
            else []
        ),
        "- Negatives: training cubes with their nodule erased, and lung patches of the full scan(s) named in the data (half centred on dense tissue inside "
        "the lung), kept 12+ mm away from anything an LIDC reader marked; with --mine-hard-negatives, patches centred where the starting model fired "
        "wrongly.",
        "- Augmentation: flips, axial 90° rotations, intensity scale/shift, noise, simulated thick slices"
        + (f"; half of the batches rescaled by a random factor in [1/{1 + t['zoom']:g}, {1 + t['zoom']:g}]." if t.get("zoom") else "."),
    ]
    if t.get("mix"):
        lines.append(
            f"- Batch mix (nodule-cube crops, pasted nodules, nodule-free cubes, full-scan lung patches): {t['mix']}; attached-nodule weight "
            f"{t.get('attached_weight')}; faint pasted nodules {t.get('faint_fraction', 0.0)}; "
            + (
                f"pasted nodules placed against the chest wall, mediastinum or diaphragm (masks cut at the wall) {t['pleural_fraction']}; "
                if t.get("pleural_fraction")
                else ""
            )
            + (f"nodule-cube crops with their nodules faded in place to 35-70 % of their contrast {t['fade_fraction']}; " if t.get("fade_fraction") else "")
            + f"patches drawn by {t.get('workers', 0)} worker processes."
            + (f" Weights kept as an exponential moving average (decay {t['ema']} per step)." if t.get("ema") else "")
        )
    if t.get("checkpoint") == "last":
        lines.append(
            "- Weights kept: the last step (`--save-last`), not a checkpoint chosen on validation. Validation split by series (seed "
            f"{t.get('data', {}).get('split_seed')}): at the last step {json.dumps(t.get('last_validation', {}))}."
        )
        return lines
    if t.get("selection"):
        sel = t["selection"]
        lines.append(
            f"- Checkpoint kept: best validation score = sensitivity - {sel['fp_weight']} x other candidates per cube - 5 x stray-voxel fraction"
            + (f" - {sel['scan_fp_weight']} x false responses in the training scans' lungs" if sel.get("scan_fp_weight") else "")
            + f", at p >= {sel['threshold']}."
        )
    lines.append(f"- Validation split by series (seed {t.get('data', {}).get('split_seed')}): best in-training validation {json.dumps(best)}.")
    return lines


def ingredient_lines(ingredients: list, heading: str, prefix: str) -> list:
    """The card's sections for the ingredients of an averaged model; an ingredient that is itself an average lists its own below it."""
    lines = []
    for i, ing in enumerate(ingredients, 1):
        number = f"{prefix}{i}"
        lines += ["", f"{heading} Ingredient {number}: `{ing['model']}` (version {ing['version']}, sha256 `{ing['sha256'][:16]}…`)"]
        t = ing["training"]
        if t.get("ingredients"):
            lines += [f"- The {t['method']}, ingredients {number}.1-{number}.{len(t['ingredients'])}.", f"- Command: `{t.get('command', '?')}`"]
            lines += ingredient_lines(t["ingredients"], heading + "#", number + ".")
        else:
            lines += training_lines(t)
    return lines


WEAK_SPOTS = (
    ("sensitivity_by_context", "pleural/mediastinal", "isolated", "against the pleura or mediastinum"),
    ("sensitivity_by_context", "vascular", "isolated", "next to a vessel"),
    ("sensitivity_by_density", "faint", "dense", "faint (ground-glass, part-solid, small and blurred)"),
)
"""(figure key, group, group it is compared with, words for the reader) of the validation cubes."""


def weak_spot_lines(vc: dict | None) -> list[str]:
    """The kinds of nodule found less often than their counterpart on the validation cubes, said to the reader."""
    if not vc:
        return []
    weak, versus = [], {}
    for key, group, other, words in WEAK_SPOTS:
        rates = vc.get(key, {})
        if group in rates and other in rates and rates[group]["sensitivity"] < rates[other]["sensitivity"]:
            weak.append(f"{words} {rates[group]['found']}/{rates[group]['n']}")
            versus[other] = f"{other} {rates[other]['found']}/{rates[other]['n']}"
    if not weak:
        return []
    return [
        "Found less often on the held-out cubes at the default threshold: nodules "
        + ", ".join(weak)
        + ", against "
        + " and ".join(versus.values())
        + ". Where a missed nodule matters, read the lung edges and along the vessels as well; the candidates do not replace that."
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("figures", type=Path)
    ap.add_argument("--bench", type=Path)
    ap.add_argument("--notes", type=Path, help="markdown appended as 'Notes'")
    ap.add_argument("--output", type=Path, help="where to write (default: <model folder>/<name>_<version>_record.md)")
    args = ap.parse_args()
    spec = ModelSpec.from_json(args.model)
    fig = json.loads(args.figures.read_text())
    weights = args.model.parent / spec.weights
    t = spec.training
    lines = [
        f"# Model card: {spec.name} {spec.version}",
        "",
        "Lung nodule segmentation network whose connected components above the threshold are the nodule candidates of LungNoduleAI.",
        "",
        "## Files",
        f"- `{args.model.name}`: metadata (architecture, preprocessing, threshold, training record).",
        f"- `{spec.weights}`: weights, float16 state_dict, {weights.stat().st_size / 1e6:.1f} MB, sha256 `{file_sha256(weights)}`.",
        "",
        "## Architecture and preprocessing",
        f"- MONAI `UNet` (3-D, 1 input and 1 output channel), {json.dumps(spec.architecture)}; its top layer is a plain transposed convolution (no "
        "norm/activation), so the logits are not squeezed.",
        f"- Input: CT oriented to LPS, resampled to {spec.spacing_mm} mm, HU clipped to {spec.hu_window} and scaled to [0, 1]; restricted to the lungs' "
        f"bounding box (+{spec.lung_margin_mm:g} mm) from a threshold/connected-component lung mask; probability set to 0 outside the closed lung mask "
        "dilated by 4 mm.",
        f"- Sliding window {spec.roi_size} voxels, overlap {spec.overlap}, Gaussian blending"
        + (f"; test-time flips along axes {spec.tta_flips} (0 = z, 1 = y, 2 = x), probabilities averaged with the plain pass" if spec.tta_flips else "")
        + (
            f", only over each region of p >= 0.5 whose plain-pass peak reaches {spec.tta_min_probability:g} (its bounding box, flipped with 24 voxels of "
            "context; a volume"
            " that fits in one window, such as a nodule cube, is flipped everywhere)"
            if spec.tta_flips and spec.tta_min_probability is not None
            else ""
        )
        + f". Candidates: components of p >= {spec.threshold} (default threshold) of at least {spec.min_volume_mm3:g} mm³"
        + (
            f", each drawn as its connected region of p >= {spec.segment_threshold} (its segment, measurements and centre)."
            if spec.segment_threshold is not None
            else "."
        )
        + (
            f" Regions under {SPLIT_MAX_DIAMETER_MM:g} mm made of blobs joined by a neck at least {spec.split_depth_mm} mm shallower are split, one "
            "candidate per blob with its own core (`split_at_necks`)."
            if spec.split_depth_mm
            else ""
        ),
        "",
        "## Training",
    ]
    if t.get("ingredients"):
        lines += [
            f"- The weights are the {t['method']} (`lungnoduleai average`, `LungNoduleAILib.model.average_models`): fine-tunes of one model; the run-time "
            "settings started as the first one's (Notes say where they changed since).",
            f"- Command: `{t.get('command', '?')}`",
            *ingredient_lines(t["ingredients"], "###", ""),
        ]
    else:
        lines += training_lines(t)
    lines += [
        "",
        "## Evaluation (Testing/Scripts/evaluate_model.py)",
        f"Default threshold p >= {fig['threshold']}.",
    ]
    vc = fig.get("validation_cubes")
    if vc:
        lines += [
            "",
            f"### Held-out validation cubes ({vc['cubes']} nodules, {vc['series']} series never seen in training)",
            f"- Found (a candidate centre within the nodule's radius): **{vc['sensitivity']:.3f}**; other candidates per cube: "
            f"**{vc['other_candidates_per_cube']:.2f}**."
            + (
                f" Not counted among them: {vc['candidates_on_other_references']} candidates on the {vc['other_references_in_cubes']} other LUNA16 nodules "
                "of the same series"
                " whose centre lies in a cube (LUNA16 counts no false positive on a reference nodule)."
                if "other_references_in_cubes" in vc
                else ""
            ),
            "- By size: " + "; ".join(f"{k}: {v['found']}/{v['n']} = {v['sensitivity']:.3f}" for k, v in vc["sensitivity_by_size"].items()) + ".",
            "- By surroundings (`LungNoduleAILib.train.nodule_context`: soft tissue in a 3 mm shell around the nodule; thick = chest wall/mediastinum): "
            + "; ".join(f"{k}: {v['found']}/{v['n']} = {v['sensitivity']:.3f}" for k, v in vc.get("sensitivity_by_context", {}).items())
            + ".",
        ]
        if "sensitivity_by_density" in vc:
            lines.append(
                "- By density (`LungNoduleAILib.train.nodule_density`: faint = mean below -450 HU in the nodule mask: ground-glass, part-solid, or small "
                "and blurred): " + "; ".join(f"{k}: {v['found']}/{v['n']} = {v['sensitivity']:.3f}" for k, v in vc["sensitivity_by_density"].items()) + "."
            )
        lines += [
            f"- FROC per cube (candidates down to p = 0.05): CPM {vc['cpm']:.3f} (95 % CI {vc['cpm_ci95'][0]:.3f}-{vc['cpm_ci95'][1]:.3f}); sensitivity at "
            + ", ".join(f"{k} FP/cube {v:.3f}" for k, v in vc["sensitivity_at_fp_per_cube"].items())
            + ".",
        ]
    lines += [
        "",
        "### Full scans (LUNA16 rules: candidates on the XML's other reader marks are excluded findings, neither hits nor false positives)",
        "",
        "| scan | reference nodules | found | top candidate is the reference | candidates | on excluded findings | false positives |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in fig["full_scans"]:
        top = "yes" if s["top_candidate_is_reference"] else ("n/a" if not s["reference_nodules"] else "no")
        lines.append(
            f"| {s['case']} | {s['reference_nodules']} | {s['references_found']} | {top} | {s['candidates']} | {s['on_excluded_findings']} | "
            f"{s['false_positives']} |"
        )
    lines += [
        "",
        "False positives per threshold (candidates of one run at p >= 0.05 whose probability reaches the threshold; a candidate's probability is the "
        "highest value that a core of 5 mm³ of it reaches, as a run at that threshold requires, so this counts what such a run makes up to how regions "
        "split): "
        + "; ".join(
            f"p >= {t}: " + ", ".join(f"{s['case'][-4:]} {s['sweep'][t]['false_positives']}" for s in fig["full_scans"]) for t in fig["full_scans"][0]["sweep"]
        )
        + ".",
    ]
    fs = fig.get("full_scan_froc")
    if fs:
        lines.append(
            f"FROC over the {fs['scans']} scans ({fs['nodules']} reference nodule): CPM {fs['cpm']:.3f}; at p >= {fig['threshold']}: sensitivity "
            f"{fs['operating_point']['sensitivity']:.3f}, "
            f"{fs['operating_point']['fp_per_scan']:.1f} FP/scan. With one nodule this says little beyond 'found at rank 1'."
        )
    lines += [
        "",
        "LIDC-IDRI-0001 is never used in training (the bundled demo CT is cut from it). LIDC-IDRI-0002 has no LUNA16 reference nodule; its lungs are used "
        "for negatives (away from reader marks), so its figure is not an unseen-data figure.",
    ]
    if args.bench:
        lines += ["", "## Speed and memory (Testing/Benchmarks/bench_detect.py, 2-core CPU)", "", "```", args.bench.read_text().strip(), "```"]
    if args.notes:
        notes = args.notes.read_text()
        notes = notes.split("\n## Data and licences", 1)[0]  # a card's tail, written below, when the notes were cut from an older card
        notes = notes.removeprefix("## Notes").strip()
        lines += ["", "## Notes", "", notes]
    lines += [
        "",
        "## Data and licences",
        "LIDC-IDRI (Armato et al., Med Phys 2011; TCIA, CC BY 3.0) and LUNA16 (Setio et al., MedIA 2017, CC BY 4.0); nodule cubes cut by "
        "node21challenge/node21_generation_baseline (Apache-2.0).",
        "",
        "## Intended use and limits",
        "Research and annotation support: candidates are suggestions for a reader to review, not a diagnosis. Trained on few scanners and one full scan's "
        "negatives; expect more false candidates on unusual scans (contrast, artefacts, pathology such as fibrosis).",
        *weak_spot_lines(vc),
        "",
    ]
    out = args.output or args.model.parent / f"{spec.name}_{spec.version}_record.md"
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
