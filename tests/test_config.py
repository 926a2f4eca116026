"""The TOML configuration: defaults, typing, and precise errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mastar_vac.cluster import slurm_cluster, threads_for_torch
from mastar_vac.config import load_config
from mastar_vac.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load():
    demo = load_config(ROOT / "pipelines" / "demo.toml")
    assert demo.inputs.demo and demo.normalize.window == 400
    dr17 = load_config(ROOT / "pipelines" / "dr17.toml")
    assert dr17.inputs.goodspec.name == "mastar-goodspec-v3_1_1-v1_7_7.fits.gz"
    assert load_config().source == demo.source  # the default is demo.toml


def _write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_unknown_key_is_named(tmp_path):
    p = _write(tmp_path, "[inputs]\ndemo = true\n[normalize]\nwindwo = 300\n")
    with pytest.raises(ConfigError, match=r"c.toml: normalize: unknown key\(s\) windwo"):
        load_config(p)


def test_wrong_type_is_named(tmp_path):
    p = _write(tmp_path, "[inputs]\ndemo = true\n[cube]\nchunk = 'big'\n")
    with pytest.raises(ConfigError, match="cube.chunk: expected an integer"):
        load_config(p)


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[inputs\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_needs_goodspec_unless_demo(tmp_path):
    with pytest.raises(ConfigError, match="needs goodspec"):
        load_config(_write(tmp_path, "[inputs]\nallstar = 'a.fits'\n"))
    with pytest.raises(ConfigError, match="needs allstar"):
        load_config(_write(tmp_path, "[inputs]\ngoodspec = 'g.fits'\n"))


def test_section_checks_become_config_errors(tmp_path):
    p = _write(tmp_path, "[inputs]\ndemo = true\n[fit.bounds]\nTEFF = [9000, 3000]\n")
    with pytest.raises(ConfigError, match="fit: fit.bounds.TEFF: lower bound"):
        load_config(p)
    p = _write(tmp_path, "[inputs]\ndemo = true\n[fit.bounds]\nTEFF = [3000]\n")
    with pytest.raises(ConfigError, match="list of 2 values"):
        load_config(p)
    p = _write(tmp_path, "[inputs]\ndemo = true\n[reference]\ncuts = ['binary', 'nonsense']\n")
    with pytest.raises(ConfigError, match="unknown cut"):
        load_config(p)
    cfg = load_config(_write(tmp_path, "[inputs]\ndemo = true\n[fit.bounds]\nTEFF = [3500, 9000]\n"))
    assert cfg.fit.bounds["TEFF"] == (3500.0, 9000.0) and cfg.fit.bounds["LOGG"] == (-1.0, 5.5)


def test_paths_expand(tmp_path, monkeypatch):
    monkeypatch.setenv("MYDATA", "/data/sdss")
    cfg = load_config(_write(tmp_path, "[inputs]\ngoodspec = '$MYDATA/gs.fits.gz'\nallstar = 'a.fits'\n"))
    assert cfg.inputs.goodspec == Path("/data/sdss/gs.fits.gz")


def test_thread_budget():
    assert threads_for_torch(16, 4, 2) == 2
    assert threads_for_torch(2, 2, 1) == 1
    assert threads_for_torch(2, 4, 1) == 1  # never zero
    for cores, w, t in [(16, 4, 2), (32, 3, 5), (2, 1, 1)]:
        assert threads_for_torch(cores, w, t) * w * t <= max(cores, w * t)


def test_slurm_profile_makes_a_job_script():
    pytest.importorskip("dask_jobqueue")
    cluster = slurm_cluster(ROOT / "pipelines" / "cluster" / "slurm.toml", scale=False)
    try:
        script = cluster.job_script()
        assert "#SBATCH" in script and "--constraint=cpu" in script and "-t 02:00:00" in script and "--nworkers 4" in script
    finally:
        cluster.close()


@pytest.mark.parametrize("table, line, name", [
    ("fit.bounds", "TEFFF = [3000, 32000]", "TEFFF"),
    ("uncertainty.floor", "LOGGG = 0.01", "LOGGG"),
])
def test_nested_label_tables_refuse_unknown_labels(tmp_path, table, line, name):
    """A misspelt label in a nested table used to be kept and never read (the default
    then silently applied to the label meant)."""
    p = _write(tmp_path, f"[inputs]\ndemo = true\n[{table}]\n{line}\n")
    with pytest.raises(ConfigError, match=rf"\[{table}\] unknown label\(s\) {name}; known: .*TEFF"):
        load_config(p)
    ok = _write(tmp_path, f"[inputs]\ndemo = true\n[{table}]\n{line.replace(name, name[:-1])}\n")
    load_config(ok)  # the right spelling loads


def test_combspec_is_refused_not_ignored(tmp_path):
    p = _write(tmp_path, "[inputs]\ndemo = true\ncombspec = '/no/such/file'\n")
    with pytest.raises(ConfigError, match="inputs.combspec .* resolution study"):
        load_config(p)
