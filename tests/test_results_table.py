from experiments import results_table


def _rec(alg, s, seed, acc, **extra):
    return {"event": "final", "algorithm": alg, "sparsity_target": s, "seed": seed,
            "test_accuracy": acc, "wall_time": 1.0, **extra}


def test_accuracy_table_mean_std_and_published():
    recs = [_rec("dense", 0.0, 0, 0.98), _rec("dense", 0.0, 1, 0.99),
            _rec("set", 0.9, 0, 0.97), _rec("set", 0.9, 1, 0.95)]
    text = results_table.accuracy_table(recs, results_table.PUBLISHED["lenet300_mnist"])
    lines = text.splitlines()
    assert lines[0] == "| method | 90% |"
    # Sample std (ddof=1): |a - b| / sqrt(2) for two values.
    assert "98.50 +- 0.71 (n=2) / pub. 98.69" in lines[2]
    assert "96.00 +- 1.41 (n=2) / pub. 98.39" in lines[3]
    one = results_table.accuracy_table([_rec("set", 0.9, 0, 0.97)])
    assert "97.00 +- n/a (n=1)" in one


def test_neurons_table():
    recs = [_rec("rigl", 0.99, 0, 0.9, **{"active_neurons/fc1/kernel": 100.0}),
            _rec("rigl", 0.99, 1, 0.9, **{"active_neurons/fc1/kernel": 120.0})]
    assert "| rigl | 99% | 110.0 |" in results_table.neurons_table(recs)
