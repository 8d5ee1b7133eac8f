"""Executes notebooks/oneshot.ipynb and checks what it prints."""

import pytest

from tests.test_notebooks import run_notebook


@pytest.mark.slow
def test_oneshot_notebook():
    results, images = run_notebook("oneshot.ipynb")
    assert results["dense"][0] > 0.9
    for method in ("magnitude", "wanda", "sparsegpt"):
        for pattern, target in (("50%", 0.5), ("80%", 0.8), ("2:4", 0.5)):
            accuracy, sparsity = results[f"{method}_{pattern}"]
            assert 0.0 <= accuracy <= 1.0
            assert sparsity == pytest.approx(target, abs=5e-3)
    # At 50% every method keeps most of the dense accuracy.
    assert min(results[f"{m}_50%"][0] for m in ("wanda", "sparsegpt")) > results["dense"][0] - 0.1
    accuracy, still_sparse = results["finetuned"]
    assert still_sparse == 1.0 and accuracy > 0.8
    assert images == 1
