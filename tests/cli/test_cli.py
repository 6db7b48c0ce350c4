"""`hf-gradtools plot` and `summary` on the snapshot folder of a real (tiny) GradTrainer run."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification

from hf_gradtools import GradTrainer, GradTrainingArguments, load_grad_snapshots
from hf_gradtools.cli import main
from hf_gradtools.plotting import combine_norms, group_norm_series, group_norms, parameter_group

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class _Batches(Dataset):
    def __init__(self, n: int, vocab: int, length: int = 8):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, vocab, (n, length), generator=generator)
        self.labels = torch.randint(0, 2, (n,), generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    """Four optimizer steps of a 3-layer BERT, embeddings and layer 0 frozen, a snapshot every step."""
    out = str(tmp_path_factory.mktemp("run"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)  # fmt: skip
    args = GradTrainingArguments(
        out, freeze_embeddings=True, freeze_first_n_layers=1, grad_snapshot_steps=1, max_steps=4,
        per_device_train_batch_size=4, max_grad_norm=1.0, save_strategy="no", report_to="none", disable_tqdm=True,
    )  # fmt: skip
    GradTrainer(model=BertForSequenceClassification(config), args=args, train_dataset=_Batches(16, 40)).train()
    return out


def _description(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "frozen_parameters.json"), encoding="utf-8") as f:
        return json.load(f)


def test_groups_follow_the_layer_stack_and_skip_frozen_groups(run_dir):
    description = _description(run_dir)
    snapshots = load_grad_snapshots(run_dir)
    groups = group_norms(snapshots[-1], description)
    # Embeddings and layer 0 are frozen: no gradient, no group.
    assert list(groups) == ["layer.1", "layer.2", "head"]
    norms = snapshots[-1]["norms"]
    layer1 = [v for name, v in norms.items() if name.startswith("bert.encoder.layer.1.")]
    assert len(layer1) == 16
    assert groups["layer.1"] == pytest.approx(math.sqrt(sum(v * v for v in layer1)))
    head = [v for name, v in norms.items() if name.startswith(("bert.pooler.", "classifier."))]
    assert groups["head"] == pytest.approx(math.sqrt(sum(v * v for v in head)))
    # The groups partition the parameters, so they combine into the snapshot's total.
    assert combine_norms(groups.values(), 2) == pytest.approx(snapshots[-1]["total_norm_pre_clip"], rel=1e-5)

    steps, series = group_norm_series(snapshots, description)
    assert steps == [1, 2, 3, 4] and all(len(v) == 4 for v in series.values())


def test_parameter_group_and_norm_types():
    embeddings = ["bert.embeddings"]
    assert parameter_group("bert.embeddings.word_embeddings.weight", "bert.encoder.layer", embeddings) == "embeddings"
    assert parameter_group("bert.encoder.layer.11.output.dense.bias", "bert.encoder.layer", embeddings) == "layer.11"
    assert parameter_group("bert.encoder.layer_norm.weight", "bert.encoder.layer", embeddings) == "head"
    assert parameter_group("classifier.weight", None, []) == "head"
    # 1-norm: 1 + 2 + 2 = 5; 3-norm: (1 + 8 + 8) ** (1/3); inf: the largest.
    assert combine_norms([1.0, 2.0, 2.0], 1) == pytest.approx(5.0)
    assert combine_norms([1.0, 2.0, 2.0], 3.0) == pytest.approx(17 ** (1 / 3))
    assert combine_norms([1.0, 2.0, 2.0], "inf") == 2.0
    snapshot = {"step": 1, "norm_type": "inf", "norms": {"m.layers.0.w": 3.0, "m.layers.0.b": 7.0, "head.w": 1.0}}
    assert group_norms(snapshot, {"layer_stack": "m.layers", "embeddings": []}) == {"layer.0": 7.0, "head": 1.0}


def test_plot_writes_a_png(run_dir, capsys):
    assert main(["plot", run_dir]) == 0
    path = os.path.join(run_dir, "grad_norms.png")
    assert capsys.readouterr().out.strip() == f"wrote {path}"
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 600
    # Not blank: the lines put many distinct colours on the canvas.
    assert len({tuple(px) for px in image.reshape(-1, image.shape[2])[::37].tolist()}) > 20


def test_plot_to_another_file_and_from_the_snapshot_folder(run_dir, tmp_path):
    target = tmp_path / "plots" / "norms.png"
    assert main(["plot", os.path.join(run_dir, "grad_snapshots"), "--output", str(target)]) == 0
    assert target.read_bytes()[:8] == PNG_SIGNATURE


def test_summary_prints_counts_and_largest_norms(run_dir, capsys):
    assert main(["summary", run_dir, "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    description = _description(run_dir)
    assert lines[0].startswith(
        f"frozen: {len(description['frozen'])} tensors, {description['num_frozen']:,} elements; "
        f"trainable: {len(description['trainable'])} tensors, {description['num_trainable']:,} elements"
    )
    assert "fully frozen groups: embeddings, layer.0" in lines[1]
    assert "snapshots: 4 (steps 1 to 4), norm type 2" in lines[2]
    assert (
        lines[4] == f"largest gradient norms in the last snapshot (step 4), top 3 of {len(description['trainable'])}:"
    )
    last = load_grad_snapshots(run_dir)[-1]["norms"]
    top = sorted(last.items(), key=lambda item: item[1], reverse=True)[:3]
    listed = [line.split() for line in lines[5:]]
    assert [row[2] for row in listed] == [name for name, _ in top]
    assert [float(row[1]) for row in listed] == pytest.approx([v for _, v in top], rel=1e-3)


def test_summary_mean_over_snapshots(run_dir, capsys):
    assert main(["summary", run_dir, "--top", "1", "--mean"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[4].startswith("largest gradient norms, averaged over all 4 snapshots, top 1 of")
    snapshots = load_grad_snapshots(run_dir)
    names = snapshots[0]["norms"]
    means = {n: sum(s["norms"][n] for s in snapshots) / 4 for n in names}
    name, value = max(means.items(), key=lambda item: item[1])
    assert out[5].split()[2] == name and float(out[5].split()[1]) == pytest.approx(value, rel=1e-3)


@pytest.mark.parametrize("command", ["plot", "summary"])
def test_a_folder_without_a_run_is_one_line_and_exit_1(tmp_path, capsys, command):
    assert main([command, str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-gradtools: error: No frozen_parameters.json in")

    (tmp_path / "frozen_parameters.json").write_text(json.dumps({"frozen": [], "trainable": []}))
    assert main([command, str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No gradient snapshot" in err[0] and "--grad_snapshot_steps" in err[0]

    assert main([command, str(tmp_path / "missing")]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_bad_usage_exits_2(run_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["summary", run_dir, "--top", "0"])
    assert exit_info.value.code == 2
    assert "must be a positive integer, got '0'" in capsys.readouterr().err


def test_python_dash_m(run_dir):
    result = subprocess.run(
        [sys.executable, "-m", "hf_gradtools", "summary", run_dir, "--top", "2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("frozen: ") and "top 2 of" in result.stdout


# ---- clip coefficient, skipped steps, --params and hist, on a run folder written by hand ----

TENSOR_NAMES = ["enc.layer.1.w", "head.w"]


@pytest.fixture
def hand_run(tmp_path) -> str:
    """Four snapshots (step 3 skipped for a NaN) and gradient tensors at steps 2 and 4."""
    from hf_gradtools.snapshots.tensors import GradTensorCopy

    run = tmp_path / "run"
    (run / "grad_snapshots").mkdir(parents=True)
    description = {"frozen": ["emb.w", "enc.layer.0.w"], "trainable": ["enc.layer.1.w", "head.w"],
                   "num_frozen": 8, "num_trainable": 6, "layer_stack": "enc.layer", "embeddings": ["emb"]}  # fmt: skip
    (run / "frozen_parameters.json").write_text(json.dumps(description))
    totals = {1: (2.0, 1.0), 2: (0.5, 0.5), 3: (math.nan, math.nan), 4: (4.0, 1.0)}
    for step, (pre, post) in totals.items():
        snapshot = {"step": step, "norm_type": 2.0, "total_norm_pre_clip": pre, "total_norm_post_clip": post,
                    "norms": {"enc.layer.1.w": pre * 0.6, "head.w": pre * 0.8}}  # fmt: skip
        if step == 3:
            snapshot["skipped"] = True
        (run / "grad_snapshots" / f"step-{step:08d}.json").write_text(json.dumps(snapshot))
    for step in (2, 4):
        values = torch.arange(12, dtype=torch.float32).reshape(3, 4) - 5.5 * step
        GradTensorCopy(step, {"enc.layer.1.w": values, "head.w": torch.tensor([1.0, math.nan, -2.0])}).write_to_run(
            run
        )
    return str(run)


def test_total_norm_panel_marks_clip_coefficient_and_skipped_steps(hand_run):
    from hf_gradtools.plotting import clip_coefficients, draw_grad_norms, load_run, skipped_steps

    description, snapshots = load_run(hand_run)
    coefficients = clip_coefficients(snapshots)
    assert coefficients[:2] + coefficients[3:] == [0.5, 1.0, 0.25] and math.isnan(coefficients[2])
    assert skipped_steps(snapshots) == [3]
    fig = draw_grad_norms(description, snapshots)
    top, bottom, coef_axis = fig.axes
    assert [line.get_label() for line in top.lines if not line.get_label().startswith("skipped")] == [
        "layer.1",
        "head",
    ]
    (coef_line,) = coef_axis.lines
    assert coef_line.get_label() == "clip coefficient"
    assert list(coef_line.get_xdata()) == [1, 2, 3, 4]
    ydata = list(coef_line.get_ydata())
    assert ydata[:2] + ydata[3:] == [0.5, 1.0, 0.25] and math.isnan(ydata[2])
    for ax in (top, bottom):
        marks = [line for line in ax.lines if list(line.get_xdata()) == [3, 3]]
        assert len(marks) == 1 and marks[0].get_color() == "tab:red"
    assert {line.get_label() for line in bottom.lines} >= {"total, before clipping", "total, after clipping"}


def test_plot_params_draws_the_chosen_parameters(hand_run, capsys):
    from hf_gradtools.plotting import draw_grad_norms, load_run

    fig = draw_grad_norms(*load_run(hand_run), params=[r"^head\."])
    (line,) = [line for line in fig.axes[0].lines if line.get_label() == "head.w"]
    ydata = list(line.get_ydata())
    assert ydata[:2] + ydata[3:] == pytest.approx([1.6, 0.4, 3.2]) and math.isnan(ydata[2])
    assert [line.get_label() for line in fig.axes[0].lines][0] == "head.w"

    out = os.path.join(hand_run, "params.png")
    assert main(["plot", hand_run, "--params", "layer", "--params", "^head", "-o", out]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    with open(out, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE

    assert main(["plot", hand_run, "--params", "nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "hf-gradtools: error: `--params` pattern 'nope' matches no parameter; parameter names look like: "
        "'enc.layer.1.w', 'head.w'."
    ]


def test_hist_draws_a_saved_tensor(hand_run, capsys):
    from hf_gradtools.plotting import draw_grad_histogram
    from hf_gradtools.snapshots.tensors import load_grad_tensors

    assert main(["hist", hand_run, "--step", "2", "--param", "enc.layer.1.w", "--bins", "6"]) == 0
    path = os.path.join(hand_run, "grad_hist_step-00000002_enc.layer.1.w.png")
    assert capsys.readouterr().out.strip() == f"wrote {path}"
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE

    # The last step by default; the NaN is counted, not drawn.
    assert main(["hist", hand_run, "--param", "head.w"]) == 0
    assert capsys.readouterr().out.strip().endswith("grad_hist_step-00000004_head.w.png")
    fig = draw_grad_histogram(load_grad_tensors(hand_run, step=4)["head.w"], "head.w", 4, bins=3)
    (ax,) = fig.axes
    assert sum(patch.get_height() for patch in ax.patches) == 2
    assert ax.get_title() == (
        "Gradient of head.w at step 4\n3 elements, mean -0.5, std 2.12, max |g| 2, L2 norm 2.24, 1 non-finite"
    )


def test_hist_errors_are_one_line(hand_run, tmp_path, capsys):
    assert main(["hist", hand_run, "--step", "2", "--param", "head.x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "hf-gradtools: error: `--param` 'head.x' was not saved at step 2; saved: 'enc.layer.1.w', 'head.w'."
    ]
    assert main(["hist", hand_run, "--step", "3", "--param", "head.w"]) == 1
    assert "(steps with tensors: 2, 4)" in capsys.readouterr().err
    assert main(["hist", str(tmp_path), "--param", "head.w"]) == 1
    assert "No saved gradient tensors in" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["hist", hand_run])
    assert exit_info.value.code == 2 and "--param" in capsys.readouterr().err


def test_version(capsys):
    import hf_gradtools

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"hf-gradtools {hf_gradtools.__version__}"


def _with_results(run_dir: str, folder, results: dict) -> str:
    copy = str(folder / "run")
    shutil.copytree(run_dir, copy)
    with open(os.path.join(copy, "all_results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f)
    with open(os.path.join(copy, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"id2label": {"0": "not_equivalent", "1": "equivalent"}}, f)
    return copy


def test_summary_flags_a_run_that_predicts_one_class(run_dir, tmp_path, capsys):
    results = {"eval_accuracy": 0.684, "eval_top_class": 1, "eval_top_class_share": 1.0, "eval_samples": 408}
    assert main(["summary", _with_results(run_dir, tmp_path, results)]) == 0
    lines = capsys.readouterr().out.splitlines()
    flagged = [line for line in lines if "DEGENERATE" in line]
    assert flagged == [
        "DEGENERATE eval predictions: all 408 are class 1 'equivalent' (100%): the model answers one class"
    ]


def test_summary_shows_the_most_predicted_class_of_a_healthy_run(run_dir, tmp_path, capsys):
    results = {"eval_top_class": 0, "eval_top_class_share": 0.5417, "eval_samples": 408}
    assert main(["summary", _with_results(run_dir, tmp_path, results)]) == 0
    out = capsys.readouterr().out
    assert "DEGENERATE" not in out
    assert "eval predictions: most often class 0 'not_equivalent' (54.2%)" in out.splitlines()
    # A run without result files (GradTrainer alone) shows no prediction line.
    assert main(["summary", run_dir]) == 0
    assert "predictions" not in capsys.readouterr().out


def _with_noise_scale(folder, values: dict[int, float]) -> None:
    """A `trainer_state.json` as `trainer.save_state()` writes it, logging `grad_noise_scale` at `values`' steps."""
    history = [{"step": step, "loss": 0.7, "learning_rate": 1e-4, "grad_noise_scale": value, "epoch": step / 8}
               for step, value in values.items()]  # fmt: skip
    history.insert(2, {"step": 3, "eval_loss": 0.6, "epoch": 0.4})  # an eval entry: no noise scale
    history.append({"step": 8, "train_runtime": 1.0, "train_loss": 0.65, "epoch": 1.0})
    state = {"global_step": 8, "max_steps": 8, "train_batch_size": 4, "log_history": history}
    (folder / "trainer_state.json").write_text(json.dumps(state))


def test_plot_draws_the_logged_noise_scale(hand_run, tmp_path, capsys):
    from hf_gradtools.plotting import draw_grad_noise_scale, noise_scale_series

    logged = {2: -3.5, 4: 40.0, 6: 25.0, 8: 31.25}
    _with_noise_scale(tmp_path / "run", logged)
    steps, values = noise_scale_series(hand_run)
    assert (steps, values) == ([2, 4, 6, 8], [-3.5, 40.0, 25.0, 31.25])

    assert main(["plot", hand_run]) == 0
    norms, noise = os.path.join(hand_run, "grad_norms.png"), os.path.join(hand_run, "grad_noise_scale.png")
    assert capsys.readouterr().out.splitlines() == [f"wrote {norms}", f"wrote {noise}"]
    with open(noise, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    # The drawn line holds the logged values at the logged steps; a negative early value adds a zero line.
    (ax,) = draw_grad_noise_scale(steps, values).axes
    (line,) = [line for line in ax.lines if line.get_label() == "grad_noise_scale"]
    assert list(line.get_xdata()) == [2, 4, 6, 8] and list(line.get_ydata()) == [-3.5, 40.0, 25.0, 31.25]
    assert ax.get_yscale() == "linear" and "4 logging steps; last 31.2" in ax.get_title()

    # --output elsewhere: the noise figure goes beside it, under its name.
    target = tmp_path / "plots" / "norms.png"
    assert main(["plot", hand_run, "-o", str(target)]) == 0
    assert (tmp_path / "plots" / "norms_noise_scale.png").read_bytes()[:8] == PNG_SIGNATURE
    capsys.readouterr()
    for bad, said in ((tmp_path / "plots" / "norms.jpg", "ending in .png"), (tmp_path / "plots.png", "is a folder")):
        if said == "is a folder":
            bad.mkdir()
        assert main(["plot", hand_run, "-o", str(bad)]) == 1
        assert said in capsys.readouterr().err

    # Logged but no snapshots: the noise figure alone, and a note.
    shutil.rmtree(os.path.join(hand_run, "grad_snapshots"))
    os.remove(noise)
    assert main(["plot", hand_run]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"wrote {noise}" and os.path.isfile(noise)
    assert captured.err.startswith("hf-gradtools: note: no gradient-norm plot: No gradient snapshot")


def test_plot_without_a_logged_noise_scale_draws_no_noise_figure(hand_run, tmp_path, capsys):
    from hf_gradtools.plotting import noise_scale_series

    # A trainer_state.json without the value (log_grad_noise_scale off): only grad_norms.png, as before.
    (tmp_path / "run" / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 1, "loss": 0.7}]}))
    assert noise_scale_series(hand_run) == ([], [])
    assert main(["plot", hand_run]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {os.path.join(hand_run, 'grad_norms.png')}"
    assert not os.path.exists(os.path.join(hand_run, "grad_noise_scale.png"))


def test_summary_of_a_run_without_gradient_record_still_flags_one_class(tmp_path, capsys):
    """Every field at its default writes no file of GradTrainer's own; the predictions are still reported."""
    with open(tmp_path / "all_results.json", "w", encoding="utf-8") as f:
        json.dump({"eval_top_class": 1, "eval_top_class_share": 1.0, "eval_samples": 408}, f)
    assert main(["summary", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "DEGENERATE eval predictions: all 408 are class 1 (100%): the model answers one class"
    assert lines[1].startswith("no gradient record: No frozen_parameters.json in")
    assert "grad_snapshot_steps" in lines[1]


# ---- the effective batch on the noise-scale figure ----


def _training_args_file(folder, **fields) -> None:
    """`training_args.bin` as the Trainer's `save_model` writes it: `torch.save` of its arguments."""
    from transformers import TrainingArguments

    args = TrainingArguments(str(folder), report_to="none", use_cpu=True, **fields)
    torch.save(args, folder / "training_args.bin")


def test_noise_scale_figure_draws_the_effective_batch(hand_run, tmp_path, monkeypatch, capsys):
    from hf_gradtools import plotting
    from hf_gradtools.plotting import EffectiveBatch, effective_batch

    run = tmp_path / "run"
    _with_noise_scale(run, {2: 10.0, 4: 40.0, 6: 25.0, 8: 31.25})  # train_batch_size 4
    assert effective_batch(hand_run) is None  # no training_args.bin: no line
    _training_args_file(run, per_device_train_batch_size=4, gradient_accumulation_steps=3)
    assert effective_batch(hand_run) == EffectiveBatch(per_process=4, accumulation=3, processes=1)

    figures = []
    monkeypatch.setattr(plotting, "_save", lambda fig, output, folder, name: figures.append(fig) or name)
    assert main(["plot", hand_run]) == 0
    (ax,) = figures[-1].axes
    (line,) = [line for line in ax.lines if line.get_label().startswith("effective batch")]
    assert line.get_label() == "effective batch 12 samples (4 x 3 accumulation x 1 process)"
    assert list(line.get_ydata()) == [12, 12]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["grad_noise_scale", line.get_label()]
    capsys.readouterr()


def test_training_args_are_read_without_unpickling(tmp_path):
    """A pickle that would run code when loaded: its fields are read, its code is not run."""
    import pickle

    from hf_gradtools.run_folder import training_args_fields

    marker = tmp_path / "code-ran"

    class RunsCode:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    data = pickle.dumps({"gradient_accumulation_steps": 3, "num_processes": 2, "payload": RunsCode()})
    (tmp_path / "training_args.bin").write_bytes(data)
    fields = training_args_fields(tmp_path, ["gradient_accumulation_steps", "num_processes"])
    assert fields == {"gradient_accumulation_steps": 3, "num_processes": 2} and not marker.exists()
    pickle.loads(data)  # what unpickling would have done
    assert marker.exists()
    (tmp_path / "training_args.bin").write_bytes(b"\x80\x04garbage")
    assert training_args_fields(tmp_path, ["num_processes"]) == {}


# ---- damaged and foreign files: one line on stderr, exit 1, the file named ----


def _safetensors_damage(kind: str):
    def damage(good: bytes) -> bytes:
        header = int.from_bytes(good[:8], "little")
        return {
            "header too large": (2**40).to_bytes(8, "little") + good[8:],
            "incomplete metadata": good[: 8 + header // 2],
            "truncated": good[:-4],
            "not safetensors": b'{"a": 1}',
            "empty": b"",
        }[kind]

    return damage


DAMAGED_TENSORS = ["header too large", "incomplete metadata", "truncated", "not safetensors", "empty"]


@pytest.mark.parametrize("kind", DAMAGED_TENSORS)
def test_a_damaged_tensor_file_is_one_line(hand_run, capsys, kind):
    path = os.path.join(hand_run, "grad_snapshots", "step-00000004.safetensors")
    with open(path, "rb") as f:
        good = f.read()
    with open(path, "wb") as f:
        f.write(_safetensors_damage(kind)(good))
    for command in (["hist", hand_run, "--param", "head.w"], ["hist", hand_run, "--param", "head.w", "--step", "4"]):
        assert main(command) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"hf-gradtools: error: {path!r} is not a readable gradient")


DAMAGED_RUN_FILES = {
    "frozen list": ("frozen_parameters.json", "[1, 2]", "plot", "is not a record of frozen parameters: a JSON list"),
    "frozen counts": (
        "frozen_parameters.json",
        '{"frozen": [], "trainable": [], "num_frozen": "x", "num_trainable": 1}',
        "summary",
        "`num_frozen` is 'x', not a count of elements",
    ),
    "frozen count too large for a float": (
        "frozen_parameters.json",
        f'{{"frozen": [], "trainable": [], "num_frozen": {10**400}, "num_trainable": 1}}',
        "summary",
        "`num_frozen` is 1000",
    ),
    "frozen folder": ("frozen_parameters.json", None, "summary", "is not a file"),
    "frozen not UTF-8": ("frozen_parameters.json", b"\xff\xfe", "summary", "is not UTF-8 text"),
    "state: noise not a number": (
        "trainer_state.json",
        '{"log_history": [{"step": 2, "grad_noise_scale": "x"}]}',
        "plot",
        "logs grad_noise_scale 'x' at step 2",
    ),
    "state: step infinite": (
        "trainer_state.json",
        '{"log_history": [{"step": Infinity, "grad_noise_scale": 1.0}]}',
        "plot",
        "at step inf",
    ),
    "state: noise too large for a float": (
        "trainer_state.json",
        f'{{"log_history": [{{"step": 2, "grad_noise_scale": {10**400}}}]}}',
        "plot",
        "logs grad_noise_scale 1000",
    ),
    "state: batch too large for a float": (
        "trainer_state.json",
        f'{{"train_batch_size": {10**400}, "log_history": [{{"step": 2, "grad_noise_scale": 1.0}}]}}',
        "plot",
        "`train_batch_size` is 1000",
    ),
    "state: log history not a list": (
        "trainer_state.json",
        '{"log_history": "x"}',
        "plot",
        "`log_history` is 'x', not a list of log entries",
    ),
    "state: log entry not an object": (
        "trainer_state.json",
        '{"log_history": [{"step": 2, "loss": 0.5}, 7]}',
        "plot",
        "`log_history[1]` is 7, not a log entry",
    ),
    "state not an object": ("trainer_state.json", "[]", "plot", "is not a trainer state"),
    "results: class infinite": (
        "all_results.json",
        '{"eval_top_class": Infinity, "eval_top_class_share": 1.0}',
        "summary",
        None,
    ),
    "results: share too large for a float": (
        "all_results.json",
        f'{{"eval_top_class": 1, "eval_top_class_share": {10**400}}}',
        "summary",
        None,
    ),
    "results not an object": ("all_results.json", "[1]", "summary", "is a JSON list, not an object"),
    "config: id2label a list": ("config.json", '{"id2label": ["a", "b"]}', "summary", None),
}


@pytest.mark.parametrize("case", DAMAGED_RUN_FILES.values(), ids=DAMAGED_RUN_FILES.keys())
def test_a_damaged_or_foreign_run_file_is_one_line_and_exit_1(hand_run, capsys, case):
    name, content, command, message = case
    with open(os.path.join(hand_run, "all_results.json"), "w", encoding="utf-8") as f:
        json.dump({"eval_top_class": 1, "eval_top_class_share": 0.6}, f)  # a share to name the class of
    path = os.path.join(hand_run, name)
    if content is None:
        os.remove(path)
        os.mkdir(path)
    else:
        with open(path, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
    status = main([command, hand_run])
    err = capsys.readouterr().err.strip().splitlines()
    if message is None:  # a value the summary cannot use is passed over, as a missing one is
        assert status == 0 and err == []
        return
    assert status == 1 and len(err) == 1
    assert err[0].startswith(f"hf-gradtools: error: {path!r}") and message in err[0]
    assert [f for f in os.listdir(hand_run) if f.endswith(".png")] == []  # every input is checked before any PNG


def test_summary_of_a_run_that_froze_without_snapshots_gives_its_counts(tmp_path, capsys):
    """`frozen_parameters.json` holds the counts (a run that froze, `grad_snapshot_steps` 0): they are printed, and
    the missing snapshots said after them; exit 0."""
    record = {"frozen": ["embeddings.weight"], "num_frozen": 6400, "trainable": ["classifier.weight"],
              "num_trainable": 130, "layer_stack": "bert.encoder.layer", "embeddings": ["embeddings"]}  # fmt: skip
    (tmp_path / "frozen_parameters.json").write_text(json.dumps(record))
    assert main(["summary", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "frozen: 1 tensors, 6,400 elements; trainable: 1 tensors, 130 elements (2.0% of 6,530)"
    assert lines[1].startswith("layer stack: bert.encoder.layer; embeddings: embeddings")
    assert lines[-1].startswith("no gradient record: No gradient snapshot in")
