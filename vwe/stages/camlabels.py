"""The part every label-from-CAM stage shares on the per-image pass (refine's CRF labels, IRNet's relation
labels, the random walk): each image's CAM is read and checked (a missing or bad one is listed with the
others), a label PNG is current when its recorded source (the CAM file's SHA-256 and the stage's
settings) is unchanged, and all CAMs must come from one weights file."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from vwe.data.voc import NUM_LABELS
from vwe.formats.cams import cams_by_weights, read_cam_for
from vwe.formats.labels import read_label_png
from vwe.runtime.errors import DataError
from vwe.runtime.files import file_sha256
from vwe.stages.perimage import ImageWork


class CamLabelWork(ImageWork):
    """An ImageWork writing one label PNG per image from its CAM. Subclasses set `cam_dir` and `fingerprint`
    (the settings a label depends on) and call `super().__init__()`; `cam_weights_sha256` is known after
    the pass (`check_ranks`), for manifests and reports."""
    suffix = ".png"
    cam_dir: Path
    fingerprint: dict
    strided = False  # whether the strided `cam` is read too (the random walk's input) or high_res alone

    def __init__(self) -> None:
        self.by_weights: dict[str, list[str]] = defaultdict(list)
        self.cam_weights_sha256 = ""

    def prepare(self, sample: dict) -> dict:
        key = sample["key"]
        cam_path = self.cam_dir / f"{key}.npz"
        if not cam_path.exists():
            raise DataError(f"CAM file {cam_path}: not found (image {key!r} of split '{self.split}')")
        rec = read_cam_for(cam_path, sample["size"], num_classes=NUM_LABELS - 1, strided=self.strided)
        self.by_weights[rec.weights_sha256].append(key)
        source = json.dumps({"cam_sha256": file_sha256(cam_path), **self.fingerprint}, sort_keys=True)
        return {**sample, "cam": rec, "source": source}

    def current(self, sample: dict, path: Path) -> tuple[bool, np.ndarray | None]:
        found = read_label_png(path)
        if found is not None and found[1] == sample["source"]:
            return True, found[0]
        return False, None

    def problems_heading(self, n: int) -> str:
        return f"{n} CAM problem(s) in {self.cam_dir}"

    def rank_totals(self) -> dict:
        return {"by_weights": dict(self.by_weights)}

    def check_ranks(self, ranks: list[dict]) -> None:
        by_weights = cams_by_weights([r["by_weights"] for r in ranks], self.cam_dir,
                                     "rerun `vwe infer` (it replaces CAMs of other weights)")
        self.cam_weights_sha256 = next(iter(by_weights), "")
