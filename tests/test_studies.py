"""Each study at toy scale: its outputs exist and the sign of the robust effects is right."""

from __future__ import annotations

import csv
import itertools
import json
import math

import pytest
import torch

import resnetlab
from resnetlab.cli.main import main
from resnetlab.errors import ConfigError
from resnetlab.studies import gradients_at_init, layer_response_stds, lesioned
from resnetlab.studies.common import study_dir, write_csv
from resnetlab.studies.degradation import _final_errors, plot_degradation
from resnetlab.studies.figures import consecutive_runs, save_figure
from resnetlab.studies.gradients import (
    _log_grids,
    conv_gradient_norms,
    first_over_last,
    plot_gradients_at_init,
    plot_gradients_training,
)
from resnetlab.studies.lesion import path_gradient_magnitudes, plot_lesion, random_lesions, single_lesions
from resnetlab.studies.responses import plot_responses, response_layers


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)


def test_gradients_vanish_without_norm_and_explode_with_bn_in_plain56_only(batch) -> None:
    no_norm = {n: gradients_at_init(n, batch, norm_layer="none") for n in ("plain56", "resnet56")}
    assert no_norm["plain56"][0] < 1e-3 * no_norm["resnet56"][0]  # the first layer gets almost nothing
    bn = {n: gradients_at_init(n, batch) for n in ("plain56", "resnet56")}
    plain_ratio, resnet_ratio = bn["plain56"][0] / bn["plain56"][-1], bn["resnet56"][0] / bn["resnet56"][-1]
    assert plain_ratio > 10 * resnet_ratio  # with BN the plain stack's early gradients blow up instead


def test_lesioning_hurts_a_resnet_less_than_a_plain_net(batch) -> None:
    """Trained briefly on a fixed batch, one deleted block costs a ResNet less than a plain net.

    GroupNorm: no running statistics, so a few steps of training give a meaningful eval-mode model."""
    x, y = batch
    results = {}
    for name in ("resnet20", "plain20"):
        torch.manual_seed(0)
        model = resnetlab.create_model(name, norm_layer="groupnorm")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for _ in range(30):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            intact = torch.nn.functional.cross_entropy(model(x), y).item()
            rows = single_lesions(model, [(x, y)])
            losses = []
            for row in rows:
                if not math.isnan(row["accuracy"]) and not row["downsampling"]:
                    with lesioned(model, {row["block"]}):
                        losses.append(torch.nn.functional.cross_entropy(model(x), y).item())
        results[name] = sum(losses) / len(losses) - intact
    assert results["resnet20"] < results["plain20"]


def test_lesioned_context_restores_each_blocks_own_state() -> None:
    model = resnetlab.create_model("resnet20")
    model.blocks()[7].lesioned = True  # lesioned before: must stay so
    with lesioned(model, {0, 4}):
        assert [i for i, b in enumerate(model.blocks()) if b.lesioned] == [0, 4, 7]
    assert [i for i, b in enumerate(model.blocks()) if b.lesioned] == [7]
    with pytest.raises(RuntimeError), lesioned(model, {1}):
        raise RuntimeError("an evaluation failed")
    assert [i for i, b in enumerate(model.blocks()) if b.lesioned] == [7]


def test_path_gradients_cover_every_length_and_restore_the_blocks(batch) -> None:
    model = resnetlab.create_model("resnet20")
    model.blocks()[2].use_shortcut = False  # whatever the blocks were before, they are so after
    model.blocks()[5].lesioned = True
    rows = path_gradient_magnitudes(model, batch, samples=1, seed=0)
    assert [r["length"] for r in rows] == list(range(10))
    assert sum(r["paths"] for r in rows) == 2**9
    assert sum(r["gradient_share"] for r in rows) == pytest.approx(1.0)
    assert [b.use_shortcut for b in model.blocks()] == [i != 2 for i in range(9)]
    assert [b.lesioned for b in model.blocks()] == [i == 5 for i in range(9)]
    assert model.training and all(p.grad is None for p in model.parameters())


def test_plain_net_lesions_skip_downsampling_blocks_and_label_k_exactly(batch) -> None:
    plain = resnetlab.create_model("plain20").eval()
    rows = single_lesions(plain, [batch])
    assert [r["block"] for r in rows if r["downsampling"]] == [3, 6]  # where the width doubles
    assert all(math.isnan(r["accuracy"]) for r in rows if r["downsampling"])  # nothing carries their input
    assert all(0 <= r["accuracy"] <= 100 for r in rows if not r["downsampling"])
    assert [r["k"] for r in random_lesions(plain, [batch], [0, 7], samples=2, seed=0)] == [0, 7, 7]
    with pytest.raises(ConfigError, match="7 deletable"):  # never a row labelled 8 that deleted 7
        random_lesions(plain, [batch], [8], samples=1, seed=0)


@pytest.mark.parametrize(("name", "count"), [("resnet20", 18), ("plain20", 18), ("resnet18", 16), ("resnet50", 16),
                                             ("preact_resnet18", 16), ("preact_resnet50", 16)])  # fmt: skip
def test_responses_one_per_3x3_layer(name, count) -> None:
    """He et al. Fig. 7: each 3x3 layer's response. Not the projection shortcut's BN, not the 1x1 layers."""
    model = resnetlab.create_model(name)
    layers = response_layers(model)
    assert len(layers) == count
    shortcut_modules = {id(m) for b in model.blocks() if b.downsample is not None for m in b.downsample.modules()}
    assert not shortcut_modules & {id(m) for m in layers}


def test_response_stds_come_from_post_bn_outputs(batch) -> None:
    model = resnetlab.create_model("resnet20").eval()
    stds = layer_response_stds(model, [batch])
    assert len(stds) == 18 and all(s > 0 for s in stds)
    with torch.no_grad():  # a BN scale of 0 makes that layer's response exactly constant: std 0
        model.blocks()[4].bn2.weight.zero_()
    assert layer_response_stds(model, [batch])[9] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.shared
@pytest.mark.slow
def test_published_deeper_resnet_has_smaller_responses(shared_file, monkeypatch) -> None:
    """He et al. Fig. 7: ResNet-56's responses are smaller than ResNet-20's (the published weights)."""
    from resnetlab.studies.common import EvalSets

    monkeypatch.setenv("RESNETLAB_WEIGHTS_PATH", str(shared_file("weights/cifar10-akamaster")))
    sets = EvalSets(str(shared_file("data/cifar10-jpeg.tar.xz")), test_subset=500, seed=0)
    means = {}
    for depth in (20, 56):
        model = resnetlab.create_model(f"resnet{depth}", pretrained=True).eval()
        stds = layer_response_stds(model, sets.for_model(model)[1])
        means[depth] = sum(stds) / len(stds)
    assert means[56] < 0.8 * means[20], means  # 0.357 vs 0.601 over the full test set (docs/studies.md)


def test_gradient_norms_do_not_overflow_in_float32() -> None:
    conv = torch.nn.Conv2d(1, 1, 3)
    conv.weight.grad = torch.full_like(conv.weight, 1e30)  # float32 holds it; its float32 norm would be inf
    assert math.isinf(conv.weight.grad.norm().item())
    assert conv_gradient_norms(conv) == [pytest.approx(3e30)]


def test_first_over_last_reports_overflow_as_nan() -> None:
    assert first_over_last([8.0, 2.0, 4.0]) == 2.0
    assert math.isnan(first_over_last([math.nan, 1.0])) and math.isnan(first_over_last([1.0, math.inf]))
    assert first_over_last([1.0, 0.0]) == math.inf


def test_training_heat_map_takes_its_colour_range_from_the_data(tmp_path) -> None:
    during = {"plain8": [(1, [1e-9, 0.0, 1e3]), (2, [1e-8, math.nan, 1e2])], "resnet8": [(1, [1.0, 1.0, 1.0])]}
    fig = plot_gradients_training(during, "Gradient norms during 2 steps\ndigits, train split (64 images)")
    assert_stands_alone(fig, "digits, train split")  # zeros, NaN and 12 decades: drawn, not an error
    save_figure(fig, tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 0
    grids, low, high = _log_grids(during)
    assert (low, high) == (pytest.approx(-9.0), pytest.approx(3.0))
    assert torch.isnan(grids["plain8"][1]).all()  # a zero or NaN norm is drawn as "no data", not clipped


def test_study_folders_never_collide(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    first, second = study_dir("lesion", None), study_dir("lesion", None)
    assert first != second and first.is_dir() and second.is_dir()


def test_empty_csv_keeps_its_header(tmp_path) -> None:
    write_csv(tmp_path / "a.csv", [], ("model", "step"))
    assert (tmp_path / "a.csv").read_text().strip() == "model,step"
    with pytest.raises(ValueError):
        write_csv(tmp_path / "b.csv", [])


def test_final_errors_without_evaluations_are_nan() -> None:
    assert all(math.isnan(v) for v in _final_errors([]).values())
    two = [dict(train_top1=60.0, eval_top1=50.0), dict(train_top1=80.0, eval_top1=70.0)]
    assert _final_errors(two) == {"train_error": 30.0, "test_error": 40.0}


def _outputs(folder, printed: str, files: tuple[str, ...]) -> tuple[dict, dict[str, list[dict]], str]:
    """Every promised file is there and not empty; summary.json is what --json printed; the CSVs, parsed."""
    for name in (*files, "report.md", "summary.json"):
        assert (folder / name).is_file() and (folder / name).stat().st_size > 0, name
    summary = json.loads(printed)
    assert json.loads((folder / "summary.json").read_text()) == summary
    report = (folder / "report.md").read_text()
    for name in files:
        if name.endswith(".png"):
            assert f"]({name})" in report, name  # the report shows each figure
    tables = {}
    for name in files:
        if name.endswith(".csv"):
            with open(folder / name, newline="") as f:
                tables[name] = list(csv.DictReader(f))
            assert tables[name], name
    return summary, tables, report


@pytest.mark.slow
def test_study_commands_write_their_outputs(tmp_path, capsys) -> None:
    common = ["--json"]
    assert main(["study", "gradients", "--depths", "8,14", "--train-depths", "8", "--subset", "128",
                 "--train-steps", "4", "--record-every", "2", "--batch-size", "32", "--out", str(tmp_path / "g"),
                 *common]) == 0  # fmt: skip
    grads, tables, _ = _outputs(tmp_path / "g", capsys.readouterr().out, (
        "gradients.csv", "ratios.csv", "gradients_at_init.png", "gradients_training.png"))  # fmt: skip
    assert set(grads["first_over_last_at_init"]) == {f"{f}{d}/{n}" for f in ("plain", "resnet") for d in (8, 14)
                                                      for n in ("batchnorm", "none")}  # fmt: skip
    assert set(grads["first_over_last_during_training"]) == {"plain8", "resnet8"}  # only the train depths
    assert grads["float64_at_init"] == [] and grads["overflow_at_init"] == []
    assert {(r["model"], int(r["step"])) for r in tables["ratios.csv"] if r["model"] == "plain8" and r["step"] != "0"} \
        == {("plain8", s) for s in (1, 2, 4)}  # fmt: skip
    assert {int(r["layer"]) for r in tables["gradients.csv"] if r["model"] == "resnet14"} == set(range(13))

    degradation = ["study", "degradation", "--depths", "8,14", "--max-iters", "6", "--eval-every", "3",
                   "--subset", "256", "--test-subset", "100", "--out", str(tmp_path / "d"), *common]  # fmt: skip
    assert main(degradation) == 0
    deg, tables, report = _outputs(tmp_path / "d", capsys.readouterr().out, ("curves.csv", "degradation.png"))
    assert deg["resumed"] == []
    assert main([*degradation, "--resume"]) == 0  # finished runs are collected, not trained again
    again = json.loads(capsys.readouterr().out)
    assert sorted(again["resumed"]) == sorted(deg["final"]) and again["final"] == deg["final"]
    assert set(deg["final"]) == {"plain8", "plain14", "resnet8", "resnet14"}
    assert isinstance(deg["plain_deeper_trains_worse"], bool) and deg["iterations"] == 6
    assert {(r["model"], r["step"]) for r in tables["curves.csv"]} == {
        (f"{f}{d}", s) for f in ("plain", "resnet") for d in (8, 14) for s in ("3", "6")}  # fmt: skip
    assert "Measured after 6 iterations of batch" in report and "final training error plain-8" in report
    assert "observed" not in report and "| resnet14 |" in report
    for name, folder in deg["models"].items():  # the trained nets are kept, for the lesion study
        assert folder == str(tmp_path / "d" / name / "model") and (tmp_path / "d" / name / "model").is_dir()
        assert (tmp_path / "d" / name / "checkpoints" / "last.pt").is_file()

    model_dir = tmp_path / "d" / "resnet14" / "model"
    plain_dir = tmp_path / "d" / "plain14" / "model"
    assert main(["study", "lesion", "--from", str(model_dir), "--plain", str(plain_dir), "--test-subset", "100",
                 "--samples", "2", "--path-samples", "1", "--path-images", "20", "--out", str(tmp_path / "l"),
                 *common]) == 0  # fmt: skip
    les, tables, report = _outputs(tmp_path / "l", capsys.readouterr().out, ("lesion.png", "lesions.csv", "paths.csv"))
    assert les["residual"]["intact"] >= 0 and les["paths"]["blocks"] == 6 and les["path_images"] == 20
    assert les["residual"]["deletable_blocks"] == 6 and les["plain"]["deletable_blocks"] == 4
    assert set(les["residual"]["single_lesion_downsampling"]) == {"2", "4"}  # its own figure, per block
    assert les["plain"]["single_lesion_downsampling"] == {"2": None, "4": None}  # cannot be deleted
    assert set(les["plain"]["random_lesions"]) == {"0", "1", "2", "3", "4"}  # never more than it can delete
    singles = [r for r in tables["lesions.csv"] if r["kind"] == "single"]
    assert sorted((r["net"], r["block"]) for r in singles) == sorted((n, str(b)) for n in ("plain", "residual")
                                                                     for b in range(6))  # fmt: skip
    assert [int(r["length"]) for r in tables["paths.csv"]] == list(range(7))
    assert "| blocks deleted at random |" in report and "Deleting a downsampling block" in report

    assert main(["study", "responses", "--from", str(model_dir), str(plain_dir), "--test-subset", "100",
                 "--out", str(tmp_path / "r"), *common]) == 0  # fmt: skip
    resp, tables, report = _outputs(tmp_path / "r", capsys.readouterr().out, ("responses.png", "responses.csv"))
    assert len(resp["models"]) == 2 and all(v["layers"] == 12 for v in resp["models"].values())
    assert len(tables["responses.csv"]) == 24 and "| resnet14 | 12 |" in report


# ---------------------------------------------------------------------------- figures that stand on their own
def _data_axes(fig) -> list:
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def assert_stands_alone(fig, *title_words: str) -> None:
    """A title naming what was measured; every panel with data has labelled axes; at least one legend, and
    no legend over any panel's plotting area."""
    title = fig.get_suptitle()
    assert title, "the figure has no title"
    for word in title_words:
        assert word in title, (word, title)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    panels = _data_axes(fig)
    for ax in panels:
        assert ax.get_xlabel() and ax.get_ylabel(), (ax.get_title(), ax.get_xlabel(), ax.get_ylabel())
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    assert legends, "no legend"
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in panels:
            assert not box.overlaps(ax.get_window_extent(renderer)), (legend.get_texts()[0].get_text(), ax.get_title())


def _curve(start: float, end: float, steps=(10, 20, 30)) -> list[dict]:
    values = [start + (end - start) * i / (len(steps) - 1) for i in range(len(steps))]
    return [dict(step=s, train_top1=100 - v, eval_top1=95 - v) for s, v in zip(steps, values)]


def _luminance(color) -> float:
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(color)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_degradation_figure_keys_its_line_styles_in_a_legend_and_uses_visible_colours() -> None:
    curves = {f"{f}{d}": _curve(80, 40 + d / 4) for f in ("plain", "resnet") for d in (20, 56)}
    fig = plot_degradation(curves, (20, 56), "Degradation: plain vs residual nets\ncifar10, test split", batch_size=64)
    assert_stands_alone(fig, "plain vs residual", "test split")
    plain, resnet = _data_axes(fig)
    assert plain.get_ylabel() == "error (%)" and "dashed" not in plain.get_ylabel()  # the key is in the legend
    assert "batches of 64" in plain.get_xlabel()
    key = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"20 layers", "56 layers", "training error", "test error"} <= set(key)
    for ax in (plain, resnet):  # a dark colour per depth: no pale yellow dashed line on white
        assert all(_luminance(line.get_color()) < 0.6 for line in ax.get_lines())
    colours = [{d: ax.get_lines()[2 * i + 1].get_color() for i, d in enumerate((20, 56))} for ax in (plain, resnet)]
    assert colours[0] == colours[1] and colours[0][20] != colours[0][56]  # twins share the depth's colour


def test_gradients_at_init_has_a_panel_per_depth_so_1e76_does_not_flatten_20_layers() -> None:
    at_init = {}
    for depth, explode in ((20, 7.0), (56, 2e3), (110, 1e76)):
        layers = depth - 1
        at_init[f"plain{depth}/batchnorm"] = [explode ** (1 - i / (layers - 1)) for i in range(layers)]
        at_init[f"resnet{depth}/batchnorm"] = [3.0 - 2 * i / (layers - 1) for i in range(layers)]
    fig = plot_gradients_at_init(at_init, ("batchnorm",), (20, 56, 110), "at initialisation\ncifar10, train split")
    assert_stands_alone(fig, "train split")
    panels = _data_axes(fig)
    assert [ax.get_title().split(",")[0] for ax in panels] == ["20 layers", "56 layers", "110 layers"]
    low, high = panels[0].get_ylim()
    assert high < 100 and low > 0.1  # the 20-layer panel spans its own data, not 1e-4...1e76
    for ax in panels:
        plain, resnet = ax.get_lines()
        assert plain.get_color() == resnet.get_color() and plain.get_linestyle() != resnet.get_linestyle()
        assert "first / last layer: plain" in ax.get_title()


def _lesion_rows(intact: float, ks: list[int]) -> dict:
    single = [dict(block=b, downsampling=b == 3, accuracy=intact - 5 - b) for b in range(6)]
    multi = [dict(k=k, accuracy=intact - 6 * k - s) for k in ks for s in range(2)]
    return dict(intact=intact, single=single, multi=multi)


def test_lesion_figure_has_panel_titles_a_chance_line_and_no_line_across_unmeasured_k() -> None:
    ks = [0, 1, 2, 4, 6, 7]
    results = {"residual": _lesion_rows(80, ks), "plain": _lesion_rows(30, [0, 1, 2])}
    paths = [dict(length=n, path_fraction=0.1, gradient_share=0.1) for n in range(7)]
    fig = plot_lesion(results, paths, "Lesion study: resnet20 (residual)\ncifar10, test split", chance=10, samples=2)
    assert_stands_alone(fig, "resnet20", "test split")
    panels = _data_axes(fig)
    assert all(ax.get_title() for ax in panels)
    for ax in panels[:2]:
        assert any(line.get_label() == "chance (10%)" and set(line.get_ydata()) == {10} for line in ax.get_lines())
    joined = [list(line.get_xdata()) for line in panels[1].get_lines() if line.get_linestyle() == "-"]
    assert joined and all(b - a == 1 for xs in joined for a, b in itertools.pairwise(xs))  # 2-4 and 4-6 are not joined
    assert consecutive_runs(ks) == [[0, 1, 2], [4], [6, 7]]


def test_responses_figure_says_what_std_it_shows() -> None:
    results = {"plain20": [1.0, 2.0, 3.0], "resnet20": [0.5, 0.6, 0.4], "resnet56": [0.3, 0.2, 0.25]}
    fig = plot_responses(results, "Layer responses of plain20, resnet20\ncifar10, test split (100 images)")
    assert_stands_alone(fig, "plain20", "test split")
    for ax in _data_axes(fig):
        assert ax.get_ylabel().startswith("std of the layer's response") and "BN" in ax.get_ylabel()
    lines = {line.get_label(): line for line in _data_axes(fig)[0].get_lines()}
    assert lines["plain20"].get_color() == lines["resnet20"].get_color() != lines["resnet56"].get_color()


def test_study_output_lists_figure_files_and_keeps_markdown_in_the_report(tmp_path, capsys) -> None:
    import argparse

    from resnetlab.cli.study import _finish
    from resnetlab.studies.common import write_report

    summary = {"folder": str(tmp_path)}
    write_report(tmp_path, "A study", ["What was measured."], summary, figures=["a.png", "b.png"])
    assert _finish(argparse.Namespace(json=False), summary) == 0
    printed = capsys.readouterr().out
    assert "What was measured." in printed and "![" not in printed and "](" not in printed
    assert f"figure: {tmp_path / 'a.png'}\nfigure: {tmp_path / 'b.png'}" in printed
    report = (tmp_path / "report.md").read_text()
    assert "![a](a.png)" in report and "![b](b.png)" in report


@pytest.mark.slow
def test_study_command_prints_figure_paths_not_markdown(tmp_path, capsys) -> None:
    model = resnetlab.create_model("resnet8", num_classes=10, in_chans=1, input_size=(1, 16, 16), mean=(0.3,),
                                   std=(0.3,))  # fmt: skip
    resnetlab.save_pretrained(model, tmp_path / "m")
    out = tmp_path / "r"
    assert (
        main(
            [
                "study",
                "responses",
                "--from",
                str(tmp_path / "m"),
                "--data",
                "digits",
                "--test-subset",
                "20",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"figure: {out / 'responses.png'}" in printed and f"report: {out / 'report.md'}" in printed
    assert "![" not in printed and "](" not in printed  # no markdown image links in a terminal
    assert "![responses](responses.png)" in (out / "report.md").read_text()  # the markdown report keeps them
    assert json.loads((out / "summary.json").read_text())["figures"] == [str(out / "responses.png")]
