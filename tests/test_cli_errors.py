"""Bad input at the command line: every case gives one error line on stderr, a non-zero exit, no traceback.

The table drives ``resnetlab.cli.main.main`` in-process (fast: every case fails before any training or
inference starts, or after a single tiny prediction); a few cases run as real processes to prove that no
"Traceback" reaches the terminal. Paths in the table are written with placeholders filled by the fixture.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

import resnetlab
from resnetlab.cli.main import main


def billion_laughs(levels: int) -> str:
    """A recipe of nested aliases inside a valid option: ``levels`` levels of nine, 9**levels strings when
    expanded. At 9 levels (about 700 bytes) the old loader's error message alone exhausted memory (D7)."""
    rows = [f"  l0: &l0 [{', '.join(['lol'] * 9)}]"]
    rows += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "model_options:\n" + "\n".join(rows) + f"\nlr: *l{levels - 1}\n"


#: (argv with placeholders, a fragment of the expected error line). At least 60 rows; grouped by verb.
CASES: list[tuple[list[str], str]] = [
    # the command line itself
    (["nonexistent"], "invalid choice"),
    (["train", "--bogus"], "unrecognized arguments"),
    (["study"], "required"),
    # train: options checked by TrainConfig (issue 15's list), before any data is loaded
    (["train", "--label-smoothing", "5"], "label_smoothing must be in [0, 1)"),
    (["train", "--ema-decay", "2"], "ema_decay must be in [0, 1)"),
    (["train", "--device", "banana"], "not a device"),
    (["train", "--seed", "100000000000000000000"], "seed must be in 0..4294967295"),
    (["train", "--seed", "10**20"], "invalid int value"),
    (["train", "--seed", "-1"], "seed must be in 0..4294967295"),
    (["train", "--image-size", "0"], "image_size must be a positive integer"),
    (["train", "--image-size", "100000"], "image_size must be a positive integer up to 4096"),
    (["train", "--grad-clip", "-1"], "grad_clip must be >= 0"),
    (["train", "--num-workers", "-1"], "num_workers must be >= 0"),
    (["train", "--batch-size", "0"], "batch_size must be a positive integer"),
    (["train", "--lr", "-0.1"], "lr must be > 0"),
    (["train", "--lr", "nan"], "lr=nan is not a valid float"),
    (["train", "--lr", "inf"], "lr=inf is not a valid float"),
    (["train", "--epochs", "0"], "epochs must be a positive integer"),
    (["train", "--max-iters", "0"], "max_iters must be a positive integer"),
    (["train", "--val-split", "-1"], "val_split must be >= 0"),
    (["train", "--amp", "fp8"], "amp='fp8' is not one of"),
    (["train", "--optimizer-impl", "turbo"], "optimizer_impl='turbo' is not one of"),
    (["train", "--compile", "fastest"], "compile_mode='fastest' is not one of"),
    (["train", "--weight-decay", "-1"], "weight_decay must be >= 0"),
    # train: --set
    (["train", "--set", "amp=maybe"], "amp='maybe' is not one of"),
    (["train", "--set", "nope=1"], "unknown training option(s) 'nope'"),
    (["train", "--set", "lr"], "--set expects key=value"),
    (["train", "--set", "milestones=[[1, 2]]"], "milestones=[[1, 2]] is not a valid list[int]"),
    (["train", "--set", "milestones=[-30]"], "milestones must be a list of non-negative integers"),
    (["train", "--set", "batch_size=1e400"], "batch_size=inf is not a valid int"),
    (["train", "--set", "model_options=5"], "model_options=5 is not a valid dict"),
    (["train", "--set", "lr=[1, 2"], "is not valid YAML"),
    (["train", "--set", "lr=[&a [1, 2], *a]"], "aliases (*name) are not supported"),
    (["train", "--set", "lr=" + "[" * 1200], "nested too deeply"),
    (["train", "--set", "epochs=true"], "epochs=True is not a valid int"),
    (["train", "--set", "momentum=1.5"], "momentum must be in [0, 1)"),
    (["train", "--set", "schedule=linear"], "schedule='linear' is not one of"),
    (["train", "--set", "progress=maybe"], "progress='maybe' is not a valid bool"),
    (["train", "--set", "std=[0.2, 0, 0.2]"], "std must be a list of positive numbers"),
    (["train", "--set", "lr=" + "x" * 100_000], "lr='xxxxxxxx"),
    (["train", "--lr", "0.1", "--set", "lr=0.2"], "lr is given twice"),
    (["train", "--resume", "{tmp}/no-such-run", "--recipe", "demo"], "drop --recipe"),
    # train: recipes
    (["train", "--recipe", "nope"], "unknown recipe 'nope'"),
    (["train", "--recipe", "{tmp}/missing.yaml"], "cannot read recipe"),
    (["train", "--recipe", "{recipes}/huge-batch.yaml"], "batch_size=inf is not a valid int"),
    (["train", "--recipe", "{recipes}/nested-milestones.yaml"], "is not a valid list[int]"),
    (["train", "--recipe", "{recipes}/wrong-type.yaml"], "lr='fast' is not a valid float"),
    (["train", "--recipe", "{recipes}/laughs.yaml"], "aliases (*name) are not supported"),
    (["train", "--recipe", "{recipes}/list.yaml"], "must be a mapping of option names"),
    (["train", "--recipe", "{recipes}/latin1.yaml"], "is not UTF-8 text"),
    (["train", "--recipe", "{recipes}/folder.yaml"], "is not a regular file"),
    (["train", "--recipe", "{recipes}/bad-amp.yaml"], "amp='fast' is not one of"),
    # train: the run folder, checked at start-up
    (["train", "--run-dir", "{file}"], "is a file, not a folder"),
    (["train", "--run-dir", "{file}/run"], "is a file, so no folder can be created there"),
    (["train", "--run-dir", "/proc/resnetlab-run"], "is on a virtual filesystem (proc)"),
    (["train", "--set", "runs_root=/sys/runs"], "is on a virtual filesystem (sys)"),
    # finetune: the same options as train, and no TypeError for a --set that repeats a flag
    (["finetune", "--from", "none", "--data", "digits", "--set", "progress=false", "--set", "lr=-1"], "lr must be > 0"),
    (["finetune", "--from", "none", "--data", "digits", "--set", "data=digits"], "data is given twice"),
    (["finetune", "--from", "none", "--data", "digits", "--set", "pretrained=x"], "with --from, not --set"),
    (
        ["finetune", "--from", "none", "--data", "digits", "--model", "resnet8", "--set", "model=resnet8"],
        "model is given twice",
    ),
    (
        ["finetune", "--from", "none", "--data", "digits", "--no-progress", "--num-workers", "-1"],
        "num_workers must be >= 0",
    ),
    (["finetune", "--from", "none", "--data", "digits", "--run-dir", "{file}"], "is a file, not a folder"),
    (["finetune", "--freeze-stages", "-1"], "must be 0 or more"),
    (["finetune", "--lr-decay", "0"], "must be a number > 0"),
    (["finetune"], "needs --from SOURCE and --data DATASET"),
    # eval
    (["eval", "{model}", "--out", "{file}"], "--out {file} is a file, not a folder"),
    (["eval", "{model}", "--batch-size", "0"], "must be a positive integer"),
    (["eval", "{model}", "--num-workers", "-1"], "must be 0 or more"),
    (["eval", "{model}", "--device", "banana"], "not a device"),
    # predict
    (["predict", "--from", "{model}", "{image}", "--top-k", "-1"], "argument --top-k: must be a positive integer"),
    (["predict", "--from", "{model}", "{image}", "--top-k", "0"], "argument --top-k: must be a positive integer"),
    (["predict", "--from", "{model}", "{image}", "--batch-size", "0"], "argument --batch-size: must be a positive"),
    (["predict", "--from", "{model}", "{image}", "--csv", "{tmp}"], "is a folder; name a file"),
    (["predict", "--from", "{model}", "{image}", "--csv", "{tmp}/missing/p.csv"], "does not exist"),
    (["predict", "--from", "{model}", "{image}", "--csv", "/proc/p.csv"], "virtual filesystem"),
    (["predict", "--from", "{model}", "{not_image}"], "none of the 1 input(s) could be read"),
    (["predict", "--from", "{model}", "{empty}"], "no images in"),
    (["predict", "--from", "{model}", "{tmp}/missing.jpg"], "no such file or folder"),
    (["predict", "--from", "{model}", "{image}", "--device", "gpu0"], "not a device"),
    # benchmark
    (["benchmark", "--batch", "0"], "argument --batch: must be a positive integer"),
    (["benchmark", "--iters", "0"], "argument --iters: must be a positive integer"),
    (["benchmark", "--warmup", "-1"], "argument --warmup: must be 0 or more"),
    (["benchmark", "--threads", "0"], "argument --threads: must be a positive integer"),
    (["benchmark", "--image-size", "-5"], "argument --image-size: must be a positive integer"),
    (["benchmark", "--backend", "tensorrt"], "invalid choice"),
    (["benchmark", "--device", "banana"], "not a device"),
    # models, info, data
    (["info", "resnet05"], "Did you mean"),
    (["info", "resnet20", "--image-size", "0"], "must be a positive integer"),
    (["data", "--image-size", "0"], "must be a positive integer"),
    (["data", "--val-split", "-1"], "must be 0 or more"),
    (["data", "--val-split", "nan"], "expected a finite number"),
    (["data", "--seed", "-3"], "must be in 0..4294967295"),
    # study
    (["study", "degradation", "--depths", "0"], "must be a positive integer"),
    (["study", "degradation", "--depths", "a,b"], "expected an integer"),
    (["study", "degradation", "--depths", ","], "expected comma-separated depths"),
    (["study", "degradation", "--max-iters", "0"], "must be a positive integer"),
    (["study", "degradation", "--lr", "-1"], "must be a number > 0"),
    (["study", "degradation", "--out", "{file}"], "is a file, not a folder"),
    (["study", "gradients", "--record-every", "0"], "must be a positive integer"),
    (["study", "lesion", "--from", "{model}", "--samples", "0"], "must be a positive integer"),
    (["study", "responses", "--from", "{model}", "--out", "/proc/x"], "virtual filesystem"),
    # features, similar, probe, serve, export: their numbers
    (["features", "--from", "{model}", "{image}", "--out", "{tmp}/f.npy", "--batch-size", "0"], "positive integer"),
    (["features", "--from", "{model}", "{image}", "--out", "{tmp}/f.npy", "--stage", "-1"], "must be 0 or more"),
    (["similar", "{image}", "--index", "{tmp}/f.npy", "-k", "-1"], "argument -k/--top-k: must be a positive"),
    (["probe", "--train", "a.npy", "--val", "b.npy", "-k", "0"], "argument -k: must be a positive integer"),
    (["serve", "--from", "{model}", "--port", "70000"], "must be a port number in 0..65535"),
    (["serve", "--from", "{model}", "--max-batch", "0"], "must be a positive integer"),
    (["serve", "--from", "{model}", "--max-wait-ms", "-5"], "must be a number > 0"),
    (["export", "--from", "{model}", "--calibration-images", "0"], "must be a positive integer"),
    (["export", "--from", "{model}", "--format", "pickle"], "invalid choice"),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    """The paths the table's placeholders stand for: a tiny model, images, recipes, a plain file."""
    tmp = tmp_path_factory.mktemp("cli-errors")
    model = tmp / "model"
    resnetlab.save_pretrained(resnetlab.create_model("resnet8", num_classes=3, widths=(4, 8, 8), stem_channels=4),
                              model)  # fmt: skip
    Image.new("RGB", (20, 20), "red").save(tmp / "red.png")
    (tmp / "notes.png").write_text("not an image")
    (tmp / "empty").mkdir()
    (tmp / "a-file").write_text("x")
    recipes = tmp / "recipes"
    recipes.mkdir()
    for name, text in {
        "huge-batch.yaml": "batch_size: 1e400\n",
        "nested-milestones.yaml": "milestones: [[30, 60], [90]]\n",
        "wrong-type.yaml": "lr: fast\n",
        "laughs.yaml": billion_laughs(6),  # small enough that the old code failed the test, not the machine
        "list.yaml": "- lr\n- 0.1\n",
        "bad-amp.yaml": "amp: fast\n",
    }.items():
        (recipes / name).write_text(text)
    (recipes / "latin1.yaml").write_bytes("model: r\xe9snet\n".encode("latin-1"))
    (recipes / "folder.yaml").mkdir()
    return {"tmp": str(tmp), "model": str(model), "image": str(tmp / "red.png"), "not_image": str(tmp / "notes.png"),
            "empty": str(tmp / "empty"), "file": str(tmp / "a-file"), "recipes": str(recipes)}  # fmt: skip


def _fill(argv: list[str], places: dict[str, str]) -> list[str]:
    return [arg.format(**places) if "{" in arg else arg for arg in argv]


def assert_one_error_line(err: str, expected: str) -> None:
    """stderr ends with exactly one line ``...: error: ...`` that contains ``expected``; no traceback anywhere.
    Lines before it may only say which inputs were skipped (predict)."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert all(line.startswith("skipped ") for line in lines[:-1]), err
    assert expected in errors[0], f"{expected!r} not in {errors[0]!r}"
    assert len(errors[0]) < 2100


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 60
    verbs = {argv[0] for argv, _ in CASES}
    assert verbs >= {"train", "finetune", "eval", "predict", "benchmark", "info", "data", "study", "features",
                     "similar", "probe", "serve", "export"}  # fmt: skip


@pytest.mark.parametrize(("argv", "expected"), CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_gives_one_line_and_a_nonzero_exit(argv, expected, places, capsys) -> None:
    code = main(_fill(argv, places))
    out, err = capsys.readouterr()
    assert code not in (0, None), out
    assert_one_error_line(err, _fill([expected], places)[0])


def test_json_mode_also_prints_the_error_as_json(capsys) -> None:
    assert main(["train", "--ema-decay", "2", "--json"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out) == {"error": "ConfigError", "message": err.strip().removeprefix("resnetlab: error: ")}


def test_an_unexpected_exception_is_one_line_with_a_hint(monkeypatch, capsys) -> None:
    import resnetlab.cli.models as command

    def broken(args):
        raise RuntimeError("something\nthat spans lines")

    monkeypatch.setattr(command, "models", broken)
    monkeypatch.delenv("RESNETLAB_DEBUG", raising=False)
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("resnetlab: error: unexpected RuntimeError: something that spans lines (re-run with "
                           "RESNETLAB_DEBUG=1 to see the traceback, and please report it)")  # fmt: skip
    monkeypatch.setenv("RESNETLAB_DEBUG", "1")
    with pytest.raises(RuntimeError, match="something"):
        main(["models"])


def test_os_errors_name_the_path(monkeypatch, capsys) -> None:
    import resnetlab.cli.models as command

    def denied(args):
        raise PermissionError(13, "Permission denied", "/data/x.png")

    monkeypatch.setattr(command, "models", denied)
    assert main(["models"]) == 1
    assert capsys.readouterr().err.strip() == "resnetlab: error: Permission denied: /data/x.png"


def test_predict_refuses_a_csv_folder_before_predicting(places, monkeypatch, capsys) -> None:
    """The folder case used to crash after every prediction was made: nothing may be computed first."""
    from resnetlab.inference import Predictor

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the --csv path was checked")

    monkeypatch.setattr(Predictor, "load", never)
    assert main(["predict", "--from", places["model"], places["image"], "--csv", places["tmp"]]) == 1
    assert "is a folder" in capsys.readouterr().err


def test_predict_exits_non_zero_only_when_nothing_was_read(places, capsys) -> None:
    both = [places["image"], places["not_image"]]
    assert main(["predict", "--from", places["model"], *both, "--top-k", "2"]) == 0
    out, err = capsys.readouterr()
    assert "red.png" in out and "skipped" in err and "resnetlab: error" not in err


def test_finetune_has_the_shared_training_options() -> None:
    """Spelled as in `resnetlab train`: --no-progress, --num-workers, --amp, ... (friction 7)."""
    from resnetlab.cli.main import build_parser

    parser = build_parser(["train", "finetune"])
    sub = next(a for a in parser._actions if a.dest == "command").choices
    train_flags = {o for a in sub["train"]._actions for o in a.option_strings}
    finetune_flags = {o for a in sub["finetune"]._actions for o in a.option_strings}
    assert {"--no-progress", "--num-workers", "--amp", "--device", "--seed", "--set", "--compile"} <= finetune_flags
    only_train = train_flags - finetune_flags
    assert only_train == {"--pretrained", "--auto-resume"}, only_train  # finetune names its weights with --from


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="needs Linux permissions (and setpriv when run as root)")
def test_read_only_run_dir_is_refused_at_start_up(tmp_path) -> None:
    """As root every folder is writable, so the process gives up the capability that allows it (setpriv)."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot make a folder read-only for this process")
        drop = "-dac_override,-dac_read_search"
        prefix = [setpriv, f"--bounding-set={drop}", f"--inh-caps={drop}"]
    code = "import sys; from resnetlab.cli.main import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run([*prefix, sys.executable, "-c", code, "train", "--run-dir", str(read_only / "run")],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 1
    assert_one_error_line(result.stderr, "ro is not writable")
    assert not (read_only / "run").exists()


SLOW = pytest.mark.slow  # each of these imports torch in a new process: ~5 s on a busy machine
SUBPROCESS_CASES = [
    pytest.param(["train", "--label-smoothing", "5"], "label_smoothing", marks=SLOW),
    pytest.param(["train", "--set", "amp=maybe"], "amp='maybe'", marks=SLOW),
    pytest.param(["predict", "--from", "{model}", "{image}", "--top-k", "-1"], "--top-k", marks=SLOW),
    pytest.param(["benchmark", "--batch", "0"], "--batch", marks=SLOW),
    pytest.param(["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize(("argv", "expected"), SUBPROCESS_CASES)
def test_no_traceback_reaches_the_terminal(argv, expected, places) -> None:
    result = subprocess.run([sys.executable, "-m", "resnetlab.cli.main", *_fill(argv, places)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode in (1, 2)
    assert_one_error_line(result.stderr, expected)


def test_help_and_version_do_not_import_torch() -> None:
    """Friction 6: `resnetlab --help` imported torch._dynamo (2.7 s), `models` built every network (6 s)."""
    code = (
        "import contextlib, io, sys\n"
        "from resnetlab.cli.main import main\n"
        "for argv in (['--help'], ['--version'], ['models'], ['models', '--json', 'resnet5*']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "        assert main(argv) == 0, argv\n"
        "    assert out.getvalue(), argv\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'numpy')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_version(capsys) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"resnetlab {resnetlab.__version__}"


def test_help_lists_every_command(capsys) -> None:
    from resnetlab.cli.main import COMMANDS

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"    {name}" in out for name in COMMANDS)
    assert main(["train", "--help"]) == 0
    assert "--label-smoothing" in capsys.readouterr().out


@pytest.mark.skipif(sys.platform != "linux", reason="file names of arbitrary bytes are a Linux thing")
def test_predict_a_folder_with_a_file_name_that_is_not_utf8(places, tmp_path, capsys) -> None:
    """Printing the name crashed half-way and left a partial CSV: names are shown with \\x escapes, the CSV
    is written whole."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(places["image"], folder / "plain.png")
    shutil.copy(places["image"], os.fsdecode(os.fsencode(folder) + b"/caf\xe9.png"))
    out = tmp_path / "p.csv"
    assert main(["predict", "--from", places["model"], str(folder), "--csv", str(out), "--top-k", "1"]) == 0
    printed = capsys.readouterr().out
    assert "caf\\xe9.png" in printed and "plain.png" in printed
    rows = out.read_text().splitlines()
    assert len(rows) == 3 and any("caf\\xe9.png" in row for row in rows)
