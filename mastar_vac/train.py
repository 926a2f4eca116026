"""The training stage: split the reference set, train, reject mislabelled stars, retrain.

1. A seeded 80/10/10 split (per source, so empirical and synthetic spectra are both
   represented in every part): train, test (early stopping) and validation (held out
   from every training, for the end-to-end check of the fit).
2. A first emulator is trained on the training part.
3. Every reference spectrum — validation included — is fitted with that emulator; stars
   whose χ² at their catalogue labels is more than ``outlier_chi2_ratio`` times the
   best-fit χ² are mislabelled (DESIGN.md: MILES m0386, m0330, …). Training and test
   stars so flagged leave the reference set. Validation stars are flagged but never
   removed: they were drawn before any cleaning, and the stars the outlier test finds
   are exactly the ones the fit gets most wrong — removing them would flatter Table 1.
   The validation stage reports them separately as well as with the rest.
4. The final emulator is trained on the cleaned training part, warm-started from the
   first one (same label scaling; ``TrainConfig.warm_fraction`` of its schedule).

With ``[fit] lsf = "forward"`` both emulators are trained through the LSF operator
(:func:`mastar_vac.emulator.train_emulator`): the reference set then records each
spectrum's LSF and the reference LSF σ_ref, and the outlier fit uses the same forward
model as the build's fit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from .emulator import TrainConfig, TrainResult, split_indices, train_emulator
from .fit import FitConfig
from .reference import ReferenceSet, find_label_outliers

__all__ = ["TrainedEmulator", "reference_split", "train_reference_emulator"]

log = logging.getLogger(__name__)


@dataclass
class TrainedEmulator:
    result: TrainResult  # the final emulator, its history and split (indices into `reference`)
    reference: ReferenceSet  # the cleaned reference set
    split: dict[str, NDArray[np.int64]]
    outliers: pd.DataFrame | None  # one row per original reference spectrum, or None if not run
    first_result: TrainResult | None  # the emulator used to find the outliers

    @property
    def flagged(self) -> NDArray[np.bool_]:
        """Per spectrum of ``reference``: flagged by the outlier test (only validation
        spectra can be flagged and still be here)."""
        if self.outliers is None:
            return np.zeros(len(self.reference), bool)
        kept = self.outliers[~self.outliers["removed"].to_numpy()]
        return kept["outlier"].to_numpy(bool)


def reference_split(ref: ReferenceSet, config: TrainConfig) -> dict[str, NDArray[np.int64]]:
    """80/10/10 split drawn separately within each source (empirical, synthetic)."""
    parts: dict[str, list[NDArray[np.int64]]] = {"train": [], "test": [], "validation": []}
    for k, src in enumerate(sorted(set(ref.source.tolist()))):
        idx = np.flatnonzero(ref.source == src)
        s = split_indices(len(idx), test_fraction=config.test_fraction,
                          validation_fraction=config.validation_fraction, seed=config.seed + k)
        for name in parts:
            parts[name].append(idx[s[name]])
    return {name: np.sort(np.concatenate(v)) if v else np.array([], np.int64) for name, v in parts.items()}


def _remap(split: dict[str, NDArray[np.int64]], keep: NDArray[np.bool_]) -> dict[str, NDArray[np.int64]]:
    new = -np.ones(len(keep), np.int64)
    new[keep] = np.arange(int(keep.sum()))
    return {k: new[v][new[v] >= 0] for k, v in split.items()}


def train_reference_emulator(ref: ReferenceSet, *, train_config: TrainConfig, fit_config: FitConfig,
                             outlier_chi2_ratio: float, progress: bool = True) -> TrainedEmulator:
    """Split, train, reject label outliers, retrain (see the module docstring)."""
    if len(ref) < 10:
        raise ValueError(f"the reference set has {len(ref)} spectra; at least 10 are needed to train")
    forward = fit_config.lsf == "forward"
    if forward and not (ref.has_lsf and len(ref.lsf_sigma_ref) == len(ref.wave)):
        raise ValueError("[fit] lsf = 'forward' trains the emulator through the LSF operator, and this reference "
                         "set records no LSF per spectrum or no reference LSF σ_ref (made by an older version, or "
                         "from a cube without DISP): build the reference stage again")
    split = reference_split(ref, train_config)
    log.info("split: %d train, %d test, %d validation", *(len(split[k]) for k in ("train", "test", "validation")))

    def train(r: ReferenceSet, s: dict[str, NDArray[np.int64]], init: TrainResult | None = None) -> TrainResult:
        res = train_emulator(r.labels, r.flux, r.ivar, label_names=r.label_names, wave=r.wave,
                             config=train_config, split=s, progress=progress,
                             init=None if init is None else init.emulator,
                             lsf_sigma=r.lsf_sigma if forward else None,
                             lsf_sigma_ref=r.lsf_sigma_ref if forward else None)
        # the training labels are the fit's start grid (DESIGN.md: "starts matter more")
        res.emulator.config["start_grid"] = r.labels[s["train"]].tolist()
        return res

    first = train(ref, split)
    if outlier_chi2_ratio <= 0:
        return TrainedEmulator(first, ref, split, None, None)
    outliers = find_label_outliers(first.emulator, ref, ratio=outlier_chi2_ratio, fit_config=fit_config,
                                   skip=ref.source == "synthetic")
    flagged = outliers["outlier"].to_numpy()
    in_validation = np.zeros(len(ref), bool)
    in_validation[split["validation"]] = True
    bad = flagged & ~in_validation  # validation stars are flagged, never removed
    outliers["validation"] = in_validation
    outliers["removed"] = bad
    log.info("label outliers (χ² at catalogue labels > %g × best fit): %d of %d reference spectra; "
             "%d training/test spectra removed, %d validation spectra flagged and kept",
             outlier_chi2_ratio, int(flagged.sum()), len(ref), int(bad.sum()), int((flagged & in_validation).sum()))
    for _, row in outliers[flagged].sort_values("ratio", ascending=False).head(10).iterrows():
        log.info("  %s: catalogue %s → fit %s (χ² ratio %.1f)", row["id"],
                 ", ".join(f"{row[n]:.4g}" for n in ref.label_names),
                 ", ".join(f"{row['FIT_' + n]:.4g}" for n in ref.label_names), row["ratio"])
    if not bad.any():
        return TrainedEmulator(first, ref, split, outliers, first)
    keep = ~bad
    clean = ref.subset(np.flatnonzero(keep))
    clean.cut_report["label_outliers"] = int(bad.sum())
    clean_split = _remap(split, keep)
    # the cleaned set differs by a few percent of its stars: the final emulator starts
    # from the first one's weights and label scaling and runs a fraction of the schedule
    # (TrainConfig.warm_fraction) instead of a second training from scratch
    final = train(clean, clean_split, init=first)
    return TrainedEmulator(final, clean, clean_split, outliers, first)
