import json

import torch
from click.testing import CliRunner
from PIL import Image

from restorer.cli import main
from restorer.io.samples import scene
from restorer.nets import build_net
from restorer.weights.checkpoint import load_model


def test_convert_imports_renamed_weights_and_refuses_mismatches(tmp_path):
    net = build_net({"arch": "dncnn", "channels": 1, "num_features": 8, "num_layers": 4})
    published = {f"model.{i}": t for i, t in enumerate(net.state_dict().values())}
    torch.save(published, tmp_path / "dncnn.pth")
    runner = CliRunner()
    result = runner.invoke(main, ["convert", str(tmp_path / "dncnn.pth"),
                                  str(tmp_path / "out.safetensors"), "--net", "dncnn",
                                  "--num-features", "8", "--num-layers", "4"])
    assert result.exit_code == 0, result.output
    loaded = load_model(str(tmp_path / "out.safetensors"))
    for a, b in zip(loaded.net.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)
    result = runner.invoke(main, ["convert", str(tmp_path / "dncnn.pth"),
                                  str(tmp_path / "bad.safetensors"), "--net", "dncnn",
                                  "--num-features", "16", "--num-layers", "4"])
    assert result.exit_code == 1 and "does not match" in result.output


def test_eval_prints_a_table_and_json(tmp_path):
    for i in range(2):
        pixels = (scene(64, 64, 1, seed=i)[..., 0] * 255).round().astype("uint8")
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    runner = CliRunner()
    result = runner.invoke(main, ["eval", "--data", str(tmp_path), "--sigma", "25", "--json"])
    assert result.exit_code == 0, result.output
    table = json.loads(result.output)
    assert table["count"] == 2 and table["psnr"] > table["input_psnr"] + 5
    result = runner.invoke(main, ["eval", "--data", str(tmp_path), "--task", "jpeg"])
    assert result.exit_code == 2  # jpeg needs --quality: a usage error naming it


def test_eval_writes_a_contact_sheet(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        pixels = (scene(40, 56, 1, seed=i)[..., 0] * 255).round().astype("uint8")
        Image.fromarray(pixels).save(data / f"{i}.png")
    sheet = tmp_path / "sheet.png"
    runner = CliRunner()
    result = runner.invoke(main, ["eval", "--data", str(data), "--sheet", str(sheet),
                                  "--sheet-rows", "2"])
    assert result.exit_code == 0, result.output
    assert f"contact sheet: {sheet}" in result.output
    width, height = Image.open(sheet).size
    assert 2 * (40 + 28) <= height <= 2 * (3 * 40 + 60) and width > 3 * 56  # two bands
    result = runner.invoke(main, ["eval", "--data", str(data), "--sheet",
                                  str(tmp_path / "nowhere" / "sheet.png")])
    assert result.exit_code == 1 and "nowhere" in result.output
