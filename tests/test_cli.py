import json
import os
import subprocess
import sys

from click.testing import CliRunner
from PIL import Image

from restorer.cli import main


def test_models_lists_the_default():
    result = CliRunner().invoke(main, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert any(r["default"] and r["name"] == "restore-default" for r in rows)


def test_models_say_what_each_is_for_and_which_to_pick():
    from restorer.weights.zoo import bundled, card, choices

    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    for name in bundled():
        assert card(name).purpose in result.output  # the card's paragraph, as the card has it
        assert f"\n{name}" in result.output
    assert result.output.count("learnt: ") == len(bundled())
    assert result.output.count("GMAC per megapixel") == len(bundled())
    assert "set12 sigma 15/25/50: 24.68/20.35/14.77 -> " in result.output  # from the cards
    picks = result.output[result.output.index("which to pick"):]
    for need in ("noise, colour", "noise, gray", "noise, then JPEG", "JPEG artifacts", "scans",
                 "upscaling"):
        assert need in picks, need
    assert {c.model for c in choices()} <= set(bundled())


def test_models_by_name_and_unknown_names_exit_2_with_the_list():
    result = CliRunner().invoke(main, ["models", "sr-x2"])
    assert result.exit_code == 0, result.output
    assert result.output.lstrip().startswith("sr-x2: x2 super-resolution")
    assert "restore-default" not in result.output
    rows = json.loads(CliRunner().invoke(main, ["models", "sr-x4", "--json"]).output)
    assert rows[0]["name"] == "sr-x4" and rows[0]["measured"][0]["setting"] == "x4"
    result = CliRunner().invoke(main, ["models", "sr-x3"])
    assert result.exit_code == 2
    assert "sr-x3" in result.output and "sr-x2, sr-x4" in result.output


def test_models_text_follows_the_card(tmp_path, monkeypatch):
    """A retrained model's card (recipes --ship rewrites it) is what `restorer models` says."""
    from restorer.weights import zoo

    for path in zoo.ZOO_DIR.iterdir():
        (tmp_path / path.name).symlink_to(path)
    (tmp_path / "restore-default.md").unlink()
    text = (zoo.ZOO_DIR / "restore-default.md").read_text()
    first = text.splitlines()[2]
    text = text.replace(first, "A **camera-photo denoiser**, retrained.")
    text = text.replace("| set12 | sigma 15 | 12 | 24.68 | **31.94**", "| set12 | sigma 15 | 12 "
                        "| 24.68 | **33.33**")
    (tmp_path / "restore-default.md").write_text(text)
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path)
    result = CliRunner().invoke(main, ["models", "restore-default"])
    assert result.exit_code == 0, result.output
    assert "restore-default (default): A camera-photo denoiser, retrained." in result.output
    assert "24.68/20.35/14.77 -> 33.33/29.53/26.12 dB" in result.output


def test_bad_spec_exits_2_and_names_the_key(tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text('kind = "restore"\n[input]\nuri = "x"\nwat = 1\n')
    result = CliRunner().invoke(main, ["run", str(spec)])
    assert result.exit_code == 2 and "wat" in result.output


def test_missing_input_exits_2_with_the_path(tmp_path):
    result = CliRunner().invoke(main, ["restore", str(tmp_path / "nope"), str(tmp_path / "o")])
    assert result.exit_code == 2 and "nope" in result.output and "does not exist" in result.output


def test_pickle_model_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "in" / "a.png")
    (tmp_path / "evil.pth").write_bytes(b"\x80\x04K\x01.")
    result = CliRunner().invoke(main, ["restore", str(tmp_path / "in"), str(tmp_path / "o"),
                                       "--model", str(tmp_path / "evil.pth")])
    assert result.exit_code == 1 and "never unpickles" in result.output


def test_invalid_values_from_the_library_exit_2_with_the_value(tmp_path):
    """The library raises SpecError (not a bare ValueError) for a bad value; the CLI maps it
    to exit 2 with the message, no traceback."""
    (tmp_path / "in").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "in" / "a.png")
    result = CliRunner().invoke(main, ["shard", "pack", str(tmp_path / "in"),
                                       str(tmp_path / "shards"), "--rows-per-shard", "0"])
    assert result.exit_code == 2, result.output
    assert "rows_per_shard must be >= 1, got 0" in result.output


def test_json_is_one_shared_option():
    """`--json` is one shared option: the same flag and help on every command that has it."""
    helps = {}
    for command in ("restore", "run", "train", "eval", "models", "inspect", "bench"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0, result.output
        lines = [line.split(None, 1) for line in result.output.splitlines()
                 if line.strip().startswith("--json")]
        helps[command] = " ".join((parts + [""])[1] for parts in lines)
    assert len(set(helps.values())) == 1 and "JSON" in helps["models"], helps
    result = CliRunner().invoke(main, ["models", "--json"])
    assert result.exit_code == 0 and isinstance(json.loads(result.output), list)


def test_restore_and_run_share_one_spec(ray_session, mixed_folder, tmp_path, tiny_model):
    source, _ = mixed_folder
    runner = CliRunner()
    result = runner.invoke(main, ["restore", str(source), str(tmp_path / "a"), "--model",
                                  tiny_model, "--format", "png", "--limit", "3", "--json"])
    assert result.exit_code == 3, result.output  # corrupt.jpg is among the first 3 inputs
    summary = json.JSONDecoder().raw_decode(result.output, result.output.index("{"))[0]
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (3, 2, 1)
    assert summary["spec"]["output"]["format"] == "png"

    spec = tmp_path / "job.toml"
    spec.write_text(f'kind = "restore"\n[input]\nuri = "{source}"\n[output]\nuri = "unused"\n'
                    '[model]\ntile = 64\n')
    result = runner.invoke(main, ["run", str(spec), "--output", str(tmp_path / "b"), "--model",
                                  tiny_model, "--workers", "1", "--gpus-per-worker", "0"])
    assert result.exit_code == 3, result.output
    assert "restored 5 of 6 images" in result.output
    assert (tmp_path / "b" / "gray.png").exists()


def test_cli_as_a_subprocess_on_the_running_cluster(ray_session, mixed_folder, tmp_path,
                                                    tiny_model):
    source, _ = mixed_folder
    address = ray_session.get_runtime_context().gcs_address
    env = dict(os.environ, RAY_AUTH_MODE="token")
    result = subprocess.run(  # noqa: PLW1510 - the test reads returncode
        [sys.executable, "-m", "restorer", "restore", str(source), str(tmp_path / "o"),
         "--model", tiny_model, "--address", address, "--exclude", "corrupt.jpg"],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "restored 5 of 5 images" in result.stdout
    assert (tmp_path / "o" / "sub dir" / "rgba é.png").exists()


def test_skipped_non_image_files_are_counted_and_named(ray_session, mixed_folder, tmp_path,
                                                       tiny_model):
    source, _ = mixed_folder  # holds notes.txt
    (source / "raw.CR2").write_bytes(b"raw")
    (source / "sub dir" / "clip.mp4").write_bytes(b"video")
    (source / ".DS_Store").write_bytes(b"hidden: never listed, never counted")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["restore", str(source), str(out), "--model", tiny_model,
                                       "--tile", "64", "--json"])
    assert result.exit_code == 3, result.output  # corrupt.jpg
    summary = json.JSONDecoder().raw_decode(result.output, result.output.index("{"))[0]
    assert summary["skipped_non_images"] == 3
    assert summary["non_image_examples"] == ["notes.txt", "raw.CR2", "sub dir/clip.mp4"]
    assert summary["total"] == 6  # the six images, nothing else

    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert ("non-image files skipped (extension not in input.extensions): 3: notes.txt, "
            "raw.CR2, sub dir/clip.mp4") in result.output
