"""Bad input to the experiments harness (configs, resume, data, sweeps): each case asserts
the error type, that the message names the offending key or file, and that nothing on disk
changed. (Data-file and checkpoint-file damage: tests/test_data.py, tests/test_checkpoint.py.)
"""

import json
import shutil

import pytest

from experiments import data as data_lib
from experiments import sweep
from experiments import train as train_lib
from experiments.configs import digits_tiny


def tiny(**overrides):
    c = digits_tiny.get_config()
    c.num_steps, c.checkpoint_every, c.print_table = 3, 0, False
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


@pytest.fixture(scope="module")
def digits():
    return data_lib.load_dataset("digits")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, digits):
    workdir = tmp_path_factory.mktemp("run")
    train_lib.train(tiny(), workdir, dataset=digits)
    return workdir


@pytest.fixture
def run_copy(finished_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    return workdir


def _files(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("content", ["{\"algorithm\": \"rigl\"", "", "\xff\xfe"])
def test_unreadable_config_json_on_resume_names_the_file(run_copy, digits, content):
    (run_copy / "config.json").write_text(content, errors="surrogateescape")
    before = _files(run_copy)
    with pytest.raises(train_lib.ConfigChangedError, match=rf"{run_copy}/config.json"):
        train_lib.train(tiny(), run_copy, resume=True, dataset=digits)
    assert _files(run_copy) == before


@pytest.mark.slow
def test_resume_with_an_added_or_removed_field_lists_it(run_copy, digits):
    saved = json.loads((run_copy / "config.json").read_text())
    saved["legacy_field"] = 1
    (run_copy / "config.json").write_text(json.dumps(saved))
    before = _files(run_copy)
    with pytest.raises(train_lib.ConfigChangedError, match=r"legacy_field: 1 -> '<absent>'"):
        train_lib.train(tiny(), run_copy, resume=True, dataset=digits)
    assert _files(run_copy) == before


@pytest.mark.slow
def test_allow_changes_outside_the_safe_set_is_refused(run_copy, digits):
    before = _files(run_copy)
    with pytest.raises(ValueError, match=r"allow_changes=\['algorithm'\] cannot change"):
        train_lib.train(tiny(algorithm="set"), run_copy, resume=True, dataset=digits,
                        allow_changes=["algorithm"])
    assert _files(run_copy) == before


@pytest.mark.slow
def test_fresh_run_into_a_used_workdir_is_refused(run_copy, digits):
    before = _files(run_copy)
    with pytest.raises(FileExistsError, match=rf"{run_copy} already holds checkpoints"):
        train_lib.train(tiny(), run_copy, dataset=digits)
    assert _files(run_copy) == before


@pytest.mark.parametrize("field, value, message", [
    ("validation_size", -5, r"validation_size=-5(\.0)? must be"),
    ("validation_size", 10_000, r"validation_size=10000(\.0)? must be"),
    ("dataset", "imagenet", r"unknown dataset 'imagenet'"),
])
def test_bad_data_fields_name_the_field(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        train_lib.load_data(tiny(**{field: value}))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override, message", [
    ("validation_size", r"override 'validation_size' is not of the form key=value"),
    ("model.width=3", r"the config has no field 'model.width'"),
])
def test_bad_sweep_overrides_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        sweep.apply_overrides(tiny(), [override])
