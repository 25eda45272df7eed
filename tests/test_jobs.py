import subprocess
import sys
from pathlib import Path

import pytest

from restorer.errors import SpecError
from restorer.job import specs

JOBS = Path(__file__).resolve().parents[1] / "jobs"


@pytest.mark.parametrize("path", sorted(JOBS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_specs_load_and_validate(path):
    spec = specs.load_spec(path)
    assert spec.kind == path.name.split("-")[0]  # restore-*.toml, train-*.toml
    assert spec.validate() is not None  # restore and train specs alike


def test_the_train_kind_needs_no_import_of_the_training_layer():
    code = ("import sys; from restorer.job import specs; "
            "spec = specs.spec_from_dict({'kind': 'train', 'data': {'uri': 'x'}}); "
            "print(type(spec).__name__, spec.validate().name, "
            "any(m.startswith(('restorer.train', 'ray')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.split() == ["TrainSpec", "train", "False"]


def test_restore_and_train_specs_are_shipped():
    assert {p.name.split("-")[0] for p in JOBS.glob("*.toml")} == {"restore", "train"}


def test_unknown_keys_are_named(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('kind = "restore"\n[input]\nuri = "a"\nlimt = 3\n')
    with pytest.raises(SpecError, match=r"Unknown keys \['limt'\] in \[input\]"):
        specs.load_spec(spec)
    spec.write_text('kind = "restore"\ncolour = 1\n')
    with pytest.raises(SpecError, match=r"Unknown keys \['colour'\]"):
        specs.load_spec(spec)


def test_types_are_checked(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('kind = "restore"\n[model]\ntile = "big"\n')
    with pytest.raises(SpecError, match="model.tile = 'big' must be of type int"):
        specs.load_spec(spec)
    spec.write_text('kind = "restore"\n[resources]\nworkers = true\n')
    with pytest.raises(SpecError, match="resources.workers"):
        specs.load_spec(spec)
    spec.write_text('kind = "restoration"\n')
    with pytest.raises(SpecError, match="kind = 'restoration'"):
        specs.load_spec(spec)


def test_only_named_fields_may_be_overridden():
    spec = specs.spec_from_dict({"kind": "restore", "input": {"uri": "a"}, "output": {"uri": "b"}})
    spec = specs.apply_overrides(spec, workers=3, gpus_per_worker=0.5, limit=7, model="m",
                                address=None)
    assert (spec.resources.workers, spec.resources.gpus_per_worker, spec.input.limit,
            spec.model.name) == (3, 0.5, 7, "m")
    with pytest.raises(SpecError, match="cannot be overridden"):
        specs.apply_overrides(spec, tile=3)


def test_jpeg_quality_matches_the_source_by_default_and_a_flag_chooses(tmp_path):
    spec = specs.spec_from_dict({"kind": "restore", "input": {"uri": "a"}, "output": {"uri": "b"}})
    assert (spec.output.jpeg_quality, spec.output.jpeg_subsampling) == (0, "same")
    assert specs.apply_overrides(spec, quality=80).output.jpeg_quality == 80  # run --quality
    path = tmp_path / "job.toml"
    path.write_text('kind = "restore"\n[input]\nuri = "a"\n[output]\nuri = "b"\n'
                    'jpeg_quality = 85\njpeg_subsampling = "4:2:0"\n')
    loaded = specs.load_spec(path)
    assert (loaded.output.jpeg_quality, loaded.output.jpeg_subsampling) == (85, "4:2:0")
    assert loaded.fingerprint("x") != spec.fingerprint("x")


@pytest.mark.parametrize("flags,match", [
    ({"format": "gif"}, "output.format"), ({"strength": 4.0}, "strength"),
    ({"precision": "int8"}, "precision"), ({"tile": 8}, "too small"),
    ({"gpus_per_worker": -3.0}, "gpus_per_worker"),
    ({"jpeg_quality": 101}, "jpeg_quality"), ({"jpeg_subsampling": "4:1:1"}, "jpeg_subsampling"),
])
def test_validation_names_the_field(flags, match):
    spec = specs.spec_from_flags(specs.RestoreSpec, input="a", output="b", **flags)
    with pytest.raises(SpecError, match=match):
        spec.validate()


def test_fingerprint_ignores_workers_but_not_pixels():
    a = specs.spec_from_flags(specs.RestoreSpec, input="a", output="b", workers=1)
    b = specs.spec_from_flags(specs.RestoreSpec, input="a", output="b", workers=8, batch_size=2)
    c = specs.spec_from_flags(specs.RestoreSpec, input="a", output="b", strength=0.5)
    assert a.fingerprint("x") == b.fingerprint("x") != c.fingerprint("x")
