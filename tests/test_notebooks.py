"""Executes the notebooks top to bottom (nbclient) and checks what they print."""

import os
import shutil
import subprocess
import sys
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


NOTEBOOKS = ("quickstart.ipynb", "methods_comparison.ipynb", "oneshot.ipynb")


def setup_cell(name="quickstart.ipynb"):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    return [c for c in nb.cells if c.cell_type == "code"][0].source


def run_setup_cell(cwd, repo_url=""):
    """Runs the notebooks' setup cell in a fresh interpreter started in ``cwd`` (without
    PYTHONPATH), then imports what the notebooks import; returns the completed process."""
    source = setup_cell()
    assert 'REPO_URL = ""' in source
    source = source.replace('REPO_URL = ""', f"REPO_URL = {repo_url!r}", 1)
    check = "import experiments, jaxsparse; print('FROM', experiments.__file__, jaxsparse.__file__)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", source + "\n" + check], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_notebooks_share_one_setup_cell():
    # `experiments` is not in the pip package: no notebook may count on pip to provide it.
    cells = {name: setup_cell(name) for name in NOTEBOOKS}
    assert len(set(cells.values())) == 1, "the notebooks' first code cells differ"
    source = cells["quickstart.ipynb"]
    assert "sys.path.insert(0, str(root))" in source and '"git", "clone"' in source
    assert '"jaxsparse[experiments]"' not in source  # pip's jaxsparse has no `experiments`


def test_setup_cell_finds_the_checkout_from_the_notebooks_folder():
    # Jupyter started in notebooks/: the checkout's root is two levels up from a module.
    out = run_setup_cell(ROOT / "notebooks")
    assert out.returncode == 0, out.stderr
    line = [x for x in out.stdout.splitlines() if x.startswith("FROM ")][0]
    experiments_init, jaxsparse_init = map(Path, line.split()[1:])
    assert experiments_init.parents[1] == ROOT and jaxsparse_init.parents[1] == ROOT
    assert "pip" not in out.stderr  # nothing installed from a checkout


def test_setup_cell_outside_a_checkout_asks_for_the_repository(tmp_path):
    out = run_setup_cell(tmp_path)
    assert out.returncode != 0
    assert "RuntimeError" in out.stderr and "REPO_URL" in out.stderr


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs git and a git checkout")
def test_setup_cell_clones_the_repository_given_repo_url(tmp_path):
    # The Colab path, with this checkout's committed HEAD standing in for the remote.
    out = run_setup_cell(tmp_path, repo_url=ROOT.as_uri())
    assert out.returncode == 0, out.stderr
    line = [x for x in out.stdout.splitlines() if x.startswith("FROM ")][0]
    clone = (tmp_path / "jaxsparse-checkout").resolve()
    assert Path(line.split()[1]).parents[1] == clone and Path(line.split()[2]).parents[1] == clone


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
