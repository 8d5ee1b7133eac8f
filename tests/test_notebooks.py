"""Executes the notebooks top to bottom (nbclient) and checks what they print."""

from pathlib import Path

import nbformat
import pytest

nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]


def run_notebook(name):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    results = {}
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                raise AssertionError(f"{name}: {out['ename']}: {out['evalue']}")
            for line in out.get("text", "").splitlines():
                if line.startswith("RESULT "):
                    key, *values = line.split()[1:]
                    results[key] = [float(v) for v in values]
    images = sum("image/png" in out.get("data", {}) for c in nb.cells
                 for out in c.get("outputs", []))
    return results, images


def test_notebooks_start_with_a_guarded_install_cell():
    for name in ("quickstart.ipynb", "methods_comparison.ipynb"):
        nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"][0].source
        assert 'find_spec("jaxsparse") is None' in code and "pip" in code


@pytest.mark.slow
def test_quickstart_notebook():
    results, images = run_notebook("quickstart.ipynb")
    assert results["rigl_accuracy"][0] > 0.85
    assert results["sparsity"][0] == pytest.approx(0.9, abs=2e-3)
    assert results["changed_total"][0] > 0  # the masks did change
    assert images == 1


@pytest.mark.slow
def test_methods_comparison_notebook():
    results, images = run_notebook("methods_comparison.ipynb")
    assert set(results) == {"dense", "static", "set", "rigl", "snfs", "magnitude"}
    assert results["dense"][0] > 0.9
    for method in ("static", "set", "rigl", "snfs", "magnitude"):
        accuracy, sparsity = results[method]
        assert accuracy > 0.5 and 0.85 < sparsity < 0.9
    assert images == 1
