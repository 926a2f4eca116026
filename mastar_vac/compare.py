"""Comparison with LAMOST, SEGUE and Gaia (paper §4.3, Table 2 and the Gaia CMD figure).

Three steps, each a pure pandas function with a thin Dask layer around the first:

1. :func:`crossmatch` joins the per-visit VAC to an external catalogue, one star at a
   time: every MaStar star (unique MANGAID and its RA/DEC) gets the **nearest** external
   row within ``radius_arcsec`` (1.5″ by default: MaStar positions are at the epoch of
   each star's input catalogue, Gaia's at 2016.0, so the radius must absorb a few
   years of proper motion; datamodels.md §7), or, where both sides share a Gaia
   EDR3/DR3 source_id, the row with the same id (``id_match``). The external
   catalogue may be far larger than memory (LAMOST DR10 ~10⁷ rows), so it is consumed
   in blocks and each block keeps only its rows matched to a MaStar star; the small
   star table is broadcast once to every block task.
2. :func:`comparison_table` gives, per label, N, the median offset (VAC − survey), the
   standard-deviation scatter and the robust 1.4826·MAD scatter (the paper's Table 2
   quotes median offsets and standard deviations; the MAD is there for reference
   because a handful of catastrophic external values inflate σ).
3. :func:`cmd_table` gives the Gaia colour–magnitude diagram data (BP−RP against M_G
   from the parallax) with the VAC labels, for ``mastar_vac.plots``.

Why :meth:`~astropy.coordinates.SkyCoord.search_around_sky` and not
``match_to_catalog_sky`` in the blocks: the latter returns one nearest neighbour per
star *per block*, chosen arbitrarily among rows at the same position, and LAMOST repeat
observations of one star share the same input-catalogue position. All pairs within the
radius are kept instead, and :func:`best_per_star` picks the nearest with an explicit,
block-independent tie rule: separation (to 1 mas), then higher S/N, then the smaller
external id. The answer is therefore the same whatever the block size.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import astropy.units as u
import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
from astropy.coordinates import SkyCoord
from scipy.stats import median_abs_deviation

__all__ = [
    "LABELS",
    "star_table",
    "match_positions",
    "match_ids",
    "best_per_star",
    "attach",
    "crossmatch",
    "comparison_table",
    "format_comparison_tables",
    "cmd_table",
    "absolute_magnitude",
]

log = logging.getLogger(__name__)

LABELS = ("TEFF", "LOGG", "FEH", "ALPHA")
SEP = "SEP_ARCSEC"  # separation column of the matched external row (prefixed in the output)
_KEY = "_MATCH_KEY"
_LABEL_NAMES = {"TEFF": ("Teff", "K"), "LOGG": ("log g", "dex"), "FEH": ("[Fe/H]", "dex"),
                "ALPHA": ("[alpha/Fe]", "dex"), "VMICRO": ("log vmicro", "dex")}

ExternalBlocks = dd.DataFrame | pd.DataFrame | Iterable[pd.DataFrame]


# ---------------------------------------------------------------------------
# pure core
# ---------------------------------------------------------------------------

def _key_strings(values: pd.Series) -> pd.Series:
    """IDs as comparable strings: 64-bit integers exactly, whatever dtype carried them.

    An id held in a float column has already lost digits beyond 2⁵³; such columns are
    converted anyway (rounded) but cannot be trusted — keep ids in integer columns.
    """
    s = pd.Series(values)
    if s.dtype.kind == "f":
        s = s.round().astype("Int64")
    if isinstance(s.dtype, pd.Int64Dtype) or s.dtype.kind in "iu":
        vals = s.astype("Int64")
        ok = (vals.notna() & (vals > 0)).fillna(False).to_numpy(dtype=bool)
        out = np.full(len(s), "", dtype=object)
        out[ok] = vals[ok].astype("int64").astype(str).to_numpy(dtype=object)
        return pd.Series(out, index=s.index, dtype=object)
    txt = s.astype(object).where(s.notna(), "").astype(str).str.strip()
    return txt.where(~txt.str.lower().isin(["nan", "<na>", "none", "-9999", "-999", "0"]), "").astype(object)


def star_table(vac: pd.DataFrame, id_col: str | None = None) -> pd.DataFrame:
    """One row per MaStar star: MANGAID, RA, DEC (first non-null of its visits) and, with
    ``id_col``, the shared identifier as a string key. Stars that cannot be matched
    (no finite position, or no id) are left out."""
    cols = list(dict.fromkeys(["MANGAID", "RA", "DEC"] + ([id_col] if id_col else [])))
    missing = [c for c in cols if c not in vac.columns]
    if missing:
        raise KeyError(f"VAC lacks column(s) {missing} needed for the cross-match")
    t = vac[cols].groupby("MANGAID", sort=True, as_index=False).first()
    if id_col == "MANGAID":  # matching on the MaStar id itself
        t["_ID_COPY"] = t["MANGAID"]
        id_col = "_ID_COPY"
    t["RA"] = pd.to_numeric(t["RA"], errors="coerce").astype(np.float64)
    t["DEC"] = pd.to_numeric(t["DEC"], errors="coerce").astype(np.float64)
    if id_col:
        t[_KEY] = _key_strings(t[id_col]).to_numpy()
        t = t.drop(columns=[id_col])
        keep = t[_KEY] != ""
    else:
        keep = np.isfinite(t["RA"]) & np.isfinite(t["DEC"])
    dropped = int((~keep).sum())
    if dropped:
        log.info("cross-match: %d of %d stars have no %s and cannot match", dropped, len(t),
                 id_col or "finite RA/DEC")
    return t[keep].reset_index(drop=True)


def _candidates(block: pd.DataFrame, idx_ext: np.ndarray, mangaid: np.ndarray, sep: np.ndarray) -> pd.DataFrame:
    out = block.iloc[idx_ext].reset_index(drop=True)
    out["MANGAID"] = pd.Series(mangaid, dtype=object).astype(str).to_numpy()
    out[SEP] = np.asarray(sep, dtype=np.float64)
    return out


def match_positions(stars: pd.DataFrame, block: pd.DataFrame, radius_arcsec: float) -> pd.DataFrame:
    """All (star, external row) pairs of this block closer than ``radius_arcsec``.

    Returns the external rows (standardized columns) with MANGAID and SEP_ARCSEC added.
    """
    ra = pd.to_numeric(block["RA"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    dec = pd.to_numeric(block["DEC"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    ok = np.flatnonzero(np.isfinite(ra) & np.isfinite(dec))
    if len(stars) == 0 or len(ok) == 0:
        return _candidates(block, np.array([], dtype=np.int64), np.array([], dtype=str), np.array([]))
    sc = SkyCoord(ra=stars["RA"].to_numpy() * u.deg, dec=stars["DEC"].to_numpy() * u.deg)
    bc = SkyCoord(ra=ra[ok] * u.deg, dec=dec[ok] * u.deg)
    # KD-tree on the stars (self); the block rows are the search points
    idx_block, idx_star, sep, _ = sc.search_around_sky(bc, radius_arcsec * u.arcsec)
    return _candidates(block, ok[idx_block], stars["MANGAID"].to_numpy()[idx_star], sep.to_value(u.arcsec))


def _angsep_arcsec(ra1: np.ndarray, dec1: np.ndarray, ra2: np.ndarray, dec2: np.ndarray) -> np.ndarray:
    """Great-circle separation (Vincenty formula, stable at all distances)."""
    l1, b1, l2, b2 = (np.radians(np.asarray(x, dtype=np.float64)) for x in (ra1, dec1, ra2, dec2))
    dl = l2 - l1
    num = np.hypot(np.cos(b2) * np.sin(dl), np.cos(b1) * np.sin(b2) - np.sin(b1) * np.cos(b2) * np.cos(dl))
    den = np.sin(b1) * np.sin(b2) + np.cos(b1) * np.cos(b2) * np.cos(dl)
    return np.degrees(np.arctan2(num, den)) * 3600.0


def match_ids(stars: pd.DataFrame, block: pd.DataFrame, ext_col: str) -> pd.DataFrame:
    """External rows of this block whose ``ext_col`` equals a star's id key.

    SEP_ARCSEC is still computed (NaN where a position is missing): it shows the epoch
    difference between the catalogues and is a sanity check of the id match.
    """
    if ext_col not in block.columns:
        raise KeyError(f"external catalogue has no column {ext_col!r} for the id match; "
                       f"it has {list(block.columns)}")
    left = pd.DataFrame({"k": stars[_KEY].to_numpy(dtype=object), "i": np.arange(len(stars))})
    right = pd.DataFrame({"k": _key_strings(block[ext_col]).to_numpy(dtype=object), "j": np.arange(len(block))})
    pairs = left.merge(right[right["k"] != ""], on="k", how="inner")  # every equal pair
    i_star = pairs["i"].to_numpy(dtype=np.int64)
    i_ext = pairs["j"].to_numpy(dtype=np.int64)
    ra = pd.to_numeric(block["RA"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    dec = pd.to_numeric(block["DEC"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    sep = _angsep_arcsec(stars["RA"].to_numpy()[i_star], stars["DEC"].to_numpy()[i_star], ra[i_ext], dec[i_ext])
    return _candidates(block, i_ext, stars["MANGAID"].to_numpy()[i_star], sep)


def best_per_star(candidates: pd.DataFrame) -> pd.DataFrame:
    """The one external row kept per star: nearest (to 1 mas), then higher S/N, then the
    smaller external id — a total order, so blocking and task order cannot change it."""
    if candidates.empty:
        return candidates.reset_index(drop=True)
    sep = candidates[SEP].to_numpy(dtype=np.float64, na_value=np.nan)
    sep_mas = np.where(np.isfinite(sep), np.round(sep * 1000.0), np.inf)
    snr = (pd.to_numeric(candidates["SNR"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
           if "SNR" in candidates else np.full(len(candidates), np.nan))
    neg_snr = np.where(np.isfinite(snr), -snr, np.inf)
    ext_id = candidates["ext_id"].astype(str).to_numpy() if "ext_id" in candidates else np.zeros(len(candidates))
    order = np.lexsort((ext_id, neg_snr, sep_mas, candidates["MANGAID"].astype(str).to_numpy()))
    ordered = candidates.iloc[order]
    return ordered[~ordered["MANGAID"].duplicated(keep="first")].reset_index(drop=True)


def _match_block(block: pd.DataFrame, stars: pd.DataFrame, radius_arcsec: float, ext_col: str | None,
                 ext_filter: Callable[[pd.DataFrame], Any] | None) -> pd.DataFrame:
    """One block → its best candidate per star (the map step, run inside Dask tasks)."""
    if ext_filter is not None and len(block):
        keep = np.asarray(ext_filter(block), dtype=bool)
        block = block[keep]
    if ext_col is None:
        cands = match_positions(stars, block, radius_arcsec)
    else:
        cands = match_ids(stars, block, ext_col)
    return best_per_star(cands)


def _reduce(parts: Sequence[pd.DataFrame] | pd.DataFrame) -> pd.DataFrame:
    if isinstance(parts, pd.DataFrame):
        return best_per_star(parts)
    if not len(parts):
        return pd.DataFrame()
    parts = [p for p in parts if len(p)] or list(parts[:1])
    return best_per_star(pd.concat(parts, ignore_index=True)) if len(parts) > 1 else best_per_star(parts[0])


def _prefixed_name(prefix: str, col: str) -> str:
    return f"{prefix}_ID" if col == "ext_id" else f"{prefix}_{col}"


def attach(part: pd.DataFrame, best: pd.DataFrame, prefix: str, how: str = "inner") -> pd.DataFrame:
    """VAC rows joined (on MANGAID) with their star's matched external row, prefixed."""
    ext = best.drop(columns=["survey"], errors="ignore")
    ext = ext.rename(columns={c: _prefixed_name(prefix, c) for c in ext.columns if c != "MANGAID"})
    clash = (set(ext.columns) - {"MANGAID"}) & set(part.columns)
    if clash:
        raise ValueError(f"VAC already has column(s) {sorted(clash)}; choose another prefix")
    ext = ext.astype({"MANGAID": part["MANGAID"].dtype})
    return part.merge(ext, on="MANGAID", how=how)


# ---------------------------------------------------------------------------
# Dask layer
# ---------------------------------------------------------------------------

def _survey_prefix(first: pd.DataFrame | None) -> str:
    if first is not None and "survey" in first and len(first):
        return str(first["survey"].iloc[0]).upper()
    raise ValueError("cannot tell the survey from the external blocks; pass prefix=")


def crossmatch(vac: dd.DataFrame | pd.DataFrame, external_blocks: ExternalBlocks, *,
               radius_arcsec: float = 1.5, id_match: tuple[str, str] | None = None,
               prefix: str | None = None, how: str = "inner",
               ext_filter: Callable[[pd.DataFrame], Any] | None = None,
               blocks_in_flight: int = 4) -> dd.DataFrame:
    """Join the per-visit VAC to an external catalogue, one match per MaStar star.

    Parameters
    ----------
    vac
        The per-visit VAC (MANGAID, RA, DEC, labels, VALID, …), Dask or pandas.
    external_blocks
        The external catalogue in the standardized schema of
        :mod:`mastar_vac.io.catalogs`, as either
        a Dask dataframe (e.g. :func:`~mastar_vac.io.catalogs.dask_external`): lazy,
        one match task per partition, run in parallel by the scheduler; or an iterable
        of pandas blocks (e.g. ``iter_lamost_blocks(path, rows)``): consumed now, as it
        streams, ``blocks_in_flight`` blocks at a time as Dask tasks, so memory is a few
        blocks plus the matches; or one pandas DataFrame.
    radius_arcsec
        Positional match radius.
    id_match
        ``(vac_col, ext_col)``: match on an identifier both sides share instead of on
        positions, e.g. ``("SOURCE_ID", "SOURCE_ID")`` for the VAC's Gaia EDR3 id
        against Gaia DR3 (EDR3 ids = DR3 ids). Do not use it with LAMOST's
        ``GAIA_SOURCE_ID`` unless that LAMOST release used Gaia (E)DR3 (DR8 used DR2).
    prefix
        Prefix of the external columns in the output (default: the ``survey`` column,
        e.g. ``LAMOST`` → LAMOST_TEFF, LAMOST_ID, LAMOST_SEP_ARCSEC).
    how
        ``"inner"`` (default: only VAC rows whose star matched) or ``"left"``.
    ext_filter
        Optional ``block → boolean mask`` applied before matching, e.g.
        ``lambda b: b["TEFF"].notna()`` so that a nearer row without parameters cannot
        hide a usable one.

    Returns
    -------
    dask.dataframe.DataFrame
        The VAC rows with the matched external columns appended (one row per VAC row
        that matched; all visits of a star get the same external row).
    """
    if how not in ("inner", "left"):
        raise ValueError("how must be 'inner' or 'left'")
    if radius_arcsec <= 0:
        raise ValueError("radius_arcsec must be positive")
    if isinstance(vac, pd.DataFrame):
        vac = dd.from_pandas(vac, npartitions=1)
    vac_col, ext_col = id_match if id_match is not None else (None, None)
    star_cols = list(dict.fromkeys(["MANGAID", "RA", "DEC"] + ([vac_col] if vac_col else [])))
    missing = [c for c in star_cols if c not in vac.columns]
    if missing:
        raise KeyError(f"VAC lacks column(s) {missing} needed for the cross-match")

    if isinstance(external_blocks, dd.DataFrame):
        ext = external_blocks
        if prefix is None:
            # reads the first partition only
            prefix = _survey_prefix(ext.head(1, npartitions=1, compute=True) if ext.npartitions else None)
        stars_d = dask.delayed(star_table, pure=True)(vac[star_cols], vac_col)
        star_meta = star_table(vac._meta[star_cols], vac_col)
        cand_meta = _match_block(ext._meta, star_meta, radius_arcsec, ext_col, None)
        cands = ext.map_partitions(_match_block, stars_d, radius_arcsec, ext_col, ext_filter,
                                   meta=cand_meta, enforce_metadata=False)
        best: Any = dask.delayed(_reduce, pure=True)(cands)
        best_meta = cand_meta
    else:
        blocks: Iterable[pd.DataFrame] = ([external_blocks] if isinstance(external_blocks, pd.DataFrame)
                                          else external_blocks)
        stars = star_table(vac[star_cols].compute(), vac_col)
        best_df, first, nrows, nblocks = _stream_match(blocks, stars, radius_arcsec, ext_col, ext_filter,
                                                       max(1, blocks_in_flight))
        if first is None:
            raise ValueError("the external catalogue has no rows")
        if prefix is None:
            prefix = _survey_prefix(first)
        log.info("cross-match %s: %d stars, %d external rows in %d blocks, %d stars matched",
                 prefix, len(stars), nrows, nblocks, len(best_df))
        best_meta = best_df.iloc[:0]
        best = dask.delayed(best_df, pure=True)  # one key, broadcast to every partition
    prefix = prefix.upper().rstrip("_")
    meta = attach(vac._meta, best_meta, prefix, how)  # raises early on a column clash
    return vac.map_partitions(attach, best, prefix, how, meta=meta, enforce_metadata=False)


def _stream_match(blocks: Iterable[pd.DataFrame], stars: pd.DataFrame, radius_arcsec: float,
                  ext_col: str | None, ext_filter: Callable[[pd.DataFrame], Any] | None, in_flight: int
                  ) -> tuple[pd.DataFrame, pd.DataFrame | None, int, int]:
    """Match a stream of blocks ``in_flight`` at a time, reducing as it goes, so that
    memory holds a few blocks and at most one candidate per star and block group."""
    stars_d = dask.delayed(stars, pure=True)
    it = iter(blocks)
    best: pd.DataFrame | None = None
    first: pd.DataFrame | None = None
    nrows = nblocks = 0
    while True:
        group = list(itertools.islice(it, in_flight))
        if not group:
            break
        if first is None:
            first = group[0].iloc[:1]  # for the survey name; the block itself is not kept
        nrows += sum(len(b) for b in group)
        nblocks += len(group)
        tasks = [dask.delayed(_match_block, pure=True)(b, stars_d, radius_arcsec, ext_col, ext_filter)
                 for b in group]
        parts = list(dask.compute(*tasks))
        if best is not None:
            parts.insert(0, best)
        best = _reduce(parts)
    if best is None:
        return pd.DataFrame(), None, 0, 0
    return best, first, nrows, nblocks


# ---------------------------------------------------------------------------
# Table 2 analogue
# ---------------------------------------------------------------------------

def _robust_std(x: np.ndarray) -> float:
    return float(1.4826 * median_abs_deviation(x)) if len(x) else np.nan


def comparison_table(joined: pd.DataFrame, survey: str, labels: Sequence[str] = LABELS,
                     valid_only: bool = True, *, per_star: bool = False) -> pd.DataFrame:
    """Per label: N, median offset (VAC − survey), σ scatter and 1.4826·MAD scatter.

    ``joined`` is the output of :func:`crossmatch` (computed); ``survey`` is its prefix
    (``"LAMOST"``). Rows count when both values are finite and, with ``valid_only``,
    VALID == 1 — flagged fits are in the VAC but must not enter the comparison.
    ``per_star`` compares each star's median over its (valid) visits instead of every
    visit, so that stars with many visits do not weigh more. σ uses ddof=1.
    """
    if hasattr(joined, "compute") and not isinstance(joined, pd.DataFrame):
        joined = joined.compute()
    prefix = survey.upper().rstrip("_")
    df = joined
    if valid_only:
        if "VALID" not in df.columns:
            raise KeyError("valid_only=True but the joined table has no VALID column")
        df = df[pd.to_numeric(df["VALID"], errors="coerce").fillna(0).to_numpy() == 1]
    rows = []
    for lab in labels:
        ext = f"{prefix}_{lab}"
        if lab not in df.columns or ext not in df.columns:
            log.debug("comparison %s: no %s or %s column", prefix, lab, ext)
            rows.append({"LABEL": lab, "N": 0, "MEDIAN_OFFSET": np.nan, "MEAN_OFFSET": np.nan,
                         "STD": np.nan, "MAD_STD": np.nan})
            continue
        pair = pd.DataFrame({
            "MANGAID": df["MANGAID"].to_numpy() if "MANGAID" in df else np.arange(len(df)),
            "v": pd.to_numeric(df[lab], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan),
            "e": pd.to_numeric(df[ext], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan),
        })
        pair = pair[np.isfinite(pair["v"]) & np.isfinite(pair["e"])]
        if per_star and len(pair):
            pair = pair.groupby("MANGAID", sort=False).agg(v=("v", "median"), e=("e", "first"))
        d = (pair["v"] - pair["e"]).to_numpy(dtype=np.float64)
        rows.append({
            "LABEL": lab, "N": int(len(d)),
            "MEDIAN_OFFSET": float(np.median(d)) if len(d) else np.nan,
            "MEAN_OFFSET": float(np.mean(d)) if len(d) else np.nan,
            "STD": float(np.std(d, ddof=1)) if len(d) > 1 else np.nan,
            "MAD_STD": _robust_std(d),
        })
    out = pd.DataFrame(rows).set_index("LABEL")
    out.insert(0, "SURVEY", prefix)
    return out


def format_comparison_tables(tables: Mapping[str, pd.DataFrame]) -> str:
    """The comparison tables as one aligned text block (the report's Table 2)."""
    head = f"{'survey':<8} {'label':<17} {'N':>7} {'median offset':>14} {'scatter (std)':>14} {'1.4826*MAD':>11}"
    lines = ["Comparison with external catalogues (offset = VAC - survey)", head, "-" * len(head)]
    for survey, table in tables.items():
        for lab, r in table.iterrows():
            name, unit = _LABEL_NAMES.get(str(lab), (str(lab), ""))
            label = f"{name} [{unit}]" if unit else name
            fmt = "{:+.0f}" if unit == "K" else "{:+.3f}"
            sfmt = "{:.0f}" if unit == "K" else "{:.3f}"

            def f(x: float, spec: str) -> str:
                return "-" if not np.isfinite(x) else spec.format(x)

            lines.append(f"{survey:<8} {label:<17} {int(r['N']):>7} {f(r['MEDIAN_OFFSET'], fmt):>14} "
                         f"{f(r['STD'], sfmt):>14} {f(r['MAD_STD'], sfmt):>11}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# colour-magnitude diagram
# ---------------------------------------------------------------------------

_GAIA_ALIASES = {
    "PARALLAX": ("GAIA_PARALLAX", "PARALLAX"),
    "PARALLAX_ERROR": ("GAIA_PARALLAX_ERROR", "PARALLAX_ERROR"),
    "G": ("GAIA_G", "G", "PHOT_G_MEAN_MAG"),
    "BP_RP": ("GAIA_BP_RP", "BP_RP"),
}


def absolute_magnitude(g: np.ndarray, parallax_mas: np.ndarray) -> np.ndarray:
    """M_G = G + 5 log10(ϖ / 1 mas) − 10, i.e. distance 1/ϖ (no extinction correction)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(g, dtype=np.float64) + 5.0 * np.log10(np.asarray(parallax_mas, dtype=np.float64)) - 10.0


def _find(frame: pd.DataFrame, names: Sequence[str]) -> str | None:
    lower = {str(c).lower(): c for c in frame.columns}
    for n in names:
        if n.lower() in lower:
            return lower[n.lower()]
    return None


def cmd_table(vac: pd.DataFrame, gaia: pd.DataFrame | None = None, *,
              on: str | tuple[str, str] | None = None, min_parallax_over_error: float = 5.0,
              valid_only: bool = True, labels: Sequence[str] = (*LABELS, "VMICRO")) -> pd.DataFrame:
    """Data for the Gaia colour–magnitude diagram coloured by each VAC label.

    ``gaia`` is a standardized Gaia DR3 frame (:func:`~mastar_vac.io.catalogs.read_gaia_dr3`),
    the MaStar Gaia crossmatch VAC (PARALLAX, PHOT_G_MEAN_MAG, BP_RP), or None when
    ``vac`` already carries GAIA_* columns from :func:`crossmatch`. The join key is
    ``on`` (a column, or ``(vac_col, gaia_col)``), else MANGAID when both have it, else
    SOURCE_ID.

    Stars with ϖ/σ_ϖ < ``min_parallax_over_error`` (default 5) or ϖ ≤ 0 are dropped:
    M_G uses d = 1/ϖ, which is biased and noisy beyond ~20 % fractional parallax error
    (Bailer-Jones 2015); at ϖ/σ ≥ 5 the 1/ϖ distance is good to ~0.4 mag in M_G at worst
    and the CMD sequences stay sharp. Colours and magnitudes are not dereddened.

    Returns one row per VAC visit: MANGAID (and the visit keys when present), BP_RP,
    M_G, G, PARALLAX, PARALLAX_OVER_ERROR, VALID and the labels present in ``vac``.
    """
    if hasattr(vac, "compute") and not isinstance(vac, pd.DataFrame):
        vac = vac.compute()
    if gaia is None:
        df = vac.copy()
    else:
        if on is None:
            if "MANGAID" in gaia.columns and "MANGAID" in vac.columns:
                on = "MANGAID"
            elif _find(gaia, ["SOURCE_ID"]) and "SOURCE_ID" in vac.columns:
                on = ("SOURCE_ID", _find(gaia, ["SOURCE_ID"]) or "SOURCE_ID")
            else:
                raise ValueError("no join key: give on=, or supply MANGAID or SOURCE_ID on both sides")
        vac_key, gaia_key = (on, on) if isinstance(on, str) else on
        cols = {k: _find(gaia, names) for k, names in _GAIA_ALIASES.items()}
        absent = [k for k, c in cols.items() if c is None]
        if absent:
            raise KeyError(f"Gaia table lacks {absent}; accepted names: "
                           + "; ".join(f"{k}: {', '.join(_GAIA_ALIASES[k])}" for k in absent))
        g = pd.DataFrame({k: pd.to_numeric(gaia[c], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
                          for k, c in cols.items() if c is not None})
        g[_KEY] = _key_strings(gaia[gaia_key]).to_numpy()
        g = g[g[_KEY] != ""].drop_duplicates(_KEY)
        left = vac.copy()
        left[_KEY] = _key_strings(vac[vac_key]).to_numpy()
        clash = [c for c in ("PARALLAX", "PARALLAX_ERROR", "G", "BP_RP") if c in left.columns]
        left = left.drop(columns=clash)
        df = left.merge(g, on=_KEY, how="inner").drop(columns=[_KEY])
    names = {k: _find(df, v) for k, v in _GAIA_ALIASES.items()}
    if any(v is None for v in names.values()):
        raise KeyError(f"no Gaia columns {[k for k, v in names.items() if v is None]} in the table")
    plx = pd.to_numeric(df[names["PARALLAX"]], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    plx_err = pd.to_numeric(df[names["PARALLAX_ERROR"]], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    gmag = pd.to_numeric(df[names["G"]], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bprp = pd.to_numeric(df[names["BP_RP"]], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        poe = plx / plx_err
    keep = (plx > 0) & (poe >= min_parallax_over_error) & np.isfinite(gmag) & np.isfinite(bprp)
    if valid_only and "VALID" in df.columns:
        keep &= pd.to_numeric(df["VALID"], errors="coerce").fillna(0).to_numpy() == 1
    log.info("CMD: %d of %d rows kept (parallax/error >= %g%s)", int(keep.sum()), len(df),
             min_parallax_over_error, ", VALID == 1" if valid_only else "")
    out = pd.DataFrame({c: df[c].to_numpy() for c in ("MANGAID", "PLATE", "IFUDESIGN", "MJD") if c in df.columns})
    out["BP_RP"] = bprp
    out["M_G"] = absolute_magnitude(gmag, plx)
    out["G"] = gmag
    out["PARALLAX"] = plx
    out["PARALLAX_OVER_ERROR"] = poe
    if "VALID" in df.columns:
        out["VALID"] = df["VALID"].to_numpy()
    for lab in labels:
        if lab in df.columns:
            out[lab] = pd.to_numeric(df[lab], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return out[keep].reset_index(drop=True)
