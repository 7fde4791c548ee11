"""`tinystories plot`: reading log.jsonl, the figure's curves, labels and legends, the PNG, the errors.

Most tests write run folders in the exact format `tinystories train` writes (config.json with
data.tokenizer, one log.jsonl record per step, val/test loss on evaluation steps); one trains a
real run for a few steps and plots it.
"""

import json
import math
import sys

import pytest

from tinystories.cli import main
from tinystories.errors import UserError
from tinystories.plot import (draw, format_tokens, loss_ylabel, loss_ylim, read_run, smooth,
                              unique_labels)

from conftest import run_cli

pytest.importorskip("matplotlib", reason="tinystories plot needs matplotlib (pip install 'tinystories[plot]')")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder, steps=200, tokens_per_step=4096, eval_every=50, tokenizer="bpe-4096", peak_lr=2e-3,
              start_loss=8.3, extra_lines=()):
    """A run folder as `tinystories train` leaves it: a loss falling from start_loss, evals, warmup + decay."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(
        {"preset": "tiny", "total_steps": steps, "data": {"tokenizer": {"name": tokenizer, "vocab_size": 4096}}}))
    lines = []
    for step in range(1, steps + 1):
        loss = 2.0 + (start_loss - 2.0) * math.exp(-step / 30) + 0.05 * math.sin(step)
        lr = peak_lr * min(1.0, step / 20) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        record = {"step": step, "tokens": step * tokens_per_step, "loss": round(loss, 6), "lr": lr,
                  "grad_norm": 1.0, "tokens_per_s": 1000.0}
        if step % eval_every == 0 or step == steps:
            record["val_loss"] = round(loss + 0.1, 6)
            record["test_loss"] = round(loss + 0.15, 6)
        lines.append(json.dumps(record))
    (folder / "log.jsonl").write_text("\n".join([*lines, *extra_lines]) + "\n")
    return folder


# -----------------------------------------------------------------------------
# Reading runs and the pure helpers


def test_read_run(tmp_path):
    run = read_run(write_run(tmp_path / "a", steps=120, eval_every=50))
    assert run.label == "a" and run.tokenizer == "bpe-4096"
    assert len(run.loss) == len(run.lr) == len(run.tokens) == 120 and run.tokens[0] == 4096
    assert run.evals["val"][0] == [50 * 4096, 100 * 4096, 120 * 4096]
    assert sorted(run.evals) == ["test", "val"]


def test_a_half_written_last_line_is_skipped_but_a_damaged_middle_is_an_error(tmp_path):
    run = read_run(write_run(tmp_path / "live", steps=10, extra_lines=['{"step": 11, "tok']))
    assert len(run.loss) == 10
    folder = write_run(tmp_path / "bad", steps=10)
    lines = (folder / "log.jsonl").read_text().splitlines()
    lines[4] = "garbage"
    (folder / "log.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="line 5 is not a training record"):
        read_run(folder)


def test_smooth():
    assert smooth([3.0] * 50, span=10) == pytest.approx([3.0] * 50)
    steps = smooth([1.0] * 5 + [0.0] * 100, span=5)
    assert steps[0] == 1.0  # debiased: starts at the first value, not pulled towards 0
    assert steps[6] < 0.6 and steps[-1] < 1e-6  # follows the change, then settles on it
    assert smooth([1.0, 2.0], span=1) == [1.0, 2.0]


def test_labels_and_formats(tmp_path):
    assert unique_labels([tmp_path / "x" / "run", tmp_path / "y" / "run", tmp_path / "z"]) == ["x/run", "y/run", "z"]
    assert [format_tokens(x) for x in (0, 512, 12_000, 1_500_000, 2e9)] == ["0", "512", "12K", "1.5M", "2B"]
    assert loss_ylabel(["gpt2", "gpt2"]) == "loss (nats/token, gpt2)"
    assert "tokenizers differ" in loss_ylabel(["gpt2", "bpe-4096"])
    assert loss_ylabel([None]) == "loss (nats/token)"


def test_y_range_skips_the_first_plunge_but_keeps_every_later_point(tmp_path):
    run = read_run(write_run(tmp_path / "a", steps=400, start_loss=8.3))
    low, high = loss_ylim([run])
    assert high < 8.0  # the ln(vocab) start would flatten the rest of the curve
    later = [y for x, y in zip(run.tokens, run.loss) if x >= run.tokens[len(run.tokens) // 10]]
    later += [y for xs, ys in run.evals.values() for x, y in zip(xs, ys) if x >= run.tokens[len(run.tokens) // 10]]
    assert low <= min(later) and max(later) <= high


# -----------------------------------------------------------------------------
# The figure


def test_figure_holds_both_curves_with_labelled_axes_and_legends(tmp_path):
    a = read_run(write_run(tmp_path / "lr-2e-3", steps=200))
    b = read_run(write_run(tmp_path / "lr-5e-4", steps=150, peak_lr=5e-4, start_loss=8.0))
    fig = draw([a, b])
    ax_loss, ax_lr = fig.axes
    assert ax_loss.get_ylabel() == "loss (nats/token, bpe-4096)"
    assert ax_lr.get_xlabel() == "tokens seen" and ax_lr.get_ylabel() == "learning rate"
    legend_texts = {t.get_text() for legend in ax_loss.findobj(lambda o: type(o).__name__ == "Legend")
                    for t in legend.get_texts()}
    assert {"lr-2e-3", "lr-5e-4", "train (each step)", "train (smoothed)", "val (evaluation)",
            "test (evaluation)"} <= legend_texts
    # per run: raw train, smoothed train, test, val on the loss panel; lr on the other
    lines = ax_loss.get_lines()
    assert len(lines) == 8 and len(ax_lr.get_lines()) == 2
    val_a = [line for line in lines if list(line.get_xdata()) == a.evals["val"][0]
             and list(line.get_ydata()) == a.evals["val"][1]]
    assert len(val_a) == 1 and val_a[0].get_marker() == "o"
    assert list(ax_lr.get_lines()[1].get_ydata()) == b.lr


def test_cli_writes_a_png_into_the_run_folder_by_default(tmp_path, capsys):
    run = write_run(tmp_path / "run", steps=60)
    assert main(["plot", str(run)]) == 0
    png = run / "loss.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000
    out = capsys.readouterr().out
    assert "run: 60 steps, 246K tokens, test loss" in out and f"wrote {png}" in out

    assert main(["plot", str(run), str(write_run(tmp_path / "other", steps=30)),
                 "--out", str(tmp_path / "figs" / "both.png")]) == 0
    assert (tmp_path / "figs" / "both.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "has no log.jsonl"),
    (lambda p: (p.mkdir(), (p / "log.jsonl").write_text("")), "has no training steps yet"),
])
def test_bad_run_folders_are_one_line_errors(tmp_path, capsys, setup, message):
    setup(tmp_path / "run")
    assert main(["plot", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_out_must_be_a_png(tmp_path, capsys):
    assert main(["plot", str(write_run(tmp_path / "run", steps=5)), "--out", str(tmp_path / "x.pdf")]) == 2
    assert "must end in .png" in capsys.readouterr().err


def test_without_matplotlib_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.lines",
                 "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` of a None entry raises ImportError
    with pytest.raises(UserError, match=r"pip install 'tinystories\[plot\]'"):
        draw([read_run(write_run(tmp_path / "run", steps=5))])


@pytest.mark.slow
def test_plot_of_a_real_training_run(tmp_path, small_data):
    run = tmp_path / "run"
    run_cli("train", "--data", small_data, "--out", run, "--preset", "tiny", "--n-layer", 1, "--n-embd", 32,
            "--n-head", 2, "--block-size", 32, "--batch-size", 4, "--max-steps", 12, "--eval-interval", 6,
            "--eval-tokens", 512, "--dtype", "fp32", check=True)
    result = run_cli("plot", run, check=True)
    assert "run: 12 steps" in result.stdout and "val loss" in result.stdout
    assert (run / "loss.png").read_bytes()[:8] == PNG_MAGIC
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    parsed = read_run(run)
    assert parsed.loss == [r["loss"] for r in logged] and parsed.tokenizer == "bpe-512"
    assert parsed.evals["val"][1] == [r["val_loss"] for r in logged if "val_loss" in r]
