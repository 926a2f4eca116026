"""The empirical reference set (Imig et al. 2022 §2.3).

MaStar stars that APOGEE DR17 (ASPCAP) also observed are matched to the allStar table —
through the Gaia EDR3 ``SOURCE_ID`` when both sides have one, else by position — and
cleaned: duplicate APOGEE rows, bad or missing ASPCAP results, binaries and composites,
emission-line and flagged visits are dropped, each cut counted. Each remaining star's
visits are co-added with inverse-variance weights per pixel (masked pixels excluded).

The pure steps (:func:`derive_labels`, :func:`match_stars`, :func:`coadd`) work on
numpy/pandas objects; :func:`build_reference_set` wires them to the cube and the files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from .errors import ConfigError, InputFileError

__all__ = [
    "ReferenceConfig",
    "ReferenceSet",
    "DERIVED_LABELS",
    "derive_labels",
    "match_stars",
    "coadd",
    "coadd_lsf",
    "reference_lsf",
    "build_reference_set",
]

log = logging.getLogger(__name__)

ALL_CUTS = ("duplicate", "aspcap_bad", "missing_labels", "binary", "emission_line", "flagged_visit", "low_snr")

# Labels computed from allStar columns. [α/Fe] = [α/M] + [M/H] − [Fe/H]: ASPCAP's ALPHA_M
# is relative to the overall metallicity M_H, so this is the exact conversion (it
# reduces to ALPHA_M where M_H = FE_H). Microturbulence is fitted as log10 (km/s).
DERIVED_LABELS: dict[str, tuple[tuple[str, ...], str]] = {
    "ALPHA_FE": (("ALPHA_M", "M_H", "FE_H"), "ALPHA_M + M_H - FE_H"),
    "LOG10_VMICRO": (("VMICRO",), "log10(VMICRO)"),
}


@dataclass(frozen=True)
class ReferenceConfig:
    """The ``[reference]`` section of a run configuration (the label set is
    ``[emulator] labels``)."""

    match_radius_arcsec: float = 1.5
    cuts: tuple[str, ...] = ALL_CUTS
    min_snr: float = 10.0  # visits below this median S/N are not co-added
    vscatter_max: float = 1.0  # km/s; APOGEE RV scatter above this marks a likely binary
    aspcap_bad_bits: int = (1 << 23) | (1 << 31) | (1 << 36)  # STAR_BAD, NO_ASPCAP_RESULT, FERRE_FAIL
    binary_aspcap_bits: int = 1 << 41  # MULTIPLE_SUSPECT
    binary_star_bits: int = (1 << 16) | (1 << 18) | (1 << 21)  # SUSPECT/BAD_RV_COMBINATION, MULTIPLE_SUSPECT
    duplicate_extratarg_bits: int = 1 << 4  # EXTRATARG DUPLICATE
    emission_visit_bits: int = 1 << 8  # MASTAR_QUAL EMLINE
    # MASTAR_QUAL SKYSUBBAD, LOWCOV, POORCAL, BADHELIORV, MANUAL, LOWSN (the JI code's visit cut)
    bad_visit_bits: int = (1 << 1) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 9)
    # stars whose χ² at their catalogue labels exceeds this many times the best-fit χ²
    # are dropped as mislabelled once an emulator exists (0 = never)
    outlier_chi2_ratio: float = 4.0

    def __post_init__(self) -> None:
        unknown = set(self.cuts) - set(ALL_CUTS)
        if unknown:
            raise ConfigError(f"reference.cuts: unknown cut(s) {sorted(unknown)}; known: {list(ALL_CUTS)}")
        if self.match_radius_arcsec <= 0:
            raise ConfigError("reference.match_radius_arcsec must be > 0")


def allstar_columns_for(labels: Sequence[str]) -> list[str]:
    """The allStar columns needed to compute ``labels``."""
    cols: list[str] = []
    for lab in labels:
        cols.extend(DERIVED_LABELS[lab][0] if lab in DERIVED_LABELS else (lab,))
    return list(dict.fromkeys(cols))


def derive_labels(allstar: pd.DataFrame, labels: Sequence[str]) -> NDArray[np.float64]:
    """(n, L) label array from allStar columns (NaN where any input is missing)."""
    out = np.empty((len(allstar), len(labels)))
    for j, lab in enumerate(labels):
        if lab == "ALPHA_FE":
            v = allstar["ALPHA_M"] + allstar["M_H"] - allstar["FE_H"]
        elif lab == "LOG10_VMICRO":
            vm = allstar["VMICRO"].to_numpy(np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                v = np.where(vm > 0, np.log10(vm), np.nan)
        else:
            v = allstar[lab]
        out[:, j] = np.asarray(v, np.float64)
    return out


def match_stars(stars: pd.DataFrame, allstar: pd.DataFrame, *, radius_arcsec: float = 1.5) -> pd.DataFrame:
    """Match MaStar stars to allStar rows: Gaia EDR3 SOURCE_ID first, position second.

    ``stars`` needs MANGAID, RA, DEC and optionally SOURCE_ID (nullable); ``allstar``
    needs RA, DEC and optionally GAIAEDR3_SOURCE_ID. Returns one row per matched star:
    MANGAID, ``allstar_row`` (positional index into ``allstar``), ``match`` ("gaia" or
    "position") and ``sep_arcsec``. Each star gets at most one match (the nearest);
    an allStar row claimed by several stars is given to none of them (ambiguous).
    """
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    res = []
    matched_ids: set[str] = set()
    if "SOURCE_ID" in stars and "GAIAEDR3_SOURCE_ID" in allstar:
        a_sid = pd.Series(np.asarray(allstar["GAIAEDR3_SOURCE_ID"], dtype=np.int64))
        a_sid = a_sid[a_sid > 0]
        lookup = {sid: i for i, sid in a_sid.items()}  # positional index of the first row with that id
        for mid, sid, ra, dec in zip(stars["MANGAID"], stars["SOURCE_ID"], stars["RA"], stars["DEC"]):
            if pd.isna(sid) or int(sid) not in lookup:
                continue
            i = lookup[int(sid)]
            sep = SkyCoord(ra * u.deg, dec * u.deg).separation(
                SkyCoord(allstar["RA"].iloc[i] * u.deg, allstar["DEC"].iloc[i] * u.deg)).arcsec
            res.append((mid, i, "gaia", float(sep)))
            matched_ids.add(mid)
    rest = stars[~stars["MANGAID"].isin(matched_ids)]
    ok = np.isfinite(rest["RA"].to_numpy(float)) & np.isfinite(rest["DEC"].to_numpy(float))
    rest = rest[ok]
    a_ok = np.isfinite(allstar["RA"].to_numpy(float)) & np.isfinite(allstar["DEC"].to_numpy(float))
    if len(rest) and a_ok.any():
        a_idx = np.flatnonzero(a_ok)
        cat = SkyCoord(allstar["RA"].to_numpy(float)[a_idx] * u.deg, allstar["DEC"].to_numpy(float)[a_idx] * u.deg)
        c = SkyCoord(rest["RA"].to_numpy(float) * u.deg, rest["DEC"].to_numpy(float) * u.deg)
        j, sep, _ = c.match_to_catalog_sky(cat)
        for mid, jj, s in zip(rest["MANGAID"], j, sep.arcsec):
            if s <= radius_arcsec:
                res.append((mid, int(a_idx[jj]), "position", float(s)))
    out = pd.DataFrame(res, columns=["MANGAID", "allstar_row", "match", "sep_arcsec"])
    claimed = out["allstar_row"].duplicated(keep=False)
    if claimed.any():
        log.info("match: %d stars share an allStar row with another star; all of them dropped", int(claimed.sum()))
    return out[~claimed].reset_index(drop=True)


def coadd(flux: NDArray, ivar: NDArray, groups: NDArray[np.int64], n_groups: int) -> tuple[NDArray, NDArray]:
    """Inverse-variance weighted co-add per pixel of the rows of each group.

    Pixels with ``ivar == 0`` do not contribute; a pixel with no contribution gets
    flux 0 and ivar 0. Returns (n_groups, P) flux and ivar.
    """
    flux = np.asarray(flux, np.float64)
    ivar = np.asarray(ivar, np.float64)
    P = flux.shape[1]
    num = np.zeros((n_groups, P))
    den = np.zeros((n_groups, P))
    w = np.where(ivar > 0, ivar, 0.0)
    np.add.at(num, groups, w * np.where(ivar > 0, flux, 0.0))
    np.add.at(den, groups, w)
    f = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return f.astype(np.float32), den.astype(np.float32)


def coadd_lsf(disp: NDArray | None, ivar: NDArray, groups: NDArray[np.int64], n_groups: int,
              wave: NDArray) -> NDArray[np.float32]:
    """The LSF σ (n_groups, P), in pixels of ``wave``, of the co-adds :func:`coadd`
    makes: per pixel √(Σ w σ_v² / Σ w) with the co-add's weights w (ivar), where σ_v is
    each visit's DISP (Å). A co-add of Gaussians of different widths is not a Gaussian,
    but its second moment is this weighted mean, which is what the differential kernel
    of the training matches (exactly, to second order in the spread). Pixels without
    weight take the unweighted mean over the visits; unusable DISP (≤ 0, non-finite) is
    left out, and a pixel with none is NaN (filled where the kernels are built).
    ``disp`` None (a cube without DISP): all NaN."""
    from .lsf import sigma_to_pixels

    P = len(wave)
    if disp is None:
        return np.full((n_groups, P), np.nan, np.float32)
    num, den = np.zeros((n_groups, P)), np.zeros((n_groups, P))
    num1, den1 = np.zeros((n_groups, P)), np.zeros((n_groups, P))
    for a in range(0, len(groups), 1024):  # in chunks of visits: bounded temporaries at DR17 size
        g = groups[a:a + 1024]
        s = sigma_to_pixels(np.asarray(disp[a:a + 1024], np.float64), wave)
        ok = np.isfinite(s) & (s > 0)
        v = np.where(ok, s * s, 0.0)
        w = np.where(ok & (np.asarray(ivar[a:a + 1024]) > 0), np.asarray(ivar[a:a + 1024], np.float64), 0.0)
        np.add.at(num, g, w * v)
        np.add.at(den, g, w)
        np.add.at(num1, g, v)
        np.add.at(den1, g, ok.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(den > 0, num / den, num1 / den1)
    return np.sqrt(var).astype(np.float32)


def reference_lsf(disp, wave: NDArray, *, percentile: float = 1.0,  # noqa: ANN001
                  max_visits: int = 8192) -> NDArray[np.float64]:
    """The reference LSF σ_ref (P,), in pixels of ``wave``, that an emulator trained
    through the LSF operator predicts at: per pixel the ``percentile`` of the visits'
    DISP (:func:`mastar_vac.lsf.reference_sigma`, which says why so low). ``disp`` is
    the cube's (visit, wave) DISP in Å (numpy, or xarray/dask: read in chunks); at most
    ``max_visits`` visits, evenly spaced, are read — the 1st percentile of 8,192 visits
    is determined to well under a per cent of σ, and the whole DR17 cube's DISP is 1 GB.
    A pixel where no visit has a usable DISP is interpolated from its neighbours; a cube
    with none at all is refused."""
    from .lsf import reference_sigma, sigma_to_pixels

    n = disp.shape[0]
    take = np.unique(np.linspace(0, n - 1, min(n, max_visits)).round().astype(np.int64)) if n else np.array([], int)
    d = disp.isel(visit=take) if hasattr(disp, "isel") else np.asarray(disp)[take]
    s = sigma_to_pixels(np.asarray(d, np.float64), wave)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels: handled below
        ref = reference_sigma(s, percentile) if len(s) else np.full(len(wave), np.nan)
    ok = np.isfinite(ref) & (ref > 0)
    if not ok.any():
        raise ValueError("no visit has a usable DISP (LSF σ > 0): the reference LSF for [fit] lsf = 'forward' "
                         "cannot be set; use lsf = 'ignore'")
    if not ok.all():
        idx = np.arange(len(ref))
        ref = np.interp(idx, idx[ok], ref[ok])
    return ref


@dataclass
class ReferenceSet:
    """Co-added reference spectra with labels (and where they came from)."""

    label_names: list[str]
    labels: NDArray[np.float64]  # (n, L)
    flux: NDArray[np.float32]  # (n, P) normalized
    ivar: NDArray[np.float32]
    wave: NDArray[np.float64]
    ids: NDArray[np.str_]  # MANGAID (or a synthetic id)
    source: NDArray[np.str_]  # "empirical" | "synthetic"
    n_visits: NDArray[np.int64]
    snr: NDArray[np.float64]  # median S/N per pixel of the co-add
    apogee_id: NDArray[np.str_] = field(default_factory=lambda: np.array([], str))
    cut_report: dict[str, int] = field(default_factory=dict)
    # Each spectrum's LSF σ (n, P) in pixels of ``wave``: for a co-add the ivar-weighted
    # mean of its visits' σ² per pixel (the variance of the co-added line profile), for a
    # synthetic spectrum the σ it was convolved to; empty (0, P) where not recorded.
    lsf_sigma: NDArray[np.float32] = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    # The reference LSF σ_ref (P,) in pixels, for training through the LSF operator
    # ([fit] lsf = "forward"): the 1st percentile of the cube's visits; empty when not set.
    lsf_sigma_ref: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def has_lsf(self) -> bool:
        """Whether every spectrum's LSF σ is recorded."""
        return self.lsf_sigma.shape == self.flux.shape

    def subset(self, idx: NDArray) -> ReferenceSet:
        return ReferenceSet(self.label_names, self.labels[idx], self.flux[idx], self.ivar[idx], self.wave,
                            self.ids[idx], self.source[idx], self.n_visits[idx], self.snr[idx],
                            self.apogee_id[idx] if len(self.apogee_id) == len(self) else self.apogee_id,
                            dict(self.cut_report),
                            self.lsf_sigma[idx] if self.has_lsf else self.lsf_sigma, self.lsf_sigma_ref)

    def concat(self, other: ReferenceSet) -> ReferenceSet:
        if other.label_names != self.label_names or len(other.wave) != len(self.wave):
            raise ValueError("reference sets differ in labels or wavelength grid")
        aid = np.concatenate([self.apogee_id if len(self.apogee_id) == len(self) else np.full(len(self), ""),
                              other.apogee_id if len(other.apogee_id) == len(other) else np.full(len(other), "")])
        # the LSF σ is kept when both record it (else neither: a set without it is not
        # half-known), and σ_ref is this set's
        lsf_sigma = (np.concatenate([self.lsf_sigma, other.lsf_sigma]) if self.has_lsf and other.has_lsf
                     else np.zeros((0, 0), np.float32))
        return ReferenceSet(self.label_names, np.concatenate([self.labels, other.labels]),
                            np.concatenate([self.flux, other.flux]), np.concatenate([self.ivar, other.ivar]),
                            self.wave, np.concatenate([self.ids, other.ids]),
                            np.concatenate([self.source, other.source]),
                            np.concatenate([self.n_visits, other.n_visits]), np.concatenate([self.snr, other.snr]),
                            aid, {**self.cut_report, **{f"synthetic_{k}": v for k, v in other.cut_report.items()}},
                            lsf_sigma, self.lsf_sigma_ref if len(self.lsf_sigma_ref) else other.lsf_sigma_ref)

    def save(self, path: str | os.PathLike[str]) -> Path:
        from .io.atomic import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, label_names=np.array(self.label_names), labels=self.labels, flux=self.flux,
                         ivar=self.ivar, wave=self.wave, ids=self.ids, source=self.source, n_visits=self.n_visits,
                         snr=self.snr, apogee_id=self.apogee_id,
                         cut_names=np.array(list(self.cut_report), dtype=str),
                         cut_counts=np.array(list(self.cut_report.values()), dtype=np.int64),
                         lsf_sigma=self.lsf_sigma, lsf_sigma_ref=self.lsf_sigma_ref)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ReferenceSet:
        try:
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        except (OSError, ValueError) as exc:
            raise InputFileError(path, f"not a readable reference set ({exc})") from None
        return cls([str(x) for x in d["label_names"]], d["labels"], d["flux"], d["ivar"], d["wave"], d["ids"],
                   d["source"], d["n_visits"], d["snr"], d["apogee_id"],
                   dict(zip([str(x) for x in d["cut_names"]], [int(x) for x in d["cut_counts"]])),
                   # sets saved before the LSF was recorded have neither
                   np.asarray(d.get("lsf_sigma", np.zeros((0, 0))), np.float32),
                   np.asarray(d.get("lsf_sigma_ref", np.zeros(0)), np.float64))


def visit_cuts(mjdqual: NDArray, s2n: NDArray, n_good: NDArray, config: ReferenceConfig) -> dict[str, NDArray[np.bool_]]:
    """The visit-level cuts ``config.cuts`` enables, in the order they are applied: per
    cut, the visits it removes (emission lines, flagged visits, low S/N or no data)."""
    q = np.asarray(mjdqual, np.int64)
    all_cuts = {"emission_line": (q & config.emission_visit_bits) != 0,
                "flagged_visit": (q & config.bad_visit_bits) != 0,
                "low_snr": ~(np.nan_to_num(np.asarray(s2n, float)) >= config.min_snr) | (np.asarray(n_good) == 0)}
    return {name: bad for name, bad in all_cuts.items() if name in config.cuts}


def _log_cut(report: dict[str, int], name: str, n: int, what: str = "stars") -> None:
    report[name] = int(n)
    log.info("reference cut %-15s removes %5d %s", name, n, what)


def build_reference_set(cube, allstar: pd.DataFrame, gaia_xmatch: pd.DataFrame | None,  # noqa: ANN001
                        labels: Sequence[str], config: ReferenceConfig = ReferenceConfig()) -> ReferenceSet:
    """Match, cut and co-add: the empirical reference set from a normalized cube.

    ``cube`` is the xarray Dataset of :func:`mastar_vac.io.cube.open_cube` with
    ``norm_flux``/``norm_ivar``; ``allstar`` has the columns of
    :func:`allstar_columns_for` plus RA, DEC, ASPCAPFLAG, STARFLAG, EXTRATARG and
    optionally VSCATTER, GAIAEDR3_SOURCE_ID, APOGEE_ID.
    """
    if "norm_flux" not in cube:
        raise ValueError("the cube is not normalized yet (run the normalize stage)")
    cuts = set(config.cuts)
    report: dict[str, int] = {}
    visits = pd.DataFrame({
        "MANGAID": cube["mangaid"].values.astype(str), "RA": cube["ra"].values, "DEC": cube["dec"].values,
        "MJDQUAL": cube["mjdqual"].values, "VELVARFLAG": cube["velvarflag"].values,
        "S2N": cube["s2n"].values, "NGOOD": cube["n_good_pixels"].values,
    })
    stars = visits.groupby("MANGAID", sort=True).agg(RA=("RA", "first"), DEC=("DEC", "first"),
                                                    VELVARFLAG=("VELVARFLAG", "max")).reset_index()
    if gaia_xmatch is not None and "SOURCE_ID" in gaia_xmatch:
        stars = stars.merge(gaia_xmatch[["MANGAID", "SOURCE_ID"]].drop_duplicates("MANGAID"), on="MANGAID",
                            how="left")
    log.info("reference: %d MaStar stars (%d visits) in the cube", len(stars), len(visits))

    a = allstar.reset_index(drop=True)
    if "duplicate" in cuts:
        dup = np.zeros(len(a), bool)
        if "EXTRATARG" in a:
            dup |= (a["EXTRATARG"].to_numpy(np.int64) & config.duplicate_extratarg_bits) != 0
        if "APOGEE_ID" in a:
            order = a.assign(_dup=dup).sort_values(["_dup", "SNR"] if "SNR" in a else ["_dup"],
                                                   ascending=[True, False] if "SNR" in a else [True])
            dup |= order.duplicated("APOGEE_ID").reindex(a.index).to_numpy()
        _log_cut(report, "duplicate", int(dup.sum()), "allStar rows")
        a = a[~dup].reset_index(drop=True)
    m = match_stars(stars, a, radius_arcsec=config.match_radius_arcsec)
    report["matched"] = len(m)
    log.info("reference: %d stars matched to APOGEE (%d by Gaia id, %d by position ≤ %.1f″)", len(m),
             int((m["match"] == "gaia").sum()), int((m["match"] == "position").sum()), config.match_radius_arcsec)
    if len(m) == 0:
        raise ValueError("no MaStar star matched an allStar row: check the files and the match radius")
    ap = a.iloc[m["allstar_row"].to_numpy()].reset_index(drop=True)
    m = pd.concat([m, ap.add_prefix("AP_")], axis=1)
    label_names = list(labels)
    labels = derive_labels(ap, label_names)
    keep = np.ones(len(m), bool)

    def star_cut(name: str, bad: NDArray[np.bool_]) -> None:
        nonlocal keep
        if name in cuts:
            _log_cut(report, name, int((keep & bad).sum()))
            keep &= ~bad

    aflag = m["AP_ASPCAPFLAG"].to_numpy(np.int64)
    sflag = m["AP_STARFLAG"].to_numpy(np.int64)
    star_cut("aspcap_bad", (aflag & config.aspcap_bad_bits) != 0)
    star_cut("missing_labels", ~np.isfinite(labels).all(axis=1))
    binary = ((aflag & config.binary_aspcap_bits) != 0) | ((sflag & config.binary_star_bits) != 0)
    if "AP_VSCATTER" in m and config.vscatter_max > 0:
        binary |= np.nan_to_num(m["AP_VSCATTER"].to_numpy(float), nan=0.0) > config.vscatter_max
    vv = stars.set_index("MANGAID")["VELVARFLAG"].reindex(m["MANGAID"]).to_numpy()
    binary |= vv == 1
    star_cut("binary", binary)
    m, labels = m[keep].reset_index(drop=True), labels[keep]

    # visit-level cuts
    vsel = visits["MANGAID"].isin(m["MANGAID"]).to_numpy()
    n_stars_before = len(m)
    vkeep = vsel.copy()
    for name, bad in visit_cuts(visits["MJDQUAL"].to_numpy(), visits["S2N"].to_numpy(), visits["NGOOD"].to_numpy(),
                                config).items():
        lost = vkeep & bad
        still = set(visits["MANGAID"][vkeep & ~bad])
        n_star_lost = len(set(visits["MANGAID"][vkeep]) - still)
        _log_cut(report, name, n_star_lost, f"stars ({int(lost.sum())} visits)")
        vkeep &= ~bad
    present = m["MANGAID"].isin(set(visits["MANGAID"][vkeep])).to_numpy()
    m, labels = m[present].reset_index(drop=True), labels[present]
    assert n_stars_before - len(m) == sum(report.get(k, 0) for k in ("emission_line", "flagged_visit", "low_snr")
                                          if k in cuts)

    # co-add the kept visits of each kept star
    vidx = np.flatnonzero(vkeep)
    star_of = pd.Series(np.arange(len(m)), index=m["MANGAID"])
    groups = star_of.reindex(visits["MANGAID"].to_numpy()[vidx]).to_numpy()
    ok = ~np.isnan(groups)
    vidx, groups = vidx[ok], groups[ok].astype(np.int64)
    nf = cube["norm_flux"].isel(visit=vidx).values
    ni = cube["norm_ivar"].isel(visit=vidx).values
    flux, ivar = coadd(nf, ni, groups, len(m))
    lsf_sigma = coadd_lsf(cube["disp"].isel(visit=vidx) if "disp" in cube else None, ni, groups, len(m),
                          cube["wave"].values)
    n_vis = np.bincount(groups, minlength=len(m))
    with np.errstate(invalid="ignore"):
        sn = np.where(ivar > 0, flux * np.sqrt(ivar), np.nan)
    snr = np.nanmedian(np.where(np.isfinite(sn), sn, np.nan), axis=1) if len(m) else np.array([])
    report["kept"] = len(m)
    log.info("reference: %d stars kept, %d visits co-added", len(m), len(vidx))
    return ReferenceSet(
        label_names=label_names, labels=labels, flux=flux, ivar=ivar, wave=cube["wave"].values,
        ids=m["MANGAID"].to_numpy().astype(str), source=np.full(len(m), "empirical"), n_visits=n_vis,
        snr=snr, apogee_id=(m["AP_APOGEE_ID"].to_numpy().astype(str) if "AP_APOGEE_ID" in m
                            else np.full(len(m), "")),
        cut_report=report, lsf_sigma=lsf_sigma,
    )


def find_label_outliers(emu, ref: ReferenceSet, *, ratio: float, fit_config=None,  # noqa: ANN001
                        skip: NDArray[np.bool_] | None = None) -> pd.DataFrame:
    """Reference stars whose catalogue labels do not describe their own spectrum.

    Each spectrum is fitted with the emulator (starting from its catalogue labels and
    from the start grid); a star is an outlier when χ² at its catalogue labels exceeds
    ``ratio`` times the best-fit χ². This finds mislabelled stars (DESIGN.md: MILES
    m0386, m0330, … fail in every method with χ² far lower at the fitted labels) without
    a hand list. Rows in ``skip`` (e.g. synthetic spectra, whose labels are exact) are
    never outliers. Returns one row per reference spectrum.
    """
    from .fit import FitConfig, _effective_weights, fit_spectra

    # the ratio compares χ² under the pixel noise alone (the emulator-error weighting
    # would shrink both χ² of a mislabelled star towards the emulator's own error)
    cfg = replace(fit_config or FitConfig(), emulator_error=False)
    # the forward model, as the build's fit: each spectrum's model broadened to its LSF
    sig = ref.lsf_sigma if cfg.lsf == "forward" else None
    res = fit_spectra(emu, ref.flux, ref.ivar, starts=ref.labels, config=cfg, lsf_sigma=sig)
    w = _effective_weights(emu, ref.flux, ref.ivar, cfg)
    lo, hi = cfg.bounds_for(emu.label_names)
    model = emu.predict(np.clip(ref.labels, lo, hi), sig)
    chi2_ref = (w * (np.asarray(ref.flux, np.float64) - model) ** 2).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = chi2_ref / res.chi2
    out = pd.DataFrame({"id": ref.ids, "source": ref.source, "chi2_catalogue": chi2_ref, "chi2_best": res.chi2,
                        "ratio": r, "status": res.status})
    for j, name in enumerate(emu.label_names):
        out[name] = ref.labels[:, j]
        out[f"FIT_{name}"] = res.labels[:, j]
    flag = np.nan_to_num(r, nan=np.inf) > ratio
    if skip is not None:
        flag &= ~np.asarray(skip, bool)
    out["outlier"] = flag
    return out
