"""The tools around jobs: ``eval``, ``convert``, ``models``, ``inspect``, ``bench``, ``shard``
and ``samples``."""

from __future__ import annotations

import dataclasses
import json
import os

import click

from restorer.cli.base import (
    errors_to_exit_codes,
    json_option,
    main,
    non_images_line,
    num_cpus_option,
    print_summary,
)
from restorer.errors import SpecError


def _strength_sheet(model, pairs_dir, strengths, sheet, tile) -> None:
    from PIL import Image

    from restorer.quality.evaluate import pair_files, read_image, strength_sheet
    from restorer.weights.zoo import DEFAULT_MODEL

    try:
        _, noisy, clean = pair_files(pairs_dir)[0]
        picture = strength_sheet(model or DEFAULT_MODEL, read_image(noisy, 3),
                                 read_image(clean, 3), strengths, tile)
    except ValueError as e:
        raise SpecError(str(e)) from e
    Image.fromarray(picture).save(sheet, format="PNG")
    click.echo(f"strength sheet: {sheet}", err=True)


@main.command("eval")
@click.option("--model", default=None, help="Zoo name or model path (default model if omitted).")
@click.option("--data", "data_dir", default=None, help="Folder of clean test images.")
@click.option("--pairs", "pairs_dir", default=None,
              help="Instead of --data: a folder of real noisy/clean pairs (NAME_real/NAME_mean, "
                   "NAME_noisy/NAME_gt, or noisy/ + clean/ sub-folders), measured on RGB as "
                   "the files are; restored through the actor unless --through net.")
@click.option("--task", type=click.Choice(["denoise", "jpeg", "sr", "noise+jpeg", "poisson",
                                           "blur+noise"]), default="denoise",
              help="What degrades the clean images; noise+jpeg, poisson and blur+noise are "
                   "saved as 8-bit photos and measured on RGB.")
@click.option("--sigma", type=float, default=None,
              help="denoise, noise+jpeg, blur+noise: noise std, 0-255 scale (default 25; 15 "
                   "for noise+jpeg, 3 for blur+noise).")
@click.option("--quality", type=int, default=None, help="jpeg, noise+jpeg: JPEG quality.")
@click.option("--scale", type=int, default=None, help="sr: downscale factor.")
@click.option("--shot", type=float, default=0.004, show_default=True,
              help="poisson: signal-dependent variance per unit of intensity, on [0, 1].")
@click.option("--read-sigma", type=float, default=2.0, show_default=True,
              help="poisson: signal-independent noise std, 0-255 scale.")
@click.option("--blur", type=float, default=1.2, show_default=True,
              help="blur+noise: Gaussian blur std in pixels.")
@click.option("--measure", type=click.Choice(["auto", "rgb", "y"]), default="auto",
              show_default=True,
              help="Planes PSNR/SSIM are taken on: auto = the task's convention (Y for jpeg and "
                   "sr on colour images, all planes otherwise); the output says which.")
@click.option("--strength", type=float, default=1.0, show_default=True,
              help="Noise-aware models: scale of the noise map (as `restorer restore`).")
@click.option("--baseline", type=click.Choice(["nlm", "bm3d"]), default=None,
              help="Add a classical denoiser told the true sigma (denoise only; with --pairs "
                   "the sigma estimated from each noisy image) to the table: "
                   "scikit-image non-local means, or BM3D/CBM3D (pip install "
                   "'restorer[baseline]'; slow: seconds per image).")
@click.option("--trim", default="0x0", show_default=True, metavar="ROWSxCOLUMNS",
              help="Cut rows off the bottom and columns off the right of every image first, "
                   "e.g. 1x3 makes Set12 255x253 and 511x509 (sides not multiples of 8).")
@click.option("--edges", is_flag=True,
              help="Also measure the outermost 16 px on all sides against the pixels at "
                   "least 32 px from every side (band / interior PSNR).")
@click.option("--frame", type=click.Choice(["black", "gray"]), default=None,
              help="Place each image in a clean 48 px frame (black, or mid-gray 128), degrade "
                   "inside only, and measure the 24 px next to the frame against the rest.")
@click.option("--through", type=click.Choice(["net", "actor"]), default="net",
              show_default=True,
              help="net: the bare net on the whole unclipped image; actor: what `restorer "
                   "restore` writes (the degraded image saved as 8-bit, the actor's tiles and "
                   "precision).")
@click.option("--tile", type=click.IntRange(min=0), default=256, show_default=True,
              help="--through actor: tile size (0 = whole images), as `restorer restore`.")
@click.option("--flat-fill", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True,
              help="Fill clean flat regions with the image's noise before the net, as `restorer "
                   "restore` does (auto: for models trained to denoise).")
@click.option("--sheet", type=click.Path(dir_okay=False), default=None,
              help="Also write a PNG contact sheet (degraded | restored | clean, and zoomed "
                   "crops) of the first images here.")
@click.option("--sheet-rows", type=click.IntRange(min=1), default=4, show_default=True,
              help="Images on the contact sheet.")
@click.option("--sheet-strengths", default=None, metavar="S1,S2,...",
              help="With --pairs and --sheet: the sheet shows the first pair restored at each "
                   "of these strengths (a noise-aware model), e.g. 0,0.5,1,2.")
@json_option
@errors_to_exit_codes
def evaluate_command(model, data_dir, pairs_dir, task, sigma, quality, scale, shot, read_sigma,
                     blur, measure, strength, baseline, trim, edges, frame, through, tile,
                     flat_fill, sheet, sheet_rows, sheet_strengths, as_json):
    """Measure a model in the reference conventions (PSNR/SSIM on 8-bit, seeded noise), or on
    real noisy/clean pairs (--pairs)."""
    from restorer.quality.evaluate import evaluate, evaluate_pairs

    if (data_dir is None) == (pairs_dir is None):
        raise click.UsageError("give --data (clean images to degrade) or --pairs (real "
                               "noisy/clean pairs), one of them")
    if sigma is None:
        sigma = {"noise+jpeg": 15.0, "blur+noise": 3.0}.get(task, 25.0)

    try:
        trim_rows, trim_columns = (int(part) for part in trim.lower().split("x"))
    except ValueError as e:
        raise click.BadParameter(f"expected ROWSxCOLUMNS such as 1x3, got {trim!r}",
                                 param_hint="--trim") from e
    if sheet_strengths is not None:
        if pairs_dir is None or sheet is None:
            raise click.UsageError("--sheet-strengths needs --pairs and --sheet")
        try:
            strengths = [float(part) for part in sheet_strengths.split(",")]
        except ValueError as e:
            raise click.BadParameter(f"expected numbers such as 0,0.5,1,2, got "
                                     f"{sheet_strengths!r}", param_hint="--sheet-strengths") from e
        _strength_sheet(model, pairs_dir, strengths, sheet, tile)
    try:
        if pairs_dir is not None:
            through_pairs = "actor" if click.get_current_context().get_parameter_source(
                "through").name == "DEFAULT" else through
            result = evaluate_pairs(model, pairs_dir, through=through_pairs, baseline=baseline,
                                    tile=tile, flat_fill=flat_fill, strength=strength)
        else:
            result = evaluate(model, data_dir, task=task, sigma=sigma, quality=quality,
                              scale=scale, baseline=baseline, sheet=sheet,
                              sheet_rows=sheet_rows, trim=(trim_rows, trim_columns),
                              edges=edges,
                              frame=None if frame is None else {"black": 0, "gray": 128}[frame],
                              through=through, tile=tile, flat_fill=flat_fill, shot=shot,
                              read=(read_sigma / 255.0) ** 2, blur=blur, measure=measure,
                              strength=strength)
    except ValueError as e:
        raise SpecError(str(e)) from e
    except OSError as e:  # an unreadable image, or a sheet that cannot be written
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    columns = [("input", "input_psnr"), ("restored", "psnr"), ("ssim", "ssim"),
               ("band", "band_psnr"), ("interior", "interior_psnr"),
               ("baseline", "baseline_psnr"), ("bl band", "baseline_band_psnr"),
               ("bl inter", "baseline_interior_psnr")]
    columns = [(title, key) for title, key in columns if key in result]

    def line(name, values):
        return f"{name[:24]:24s}" + "".join(
            f" {values[key]:9.4f}" if key == "ssim" else f" {values[key]:9.2f}"
            for _, key in columns)

    click.echo(f"{'image':24s}" + "".join(f" {title:>9s}" for title, _ in columns))
    for row in result["rows"]:
        click.echo(line(row["name"], row))
    click.echo(line("mean", result))
    click.echo(f"PSNR/SSIM in dB on {result.get('channels') or result['measured_on']}"
               + (f"; restored worse than its input: {', '.join(result['worse'])}"
                  if result.get("worse") else ""))
    if "band_gap_mean" in result:
        where = "next to the frame" if frame else "along the sides"
        click.echo(f"band {where}: {result['band_gap_mean']:.2f} dB below the interior on "
                   f"average, {result['band_gap_max']:.2f} dB at most"
                   + (f" (baseline: {result['baseline_band_gap_mean']:.2f} dB on average)"
                      if "baseline_band_gap_mean" in result else ""))
    if sheet and "sheet" in result:
        click.echo(f"contact sheet: {result['sheet']}")


@main.command()
@click.argument("source")
@click.argument("target")
@click.option("--net", "arch", default=None,
              help="Net architecture; default: infer a dncnn layout from the file.")
@click.option("--channels", type=int, default=None)
@click.option("--num-features", type=int, default=None)
@click.option("--num-layers", type=int, default=None)
@click.option("--batch-norm/--no-batch-norm", default=None)
@click.option("--batch-norm-eps", type=float, default=None,
              help="BatchNorm eps where the file does not record it (state dicts).")
@click.option("--key-prefix", default="", help="Strip this prefix from the weight names.")
@errors_to_exit_codes
def convert(source, target, arch, channels, num_features, num_layers, batch_norm, batch_norm_eps,
            key_prefix):
    """Import published PyTorch weights (.pth) into a restorer model (safetensors).

    Reads state dicts and whole pickled modules (torch.save of either format) without running
    anything from the file; a pickle that would call code is refused. The dncnn layout
    (depth, width, channels, BatchNorm, biases) is inferred from the file, so no shape flags
    are needed; flags that are given must agree with it.
    """
    from restorer.weights.convert import convert_weights

    spec = {"arch": arch or "dncnn"}
    for name, value in (("channels", channels), ("num_features", num_features),
                        ("num_layers", num_layers), ("batch_norm", batch_norm)):
        if value is not None:
            spec[name] = value
    sha = convert_weights(source, target, spec, key_prefix, batch_norm_eps)
    click.echo(f"wrote {target} (sha256 {sha[:12]})")


@main.command()
@click.argument("names", nargs=-1, metavar="[NAME|PATH]...")
@json_option
@errors_to_exit_codes
def models(names, as_json):
    """What each bundled model is for, what it learnt, its measured quality and cost, and which
    to pick; or only the models NAMEd (bundled names, or paths of model files)."""
    from restorer.weights import zoo as zoo_models

    bundled = zoo_models.bundled()
    rows = []
    for name in names or bundled:
        if name in bundled:
            rows.append(_bundled_row(name, bundled[name]))
        elif os.path.exists(name) or "://" in name:
            rows.append({"name": name, **zoo_models.describe(name)})
        else:
            raise zoo_models.unknown_model(name)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no bundled models found")
    for row in rows:
        _echo_model(row)
    if not names and rows:
        click.echo("\nwhich to pick (restorer restore IN OUT --model NAME):")
        choices = zoo_models.choices()
        width = max(len(c.images) for c in choices)
        model_width = max(len(c.model) for c in choices)
        for choice in choices:
            click.echo(f"  {choice.images:<{width}}  {choice.model:<{model_width}}  {choice.why}")


def _bundled_row(name, entry):
    from restorer.weights import zoo as zoo_models

    card = zoo_models.card(name)
    row = {"name": name, "default": name == zoo_models.DEFAULT_MODEL,
           **zoo_models.describe(str(entry.path)),
           "card": str(entry.card) if entry.card else None,
           "gmac_per_megapixel": round(zoo_models.macs_per_megapixel(str(entry.path)), 1),
           "pick_for": [c.images for c in zoo_models.choices() if c.model == name]}
    if card is not None:
        row.update(purpose=card.purpose, learnt=card.learnt, limits=card.limits,
                   parameters=card.parameters,
                   measured=[dataclasses.asdict(m) for m in card.measured])
    return row


def _measured_line(measured):
    """Card rows grouped by test set and degradation: "set12 sigma 15/25: 24.68/20.35 ->
    31.94/29.53 dB"."""
    groups = {}
    for m in measured:
        kind, _, level = m["setting"].rpartition(" ")
        groups.setdefault((m["set"], kind), []).append((level, m))
    parts = []
    for (test_set, kind), items in groups.items():
        levels = "/".join(level for level, _ in items)
        before = "/".join(f"{m['input_psnr']:.2f}" for _, m in items)
        after = "/".join(f"{m['psnr']:.2f}" for _, m in items)
        parts.append(f"{test_set} {kind + ' ' if kind else ''}{levels}: {before} -> {after} dB")
    return "; ".join(parts)


def _echo_model(row):
    net = row["net"]
    mark = " (default)" if row.get("default") else ""
    if "purpose" not in row:  # a model file, or a bundled model without a card
        fields = " ".join(f"{k}={v}" for k, v in net.items() if k != "arch")
        metrics = row["provenance"].get("metrics", {})
        click.echo(f"{row['name']}{mark}: {net.get('arch')} {fields}"
                   + (f"  metrics: {json.dumps(metrics)}" if metrics else ""))
        imported = row["provenance"].get("imported")
        if imported:
            click.echo(f"  imported from {imported['source']} (sha256 {imported['sha256'][:12]},"
                       f" {imported['content']}): {imported['layout']}")
        return
    click.echo(f"\n{row['name']}{mark}: {row['purpose']}")
    click.echo(f"  learnt: {row['learnt']}")
    if row["measured"]:
        click.echo("  measured (restorer eval, PSNR input -> output): "
                   + _measured_line(row["measured"]))
    parameters = f"{row['parameters']:,} parameters, " if row.get("parameters") else ""
    planes = ("" if net.get("channels", 1) != 1 or net.get("arch") == "opponent"
              else " (x3 for colour: plane by plane)")
    click.echo(f"  cost: {net.get('arch')} net, {parameters}{row['gmac_per_megapixel']:g} GMAC "
               f"per megapixel{planes}")
    if row.get("limits"):
        click.echo(f"  {row['limits']}")
    if row["pick_for"]:
        click.echo(f"  pick it for: {'; '.join(row['pick_for'])}")
    click.echo(f"  card: {row['card']}")


@main.command()
@click.argument("output_uri", metavar="OUTPUT")
@json_option
@click.option("--top", type=int, default=10, help="How many top-ranked images to list.")
@click.option("--sort", type=click.Choice(["change_mean", "change_p99", "residual_structure"]),
              default="change_mean", show_default=True,
              help="Rank images by this ledger column (residual_structure: most detail lost).")
@click.option("--report", "rebuild_report", is_flag=True,
              help="(Re)write OUTPUT/_restorer/report.html from the ledger first (a stopped "
                   "job skips it to exit within its grace period).")
@errors_to_exit_codes
def inspect(output_uri, as_json, top, sort, rebuild_report):
    """Summarise a restore job's OUTPUT: summary, errors, flagged and top-ranked images."""
    from restorer.report.inspection import inspect_output

    if rebuild_report:
        from restorer.report import write_report

        write_report(output_uri)
    report = inspect_output(output_uri, top, sort=sort)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    summary = report["summary"]
    if summary:
        print_summary(summary, False)
        if not summary.get("skipped_non_images"):  # print_summary names them when there are
            click.echo(non_images_line(summary))
    click.echo(f"\nrecords: {report['records']} ({report['failed']} failed)")
    click.echo("errors:")
    for row in report["errors"]:
        click.echo(f"  {row['key']}: [{row['stage']}] {row['error_class']}: {row['message']}")
    if not report["errors"]:
        click.echo("  none")

    def structure(row):
        value = row.get("residual_structure")
        return "" if value is None else f", residual structure {value:.3f}"

    click.echo("flagged (changed, or lost structure, far more than the job's typical image):")
    for row in report["flagged"]:
        click.echo(f"  {row['key']}: mean {row['change_mean']:.2f}, p99 {row['change_p99']:.2f}"
                   f"{structure(row)} ({row['reason']})")
    if not report["flagged"]:
        click.echo("  none")
    click.echo(f"top {len(report['most_changed'])} by {report['sort']} (change: |output - "
               "input|, 8-bit levels; residual structure: 0 noise-like .. 1 image structure):")
    for row in report["most_changed"]:
        click.echo(f"  {row['key']}: mean {row['change_mean']:.2f}, p99 {row['change_p99']:.2f}"
                   f"{structure(row)}")
    if not report["most_changed"]:
        click.echo("  none")
    if report.get("report"):
        click.echo(f"report page: {report['report']}")


@main.command()
@click.option("--images", type=int, default=128, show_default=True)
@click.option("--size", type=int, default=256, show_default=True)
@click.option("--model", default=None)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--data", default=None, help="Use these images (one shape) instead of synthetic.")
@num_cpus_option
@json_option
@errors_to_exit_codes
def bench(images, size, model, batch_size, data, num_cpus, as_json):
    """Measure forward-only ceiling, a naive loop and a restorer job side by side."""
    from restorer.quality.bench import CALIBRATION, run_bench

    result = run_bench(images, size, model, batch_size, data, num_cpus or 0)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{result['images']} images {result['image_shape']} on {result['machine']}, "
               f"model {result['model']}, batch {result['batch_size']}")
    for name in ("ceiling", "naive", "restorer"):
        click.echo(f"  {name:9s} {result[name + '_images_per_second']:9.2f} images/s")
    click.echo(f"  restorer start-up {result['restorer_startup_seconds']:.1f} s (excluded above)")
    click.echo(f"efficiency = restorer / ceiling = {result['efficiency']:.3f}")
    click.echo(f"speedup    = restorer / naive   = {result['speedup']:.3f}")
    click.echo("naive loop, ms per image: " + ", ".join(
        f"{k} {v:.1f}" for k, v in result["naive_stages_ms_per_image"].items()))
    click.echo(f"calibration saved to {CALIBRATION}")


@main.group()
def shard():
    """Pack image files into Parquet shards, or unpack shards into files."""


@shard.command("pack")
@click.argument("source")
@click.argument("target")
@click.option("--rows-per-shard", type=int, default=1000, show_default=True)
@errors_to_exit_codes
def shard_pack(source, target, rows_per_shard):
    """Pack the images under SOURCE into Parquet shards under TARGET."""
    from restorer.io.shards import pack

    report = pack(source, target, rows_per_shard)
    click.echo(f"packed {report.files} images ({report.bytes} bytes) into {report.shards} shards")


@shard.command("unpack")
@click.argument("source")
@click.argument("target")
@errors_to_exit_codes
def shard_unpack(source, target):
    """Write the images in the Parquet shards under SOURCE to files under TARGET."""
    from restorer.io.shards import unpack

    report = unpack(source, target)
    click.echo(f"unpacked {report.files} images from {report.shards} shards "
               f"({report.skipped} rows skipped: failed or unsafe keys)")


@main.command()
@click.argument("folder")
@click.option("--sigma", type=float, default=25.0, help="Noise level on the 0-255 scale.")
@click.option("--clean", "clean_folder", default=None, help="Also write the clean originals here.")
@errors_to_exit_codes
def samples(folder, sigma, clean_folder):
    """Write a few noisy synthetic sample images (gray, RGB, RGBA, 16-bit) into FOLDER."""
    from restorer.io.samples import write_samples

    keys = write_samples(folder, sigma, clean_folder)
    click.echo(f"wrote {len(keys)} sample images to {folder}")
