"""Tests of the on-device batch synthesis (restorer.train.synth) and the zoo recipes
(restorer.train.recipes), on CPU with generated images."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from restorer.image import degrade
from restorer.io.samples import scene
from restorer.nets import build_net, canonical_spec, net_spec
from restorer.quality.evaluate import to_uint8
from restorer.train import recipes, synth
from restorer.weights.checkpoint import load_model
from restorer.weights.zoo import get_model


def _images(count, height, width, channels, seed=0):
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, channels)
    return [(rng.random(shape) * 255).astype(np.uint8) for _ in range(count)]


def _is_transformed_crop(crop, source):
    """Whether ``crop`` (HWC) is one of the 8 flips/rotations of a window of ``source``."""
    size = crop.shape[0]
    for turns in range(4):
        for flip in (False, True):
            candidate = np.rot90(crop, turns)
            candidate = candidate[:, ::-1] if flip else candidate
            windows = np.lib.stride_tricks.sliding_window_view(source, (size, size), (0, 1))
            if (windows == np.moveaxis(candidate, 2, 0)[None, None]).all(axis=(2, 3, 4)).any():
                return True
    return False


def test_bank_crops_are_flipped_rotated_windows_of_the_images():
    images = _images(2, 30, 37, 3) + _images(1, 20, 20, 3, seed=1)
    bank = synth.ImageBank(images, "cpu", variants=[images])
    out = bank.sample(12, 40, torch.Generator().manual_seed(0))
    assert out["clean"].shape == (40, 3, 12, 12) and out["clean"].dtype == torch.uint8
    for crop, index in zip(out["clean"], out["image"]):
        assert _is_transformed_crop(crop.permute(1, 2, 0).numpy(), images[index])
    assert torch.equal(out["variant"][0], out["clean"])  # variants share the crop and flip
    again = bank.sample(12, 40, torch.Generator().manual_seed(0))
    assert torch.equal(again["clean"], out["clean"])
    with pytest.raises(ValueError, match="at least 64"):
        bank.sample(64, 1, torch.Generator())


def test_bank_never_picks_images_smaller_than_the_crop():
    images = _images(1, 40, 40, 1) + _images(1, 8, 8, 1, seed=2)
    bank = synth.ImageBank(images, "cpu")
    assert set(bank.sample(16, 50, torch.Generator().manual_seed(3))["image"].tolist()) == {0}


def test_permuted_channels_are_a_permutation_per_crop():
    images = [np.stack([np.full((20, 20), v, np.uint8) for v in (10, 20, 30)], axis=2)]
    bank = synth.ImageBank(images, "cpu")
    out = bank.sample(4, 30, torch.Generator().manual_seed(0), permute_channels=True)
    planes = out["clean"][:, :, 0, 0]
    assert all(sorted(p.tolist()) == [10, 20, 30] for p in planes)
    assert len({tuple(p.tolist()) for p in planes}) > 1


@pytest.mark.parametrize("scale", [2, 4])
def test_super_resolution_crops_are_aligned_with_matlab_downscales(scale):
    images = [to_uint8(scene(67, 75, 1, seed)) for seed in range(2)]
    cleans, lows = synth.bicubic_lows(images, scale)
    assert all(c.shape[0] % scale == 0 and c.shape[1] % scale == 0 for c in cleans)
    bank = synth.ImageBank(cleans, "cpu", low=lows, scale=scale)
    out = bank.sample(12, 6, torch.Generator().manual_seed(1))
    assert out["clean"].shape == (6, 1, 12 * scale, 12 * scale)
    assert out["low"].shape == (6, 1, 12, 12) and out["low"].dtype == torch.float32
    for clean, low in zip(out["clean"], out["low"]):
        redone = degrade.bicubic_downscale(clean[0].numpy().astype(np.float32) / 255, scale)
        # Away from the crop's border (where MATLAB pads the crop, not the image) they agree.
        np.testing.assert_allclose(redone[3:-3, 3:-3], low[0].numpy()[3:-3, 3:-3], atol=1e-5)


def test_jpeg_variants_are_pillow_jpegs_and_gray_stays_gray():
    color = to_uint8(scene(24, 32, 3, 0))
    gray3 = np.repeat(to_uint8(scene(24, 32, 1, 1)), 3, axis=2)
    variants = synth.jpeg_variants([color, gray3], [10, 50], workers=1)
    assert len(variants) == 2 and variants[0][0].shape == color.shape
    np.testing.assert_array_equal(variants[0][0], degrade.jpeg_compress(color, 10))
    np.testing.assert_array_equal(variants[1][1][..., 0], degrade.jpeg_compress(gray3[..., 0], 50))
    assert (variants[1][1] == variants[1][1][..., :1]).all()


def test_noise_is_shared_across_planes_only_where_asked():
    clean = torch.zeros(2, 3, 8, 8)
    noisy = synth.add_noise(clean, (25, 25), torch.Generator().manual_seed(0),
                            shared_planes=torch.tensor([True, False]))
    assert torch.equal(noisy[0, 0], noisy[0, 1]) and not torch.equal(noisy[1, 0], noisy[1, 1])
    assert float(noisy.std()) == pytest.approx(25 / 255, rel=0.15)


@pytest.fixture
def data(tmp_path):
    """A tiny shared/data: gray training and validation sets."""
    for folder, count in (("train", 3), ("val", 2)):
        (tmp_path / folder).mkdir()
        for i in range(count):
            image = to_uint8(scene(48, 48, 1, 10 * len(folder) + i))[..., 0]
            Image.fromarray(image).save(tmp_path / folder / f"{i}.png")
    return tmp_path


@pytest.fixture
def tiny(monkeypatch):
    recipe = recipes.Recipe(
        net={"arch": "unet", "channels": 1, "features": [4, 8], "blocks": 1},
        train=("train",), task="denoise", patch=16, batch=4, warmup=2,
        validation=(recipes.Validation("val", "denoise", sigma=25),))
    monkeypatch.setitem(recipes.RECIPES, "tiny", recipe)
    monkeypatch.setitem(recipes.CARD_EVALS, "tiny", (("val", {"task": "denoise", "sigma": 25,
                                                              "baseline": "nlm"}),))
    monkeypatch.setitem(recipes.CARD_TEXT, "tiny", ("A tiny test model.", "No notes."))
    return recipe


@pytest.mark.parametrize("task", ["denoise", "jpeg", "sr", "mixture"])
def test_batches_have_the_recipe_shapes(task):
    net = {"arch": "srnet", "scale": 2, "channels": 3} if task == "sr" else {
        "arch": "unet", "channels": 3}
    recipe = recipes.Recipe(net=net, train=(), task=task, qualities=(10, 30), patch=8, batch=5,
                            validation=())
    images = [to_uint8(scene(40, 40, 3, i)) for i in range(2)]
    images.append(np.repeat(to_uint8(scene(40, 40, 1, 9)), 3, axis=2))
    clean, degraded = recipes.Batches(recipe, images, torch.device("cpu"), seed=0, workers=1)()
    side = 8 * (2 if task == "sr" else 1)
    assert degraded.shape == (5, 3, 8, 8) and degraded.dtype == torch.float32
    assert clean.shape == (5, 3, side, side)
    assert 0 <= float(clean.min()) and float(clean.max()) <= 1
    if task in ("denoise", "jpeg"):
        assert not torch.equal(clean, degraded)


@pytest.mark.slow  # trains for a few seconds of wall-clock time
def test_train_recipe_saves_a_validated_model_and_continues(data, tiny, tmp_path):
    out = tmp_path / "out"
    first = recipes.train_recipe("tiny", data, out, minutes=0.05, device="cpu", workers=1,
                                 val_seconds=1.0)
    assert first["steps"] >= 1 and first["history"][-1]["validation"][0]["set"] == "val"
    model = load_model(str(out / "tiny.safetensors"))
    assert model.spec == canonical_spec({**tiny.net, "features": [4, 8], "residual": True})
    assert model.provenance["recipe"] == "tiny"
    second = recipes.train_recipe("tiny", data, tmp_path / "out2", minutes=0.02, device="cpu",
                                  init=str(out / "tiny.safetensors"), lr=1e-4, workers=1)
    assert second["init"]["sha256"] == model.sha256
    assert second["steps_total"] == first["steps"] + second["steps"]
    assert second["config"]["lr"] == 1e-4


@pytest.mark.slow  # trains for a few seconds of wall-clock time
def test_ship_writes_float16_weights_and_a_measured_card(data, tiny, tmp_path):
    stage = tmp_path / "stage"
    recipes.train_recipe("tiny", data, stage, minutes=0.02, device="cpu", workers=1)
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    path = recipes.ship("tiny", [stage / "tiny.safetensors"], data, zoo_dir=zoo)
    shipped = load_model(str(path))
    assert next(shipped.net.parameters()).dtype == torch.float32  # cast back on load
    card = path.with_suffix(".md").read_text()
    assert shipped.sha256 in card and "| val | sigma 25 | 2 |" in card
    assert "restorer eval --model tiny --data DATA/val --task denoise --sigma 25" in card
    assert json.loads(json.dumps(shipped.provenance))["stages"][0]["recipe"] == "tiny"
    with pytest.raises(ValueError, match="recipe 'denoise-gray'"):
        recipes.ship("denoise-gray", [stage / "tiny.safetensors"], data, zoo_dir=zoo)


@pytest.mark.slow  # trains for a few seconds of wall-clock time
def test_a_trunk_recipe_ships_the_trained_gray_net_on_opponent_planes(data, tiny, tmp_path,
                                                                      monkeypatch):
    """A recipe with ``trunk_of`` (denoise-color) is not trained: ship() puts the other
    recipe's trained gray net into an opponent net, names it in the provenance and the card."""
    color = recipes.Recipe(
        net={"arch": "opponent", "trunk": dict(tiny.net)}, train=("train",), task="denoise",
        trunk_of="tiny", validation=(recipes.Validation("val", "denoise", sigma=25),))
    monkeypatch.setitem(recipes.RECIPES, "tiny-color", color)
    monkeypatch.setitem(recipes.CARD_EVALS, "tiny-color", (("val", {"task": "denoise",
                                                                    "sigma": 25}),))
    monkeypatch.setitem(recipes.CARD_TEXT, "tiny-color", ("A tiny colour model.", "No notes."))
    with pytest.raises(ValueError, match="tiny-color is not trained itself"):
        recipes.train_recipe("tiny-color", data, tmp_path / "no", minutes=0.01, device="cpu")
    stage = tmp_path / "stage"
    recipes.train_recipe("tiny", data, stage, minutes=0.02, device="cpu", workers=1)
    trunk = load_model(str(stage / "tiny.safetensors"))
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    path = recipes.ship("tiny-color", [stage / "tiny.safetensors"], data, zoo_dir=zoo)
    shipped = load_model(str(path))
    assert shipped.spec["arch"] == "opponent" and shipped.net.channels == 3
    assert shipped.provenance["recipe"] == "tiny-color"
    assert shipped.provenance["trunk"] == {"recipe": "tiny", "sha256": trunk.sha256}
    for name, tensor in trunk.net.state_dict().items():  # float16 on the shelf
        assert torch.equal(shipped.net.trunk.state_dict()[name], tensor.half().float()), name
    card = path.with_suffix(".md").read_text()
    assert shipped.sha256 in card and "(tiny's training: its card has the validations)" in card
    assert "| val | sigma 25 | 2 |" in card
    with pytest.raises(ValueError, match="recipe 'tiny'"):
        recipes.ship("tiny-color", [path], data, zoo_dir=zoo)


@pytest.mark.parametrize("name", [n for n, r in recipes.RECIPES.items() if r.ships_as is None])
def test_every_zoo_recipe_builds_its_net_and_has_a_card_entry(name):
    recipe = recipes.RECIPES[name]
    net = build_net(recipe.net).eval()
    # the net the recipe builds is the one shipped under its name, tensor for tensor
    shipped = get_model(name)
    assert json.loads(json.dumps(net_spec(net))) == shipped.spec
    assert ({k: v.shape for k, v in net.state_dict().items()}
            == {k: v.shape for k, v in shipped.net.state_dict().items()})
    with torch.no_grad():
        out = net(torch.rand(1, recipe.channels, 32, 32))
    assert out.shape == (1, recipe.channels, 32 * net.scale, 32 * net.scale)
    # an SR recipe validates and is carded at its net's scale; the others never as SR
    sr_scales = ({v.scale for v in recipe.validation if v.task == "sr"}
                 | {kw["scale"] for _, kw in recipes.CARD_EVALS[name] if kw["task"] == "sr"})
    assert sr_scales == ({net.scale} if recipe.task == "sr" else set())
    assert (recipe.task == "sr") == (net.scale > 1)
    what, notes = recipes.CARD_TEXT[name]
    assert what and notes


def test_card_templates_are_package_data_and_fill_every_field():
    import tomllib

    root = Path(recipes.__file__).resolve().parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]["restorer"]
    shipped = {path for pattern in globs for path in (root / "restorer").glob(pattern)}
    templates = sorted((root / "restorer" / "zoo" / "cards").iterdir())
    assert templates and all(path in shipped for path in templates)
    # every recipe has its prose (under the name it ships as)
    assert set(recipes.CARD_TEXT) == {r.ships_as or n for n, r in recipes.RECIPES.items()}
    for task in recipes.TASKS:  # and every task its "learnt" sentence, filled in
        recipe = recipes.Recipe(net={"arch": "srnet", "scale": 2} if task == "sr" else {},
                                train=(), task=task, validation=(), qualities=(10, 40))
        learnt = recipes._learnt(recipe)
        assert learnt and "{" not in learnt, task


def test_denoising_and_jpeg_cards_carry_edges_and_frames(tmp_path, monkeypatch):
    """ship() measures the edge and frame uniformity of every denoising/JPEG model on odd-size
    crops (issue: quality on real photos) and the card shows it with its commands."""
    (tmp_path / "odd").mkdir()
    for i in range(2):
        image = to_uint8(scene(80, 84, 1, i))[..., 0]
        Image.fromarray(image).save(tmp_path / "odd" / f"{i}.png")
    monkeypatch.setitem(recipes.UNIFORMITY_EVALS, "tiny", ("odd", {"task": "denoise",
                                                                    "sigma": 25}))
    torch.manual_seed(0)
    net = build_net({"arch": "dncnn", "channels": 1, "num_features": 4, "num_layers": 3}).eval()
    rows = recipes.measure_uniformity_table("tiny", net, tmp_path)
    assert [r["setting"] for r in rows] == ["odd 1x3, sigma 25, edges",
                                            "odd 1x3, sigma 25, black frame",
                                            "odd 1x3, sigma 25, gray frame"]
    for row in rows:
        assert row["interior_psnr"] - row["band_psnr"] == pytest.approx(row["band_gap_mean"],
                                                                        abs=1e-6)
    assert rows[0]["baseline_psnr"] is not None and rows[1]["baseline_psnr"] is None
    section = recipes._uniformity_section(rows)
    assert "## Edges and frames" in section and section.count("| odd 1x3, sigma 25, ") == 3
    assert ("restorer eval --model tiny --data DATA/odd --trim 1x3 --task denoise --sigma 25 "
            "--edges --baseline bm3d") in section
    assert "--trim 1x3 --task denoise --sigma 25 --frame gray" in section
    assert recipes.measure_uniformity_table("sr-x2", net, tmp_path) == []  # SR: none


@pytest.fixture
def practical(monkeypatch, tmp_path):
    """A tiny noise-map recipe on generated colour and gray images, validated on pairs."""
    root = tmp_path / "pdata"
    for folder in ("photos", "pairs"):
        (root / folder).mkdir(parents=True)
    for i in range(3):
        Image.fromarray(to_uint8(scene(48, 48, 3, 40 + i))).save(root / "photos" / f"{i}.png")
    for i in range(2):
        clean = to_uint8(scene(40, 40, 3, 50 + i))
        noisy = np.clip(clean + np.random.default_rng(i).normal(0, 8, clean.shape), 0, 255)
        Image.fromarray(clean).save(root / "pairs" / f"p{i}_mean.png")
        Image.fromarray(noisy.astype(np.uint8)).save(root / "pairs" / f"p{i}_real.png")
    trunk = {"arch": "unet", "channels": 3, "features": [4, 8], "blocks": 1}
    recipe = recipes.Recipe(
        net={"arch": "noisemap", "channels": 3, "estimator_features": 4, "estimator_layers": 3,
             "trunk": {**trunk, "guide_channels": 3}},
        train=("photos",), task="practical", patch=16, batch=4, warmup=2,
        validation=(recipes.Validation("pairs", "pairs"),))
    monkeypatch.setitem(recipes.RECIPES, "tinyreal", recipe)
    monkeypatch.setitem(recipes.CARD_EVALS, "tinyreal", (("pairs", {"task": "pairs"}),))
    monkeypatch.setitem(recipes.CARD_TEXT, "tinyreal", ("A tiny noise-aware model.", "None."))
    return root, trunk


def test_practical_batches_carry_a_noise_map(practical):
    root, _ = practical
    recipe = recipes.RECIPES["tinyreal"]
    images = recipes.load_training_images(root, recipe)
    batches = recipes.Batches(recipe, images, torch.device("cpu"), seed=0)
    clean, degraded, noise_map = batches()
    assert clean.shape == degraded.shape == noise_map.shape == (4, 3, 16, 16)
    assert float(noise_map.min()) >= 0 and torch.isfinite(noise_map).all()
    batches.pairs.close()


def _photos(count: int = 3, side: int = 48) -> list[np.ndarray]:
    return [to_uint8(scene(side, side, 3, 40 + i)) for i in range(count)]


def test_worker_processes_make_the_pairs_reproducibly_and_stop_on_close():
    """workers = N: N processes make the batches (a DataLoader, what a GPU run needs); the same
    seed and count give the same batches, another seed others; close() ends the processes."""
    import multiprocessing

    before = len(multiprocessing.active_children())
    runs = []
    for seed in (5, 5, 6):
        pairs = synth.PracticalPairs(_photos(), 24, 3, seed, workers=2)
        assert len(multiprocessing.active_children()) == before + 2
        runs.append([pairs() for _ in range(3)])
        pairs.close()
        assert len(multiprocessing.active_children()) == before
    for clean, degraded, noise_map in runs[0]:
        assert clean.shape == degraded.shape == noise_map.shape == (3, 3, 24, 24)
        assert clean.dtype == torch.float32 and 0 <= float(clean.min()) <= float(clean.max()) <= 1
        assert float(noise_map.min()) >= 0 and torch.isfinite(degraded).all()
    for first, again in zip(runs[0], runs[1]):
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    # the two processes draw differently (batches 0 and 1 come from one each), as do seeds
    assert not torch.equal(runs[0][0][0], runs[0][1][0])
    assert not torch.equal(runs[0][0][0], runs[2][0][0])


def test_the_smooth_share_picks_the_flattest_of_its_candidate_crops():
    """practical.smooth: that share of the crops is the smoothest of smooth_pick random ones.
    One photo flat but for a gentle ramp, one textured all over: clean crops (the identity
    pairs) come from the flat one ~1/2 of the time at smooth 0 and all but (1/2)^8 of the time
    at smooth 1 with 8 candidates; each is the least rough of its candidates."""
    ramp = np.repeat(np.linspace(60, 90, 48, dtype=np.float32)[None, :, None], 48, 0)
    flat = (np.repeat(ramp, 3, 2) + np.array([0, 40, 80])).round().astype(np.uint8)  # colour
    textured = _photos(1)[0]
    assert synth.roughness(flat) < 1 < synth.roughness(textured)

    def flat_share(smooth):
        mixture = synth.PracticalMixture(clean=1, gaussian=0, jpeg=0, practical=0, gray=0,
                                         smooth=smooth, smooth_pick=8)
        maker = synth.PairMaker([flat, textured], 24, 64, mixture, degrade.PracticalConfig())
        clean, degraded, noise_map = maker.batch(np.random.default_rng(3))
        assert torch.equal(clean, degraded) and float(noise_map.abs().max()) == 0
        rough = [synth.roughness(crop.permute(1, 2, 0).numpy() * 255) for crop in clean]
        return float(np.mean([r < 1 for r in rough]))

    assert 0.3 < flat_share(0.0) < 0.7
    assert flat_share(1.0) == 1.0
    # a draw picks the smoothest of its candidates: the same generator, the same candidates
    maker = synth.PairMaker([flat, textured], 24, 1, synth.PracticalMixture(
        clean=1, gaussian=0, jpeg=0, practical=0, gray=0, smooth=1, smooth_pick=5),
        degrade.PracticalConfig())
    rng, again = np.random.default_rng(11), np.random.default_rng(11)
    picked = maker._crop(rng) * 255
    again.random()  # the smooth draw
    candidates = degrade.sample_patches([flat, textured], 24, 5, again)
    assert np.allclose(picked, candidates[int(np.argmin([synth.roughness(c) for c in candidates]))])
    with pytest.raises(ValueError, match="practical.smooth = 1.5"):
        synth.PracticalMixture(smooth=1.5)
    with pytest.raises(ValueError, match="smooth_pick = 0"):
        synth.PracticalMixture(smooth_pick=0)


def test_the_enlarge_share_cuts_smaller_crops_and_enlarges_them_bicubic():
    """practical.enlarge: that share of the crops is cut at patch / factor px and enlarged
    back to the patch (bicubic, uint8 like a stored photo), softer per pixel than a crop cut at
    the patch size; enlarge 0 draws no extra random numbers (a seed's batches stay as they were)."""
    photos = _photos(2)

    def clean_crops(**kw):
        mixture = synth.PracticalMixture(clean=1, gaussian=0, jpeg=0, practical=0, gray=0, **kw)
        maker = synth.PairMaker(photos, 24, 32, mixture, degrade.PracticalConfig())
        clean, degraded, _ = maker.batch(np.random.default_rng(5))
        assert torch.equal(clean, degraded) and clean.shape == (32, 3, 24, 24)
        return clean

    sharp, soft = clean_crops(), clean_crops(enlarge=1.0, enlarge_range=(3.0, 3.0))
    assert torch.equal(sharp, clean_crops(enlarge=0.0, enlarge_range=(2.0, 2.5)))

    def rough(batch):
        return np.mean([synth.roughness(c.permute(1, 2, 0).numpy() * 255) for c in batch])

    assert rough(soft) < 0.6 * rough(sharp)
    # a draw: the enlarge draw, then an 8 px crop of the same generator, enlarged 3x
    maker = synth.PairMaker(photos, 24, 1, synth.PracticalMixture(
        clean=1, gaussian=0, jpeg=0, practical=0, gray=0, enlarge=1, enlarge_range=(3.0, 3.0)),
        degrade.PracticalConfig())
    rng, again = np.random.default_rng(7), np.random.default_rng(7)
    picked = maker._crop(rng) * 255
    again.random(), again.uniform(3.0, 3.0)
    small = degrade.sample_patches(photos, 8, 1, again)[0]
    assert small.shape == (8, 8, 3)
    expected = np.asarray(Image.fromarray(np.ascontiguousarray(small)).resize(
        (24, 24), Image.Resampling.BICUBIC))
    assert np.array_equal(np.round(picked).astype(np.uint8), expected)
    with pytest.raises(ValueError, match="practical.enlarge = 2"):
        synth.PracticalMixture(enlarge=2)
    with pytest.raises(ValueError, match="enlarge_range"):
        synth.PracticalMixture(enlarge_range=(0.5, 2.0))
    recipe = recipes.override(recipes.override(recipes.RECIPES["restore-photo"],
                                               "practical.enlarge=0.5"),
                              "practical.enlarge_range=2,2.5")
    assert recipe.practical.enlarge == 0.5 and recipe.practical.enlarge_range == (2.0, 2.5)


def test_a_worker_process_failure_reaches_the_training_loop(monkeypatch):
    def broken(clean, rng, config):
        raise ValueError("the degradation broke")

    monkeypatch.setattr(degrade, "practical_degradation", broken)  # the forked workers see it
    mixture = synth.PracticalMixture(clean=0, gaussian=0, jpeg=0, practical=1)
    for workers in (0, 1):
        pairs = synth.PracticalPairs(_photos(1), 24, 2, 0, mixture, workers=workers)
        with pytest.raises(ValueError, match="the degradation broke"):
            pairs()
        pairs.close()


def test_pair_workers_default_to_a_thread_on_cpu_and_to_the_cores_on_a_gpu(monkeypatch):
    import os

    assert recipes.pair_workers(None, torch.device("cpu")) == 0
    assert recipes.pair_workers(3, torch.device("cpu")) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert recipes.pair_workers(None, torch.device("cuda")) == 14
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert recipes.pair_workers(None, torch.device("cuda")) == 16
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert recipes.pair_workers(None, torch.device("cuda")) == 1
    assert recipes.pair_workers(0, torch.device("cuda")) == 0


def test_settings_change_nested_recipe_fields_and_refuse_unknown_ones(practical):
    recipe = recipes.RECIPES["tinyreal"]
    changed = recipes.override(recipe, "practical.clean=1")
    changed = recipes.override(changed, "degradation.blur_sigma=0.5,1.5")
    changed = recipes.override(changed, "map_true_share=0.25")
    assert changed.practical.clean == 1.0 and changed.practical.jpeg == recipe.practical.jpeg
    assert changed.degradation.blur_sigma == (0.5, 1.5) and changed.map_true_share == 0.25
    assert recipe.practical.clean != 1.0  # the registered recipe is left as it was
    with pytest.raises(ValueError, match=r"no field 'cleen'.*'clean'"):
        recipes.override(recipe, "practical.cleen=1")
    with pytest.raises(ValueError, match="not a float"):
        recipes.override(recipe, "degradation.blur=much")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        recipes.override(recipe, "practical.clean")
    with pytest.raises(ValueError, match="set one of its fields"):
        recipes.override(recipe, "degradation=1")
    # the net's spec too, nested, lists as lists; the net then builds with it
    wider = recipes.override(recipes.override(recipe, "net.estimator_layers=5"),
                             "net.trunk.features=4,8,16")
    assert wider.net["estimator_layers"] == 5 and wider.net["trunk"]["features"] == [4, 8, 16]
    assert recipe.net["estimator_layers"] == 3 and recipe.net["trunk"]["features"] == [4, 8]
    assert len(build_net(wider.net).estimator) == 2 * 5 - 1
    with pytest.raises(ValueError, match=r"net spec has no field 'estimator_layer'"):
        recipes.override(recipe, "net.estimator_layer=5")
    with pytest.raises(ValueError, match="set one of its fields"):
        recipes.override(recipe, "net.trunk=1")
    # the changed fields reach the pairs: all clean crops, so degraded == clean, map 0
    root, _ = practical
    images = recipes.load_training_images(root, changed)
    only_clean = recipes.override(changed, "practical.gaussian=0")
    only_clean = recipes.override(recipes.override(only_clean, "practical.jpeg=0"),
                                  "practical.practical=0")
    batches = recipes.Batches(only_clean, images, torch.device("cpu"), seed=0)
    clean, degraded, noise_map = batches()
    batches.pairs.close()
    assert torch.equal(clean, degraded) and float(noise_map.abs().max()) == 0.0
    assert batches.pairs.config.blur_sigma == (0.5, 1.5)


def _moved_by_three_steps(net, recipe, **step):
    """The state-dict keys of ``net`` (frozen as ``recipe`` says) that three Adam steps of
    :func:`restorer.train.core.noise_map_step` (``step``: its keywords) on one noisy batch
    change."""
    from restorer.train.core import noise_map_step

    recipes._freeze(net, recipe.freeze)
    optimizer = recipes._optimizer(net, recipe, 1e-2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    clean = torch.rand(4, 3, 16, 16)
    degraded = clean + 0.1 * torch.randn(clean.shape)
    for _ in range(3):
        noise_map_step(net, optimizer, clean, degraded, torch.full_like(clean, 0.1), **step)
    after = net.state_dict()
    return {k for k in after if not torch.equal(after[k], before[k])}


def test_a_frozen_part_keeps_every_weight_while_the_rest_trains(practical):
    """``--set freeze=trunk``: the trunk's weights stay bit for bit through Adam steps (a tiny
    learning rate would still move them) while the estimator learns; unknown parts and a
    freeze of everything are refused naming what there is."""
    recipe = recipes.override(recipes.RECIPES["tinyreal"], "freeze=trunk")
    assert recipe.freeze == ("trunk",)
    torch.manual_seed(0)
    net = build_net(recipe.net)
    moved = _moved_by_three_steps(net, recipe)
    assert not any(k.startswith("trunk.") for k in moved)
    assert any(k.startswith("estimator.") for k in moved)
    with pytest.raises(ValueError, match="no part 'trunc'") as error:
        recipes._freeze(build_net(recipe.net), ("trunc",))
    assert "'trunk'" in str(error.value) and "'estimator'" in str(error.value)
    everything = recipes.override(recipe, "freeze=trunk,estimator")
    whole = build_net(recipe.net)
    recipes._freeze(whole, everything.freeze)
    with pytest.raises(ValueError, match="nothing of the net to train"):
        recipes._optimizer(whole, everything, 1e-2)


def test_a_wider_estimator_starts_anew_on_the_trunk_of_its_init(practical, tmp_path):
    from restorer.weights.checkpoint import save_model

    recipe = recipes.RECIPES["tinyreal"]
    torch.manual_seed(1)
    start = build_net(recipe.net)
    save_model(str(tmp_path / "start.safetensors"), start, {"recipe": "tinyreal"})
    same, _ = recipes._recipe_net(recipe, str(tmp_path / "start.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(),
                                                 start.state_dict().values()))
    wider = recipes.override(recipes.override(recipe, "net.estimator_layers=5"),
                             "net.estimator_features=6")
    net, info = recipes._recipe_net(wider, str(tmp_path / "start.safetensors"))
    assert info["uri"].endswith("start.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(net.trunk.state_dict().values(),
                                                 start.trunk.state_dict().values()))
    assert len(net.estimator) == 9 and net.estimator[0].out_channels == 6
    other = recipes.override(recipe, "net.trunk.features=4,8,16")  # another trunk: refused
    with pytest.raises(ValueError, match="holds net"):
        recipes._recipe_net(other, str(tmp_path / "start.safetensors"))


def test_a_chroma_branch_starts_at_zero_on_a_trained_net_and_trains_alone(practical, tmp_path):
    """``--init`` a net without a chroma branch into a recipe with one: trunk and estimator
    continue, the branch starts anew at zero (the net restores as its init did); with
    ``freeze=trunk,estimator`` only the branch's weights move."""
    import dataclasses

    from restorer.weights.checkpoint import save_model

    recipe = recipes.RECIPES["tinyreal"]
    torch.manual_seed(2)
    start = build_net(recipe.net).eval()
    save_model(str(tmp_path / "start.safetensors"), start, {"recipe": "tinyreal"})
    branched = dataclasses.replace(recipe, net={**recipe.net, "chroma_features": 4,
                                                "chroma_layers": 2, "chroma_scale": 2})
    branched = recipes.override(branched, "freeze=trunk,estimator")
    net, _ = recipes._recipe_net(branched, str(tmp_path / "start.safetensors"))
    for part in ("trunk", "estimator"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(net, part).state_dict().values(),
                                                     getattr(start, part).state_dict().values()))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), start(x), atol=1e-6)
    moved = _moved_by_three_steps(net, branched, map_weight=0.0, true_share=0.0)
    assert moved and all(k.startswith("chroma.") for k in moved)


def test_without_map_grad_the_estimator_learns_from_the_map_loss_alone(practical):
    """``map_grad = False``: the image loss stops at the map, so the estimator's gradient is
    the map loss's alone (the same as a step on the map loss by hand); end to end (the default)
    the image loss adds to it. The trunk learns either way."""
    from restorer.train.core import asymmetric_map_loss, noise_map_step

    recipe = recipes.override(recipes.RECIPES["tinyreal"], "map_grad=false")
    assert recipe.map_grad is False
    torch.manual_seed(0)
    clean = torch.rand(4, 3, 16, 16)
    degraded = clean + 0.1 * torch.randn(clean.shape)
    target = torch.full_like(clean, 0.1)

    def estimator_grads(net, map_grad):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
        noise_map_step(net, optimizer, clean, degraded, target, true_share=0.0,
                       map_grad=map_grad)
        return [p.grad.clone() for p in net.estimator.parameters()]

    net = build_net(recipe.net)
    detached = estimator_grads(net, map_grad=False)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.trunk.parameters()
               if p.requires_grad and p.dim() > 1)
    net.zero_grad()
    asymmetric_map_loss(net.estimate(degraded), target).backward()
    assert all(torch.allclose(a, p.grad, atol=1e-7)
               for a, p in zip(detached, net.estimator.parameters()))
    end_to_end = estimator_grads(net, map_grad=True)
    assert any(not torch.allclose(a, b, atol=1e-7) for a, b in zip(detached, end_to_end))
    # with the trunk frozen too the image loss can teach nothing: the trunk does not run and
    # the estimator's gradient is the map loss's as before
    for p in net.trunk.parameters():
        p.requires_grad_(False)

    def no_trunk(*args):
        raise AssertionError("the frozen trunk ran")

    net.trunk.forward = no_trunk
    alone = estimator_grads(net, map_grad=False)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(detached, alone))
    with pytest.raises(AssertionError, match="the frozen trunk ran"):
        estimator_grads(net, map_grad=True)  # end to end, the map's effect still counts


@pytest.mark.slow  # trains for a few seconds of wall-clock time
def test_practical_recipe_continues_a_unet_and_ships_with_its_stages(practical, tmp_path):
    root, trunk = practical
    start = tmp_path / "start.safetensors"
    torch.manual_seed(0)
    from restorer.weights.checkpoint import save_model

    save_model(str(start), build_net(trunk), {"recipe": "tinyreal", "stages": [
        {"command": "python -m restorer.train.recipes tinyreal --gpu", "steps": 7,
         "wall_seconds": 3.0, "hardware": "NVIDIA H100"}]})
    out = tmp_path / "out"
    first = recipes.train_recipe("tinyreal", root, out, minutes=0.03, device="cpu",
                                 init=str(start), workers=1, keep_checkpoints=True,
                                 estimator_lr_scale=0.5, val_seconds=0.0, patch=24)
    assert first["steps"] >= 1 and first["history"][-1]["validation"][0]["task"] == "pairs"
    assert first["config"]["estimator_lr_scale"] == 0.5 and first["config"]["patch"] == 24
    model = load_model(str(out / "tinyreal.safetensors"))
    assert model.spec["arch"] == "noisemap" and hasattr(model.net, "estimator")
    # every validation's weights kept, float16, named by their step
    kept = sorted(out.glob("tinyreal-step*.safetensors"))
    assert sorted(int(p.stem.split("step")[1]) for p in kept) == sorted(
        {h["step"] for h in first["history"]})
    from safetensors import safe_open

    with safe_open(str(kept[0]), "pt") as stored:
        assert {stored.get_tensor(k).dtype for k in stored.keys()} == {torch.float16}
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    path = recipes.ship("tinyreal", [start, out / "tinyreal.safetensors"], root, zoo_dir=zoo)
    card = path.with_suffix(".md").read_text()
    assert "1. `python -m restorer.train.recipes tinyreal --gpu` — 7 steps" in card  # the prior stage
    assert "2. `" in card and "real camera noise" in card
    assert "restorer eval --model tinyreal --pairs DATA/pairs" in card
    assert [s["steps"] for s in load_model(str(path)).provenance["stages"]][0] == 7


def test_the_next_default_recipe_builds_the_net_of_its_stage_files():
    """restore-photo is not shipped yet: its stage files (zoo/stages) hold its net and continue
    the bundled default's U-Net; it ships as restore-default, whose card entries exist."""
    recipe = recipes.RECIPES["restore-photo"]
    assert recipe.ships_as == "restore-default" and recipe.ships_as in recipes.CARD_EVALS
    net = build_net(recipe.net)
    stages = sorted((recipes.ZOO_DIR / "stages").glob("restore-default-*.safetensors"))
    assert stages, "no stage file"
    for path in stages:
        stage = load_model(str(path))
        assert stage.provenance["recipe"] in ("restore-photo", "restore-default")
        assert ({k: v.shape for k, v in stage.net.state_dict().items()}
                == {k: v.shape for k, v in net.state_dict().items()})
    trunk = net.trunk.state_dict()
    for key, value in get_model("restore-default").net.state_dict().items():
        assert key in trunk and (trunk[key].shape == value.shape or key == "down.0.0.weight")


def test_map_weight_zero_teaches_the_estimator_through_the_frozen_trunk_alone(practical):
    """``map_weight = 0`` with the trunk frozen: the estimator's gradient is the image loss's
    through the map (the map the trunk restores best with), the map loss adds nothing; with
    ``map_grad = false`` too it could learn nothing, and the recipe says so."""
    from restorer.train.core import noise_map_step

    recipe = recipes.override(recipes.RECIPES["tinyreal"], "map_weight=0")
    assert recipe.map_weight == 0.0
    with pytest.raises(ValueError, match="nothing to learn"):
        recipes.override(recipe, "map_grad=false")
    with pytest.raises(ValueError, match=">= 0"):
        recipes.override(recipe, "map_weight=-1")
    torch.manual_seed(0)
    clean = torch.rand(4, 3, 16, 16)
    degraded = clean + 0.1 * torch.randn(clean.shape)
    target = torch.full_like(clean, 0.1)
    net = build_net(recipe.net)
    recipes._freeze(net, ("trunk",))

    def estimator_grads(map_weight):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
        noise_map_step(net, optimizer, clean, degraded, target, true_share=0.0,
                       map_weight=map_weight)
        return [p.grad.clone() for p in net.estimator.parameters()]

    image_only = estimator_grads(0.0)
    net.zero_grad()
    torch.nn.functional.l1_loss(net(degraded), clean).backward()
    assert all(torch.allclose(a, p.grad, atol=1e-7)
               for a, p in zip(image_only, net.estimator.parameters()))
    assert any(g.abs().sum() > 0 for g in image_only)
    assert any(not torch.allclose(a, b, atol=1e-7)
               for a, b in zip(image_only, estimator_grads(1.0)))
