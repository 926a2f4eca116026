"""The example notebook runs top to bottom on a small catalogue and draws the Kiel diagram.

The kernel is this interpreter: a kernelspec pointing at ``sys.executable`` is written
into a temporary Jupyter path, so the test does not depend on which ``python3`` kernel
(if any) the machine has registered — a fresh CI machine that only ran
``pip install -e '.[test,cluster]'`` has ipykernel but maybe no kernelspec of its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mastar_vac.io.vac import write_vac_parquet

from .test_vac import make_vac_frame

# the [test] extra is required to run the tests: a missing one must fail, not skip
import ipykernel.kernelspec as ipykernel_kernelspec  # noqa: E402
import nbclient  # noqa: E402
import nbformat  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_catalog.ipynb"
KERNEL = "mastar-vac-test-python"


def test_notebook_is_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "outputs saved in the notebook"
    source = "\n".join(c.source for c in nb.cells)
    assert "MASTAR_VAC_CATALOG" in source and "dd.read_parquet" in source and "pyproject.toml" in source


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_notebook_executes(tmp_path, monkeypatch):
    catalog = write_vac_parquet(tmp_path / "cat.parquet", make_vac_frame(60, seed=5), provenance={"seed": 5},
                                fitted_labels=["TEFF", "LOGG", "FE_H"], rows_per_file=25)
    kernels = tmp_path / "jupyter" / "kernels"
    ipykernel_kernelspec.write_kernel_spec(kernels / KERNEL)  # argv = [sys.executable, -m, ipykernel_launcher, …]
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MASTAR_VAC_CATALOG", str(catalog))
    monkeypatch.setenv("MPLBACKEND", "Agg")  # the notebook must select the inline backend itself

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=120,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream")
    assert str(catalog) in text
    assert "60 visits" in text and "3 partitions, 60 visits" in text
    kiel = next(c for c in nb.cells if c.get("id") == "kiel")
    assert any("image/png" in o.get("data", {}) for o in kiel.outputs), "no Kiel figure"
