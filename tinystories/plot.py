"""Loss curves of one or more runs as a PNG: the `tinystories plot` command.

    tinystories plot out/run                          # writes out/run/loss.png
    tinystories plot out/run-a out/run-b --out cmp.png

Top panel: the training loss of every step (faint) with a smoothed line over it, and the val (and
test) loss at each evaluation, against tokens seen. Bottom panel: the learning rate. Runs are
overlaid, one colour each, labelled by their folder name. Everything comes from each RUN_DIR's
`log.jsonl` (one JSON object per optimizer step) and `config.json` (for the tokenizer).

Losses are in nats per token of the run's tokenizer, so the y label names it; runs trained with
different tokenizers are not comparable token for token (bits per byte are, see `evaluate`), and
the label says so. matplotlib is an optional dependency (`pip install 'tinystories[plot]'`); the
figure is drawn with the Agg backend, so no display is needed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from tinystories.errors import UserError

LOG = "log.jsonl"
CONFIG = "config.json"


# -----------------------------------------------------------------------------
# Reading a run


@dataclass
class RunLog:
    """The curves of one run, each as parallel lists of x (tokens seen) and y."""

    path: Path
    label: str
    tokenizer: str | None
    tokens: list[float] = field(default_factory=list)  # x of loss and lr: one entry per logged step
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    evals: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)  # split -> (tokens, loss)


def read_run(run_dir) -> RunLog:
    """Read RUN_DIR/log.jsonl (and the tokenizer name from config.json) into a RunLog.

    A last line cut short (the run is still writing it) is skipped; any other bad line is an error.
    """
    run_dir = Path(run_dir)
    log = run_dir / LOG
    if not log.is_file():
        if not run_dir.exists():
            raise UserError(f"run folder {run_dir} does not exist")
        raise UserError(f"{run_dir} has no {LOG}: is it a run folder made by `tinystories train`?")
    run = RunLog(path=run_dir, label=Path(run_dir.resolve()).name, tokenizer=_tokenizer_name(run_dir))
    lines = log.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            tokens = float(record["tokens"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if number == len(lines):
                continue  # a run in progress may be halfway through writing its last line
            raise UserError(f"{log} line {number} is not a training record; is the file damaged?") from None
        if _finite(record.get("loss")):
            run.tokens.append(tokens)
            run.loss.append(float(record["loss"]))
            run.lr.append(float(record["lr"]) if _finite(record.get("lr")) else math.nan)
        for key, value in record.items():
            if key.endswith("_loss") and _finite(value):
                xs, ys = run.evals.setdefault(key.removesuffix("_loss"), ([], []))
                xs.append(tokens)
                ys.append(float(value))
    if not run.tokens:
        raise UserError(f"{log} has no training steps yet; plot it once the run has logged some")
    return run


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _tokenizer_name(run_dir: Path) -> str | None:
    try:
        config = json.loads((run_dir / CONFIG).read_text(encoding="utf-8"))
        return config["data"]["tokenizer"]["name"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None  # an older or hand-made run: the plot just does not name the tokenizer


def unique_labels(paths: list[Path]) -> list[str]:
    """Folder names; a name two runs share is lengthened with parent folders until it is unique."""
    parts = [Path(p).resolve().parts for p in paths]
    depths = [1] * len(parts)
    while True:
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depths)]
        clashing = [i for i, label in enumerate(labels) if labels.count(label) > 1 and depths[i] < len(parts[i])]
        if not clashing:
            return labels
        for i in clashing:
            depths[i] += 1


# -----------------------------------------------------------------------------
# Pure helpers


def smooth(values: list[float], span: float) -> list[float]:
    """Exponential moving average over about `span` points, debiased so it starts at values[0].

    Without the debiasing (TensorBoard does the same) the first points would be pulled towards 0.
    """
    if span <= 1:
        return list(values)
    alpha = 2.0 / (span + 1.0)
    out, average, weight = [], 0.0, 0.0
    for v in values:
        average = (1 - alpha) * average + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(average / weight)
    return out


def format_tokens(x: float, _pos=None) -> str:
    """Tick labels for token counts: 0, 500, 12K, 1.5M, 2B."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= size:
            return f"{x / size:.3g}{suffix}"
    return f"{x:.3g}"


def loss_ylabel(tokenizers: list[str | None]) -> str:
    names = sorted({t for t in tokenizers if t})
    if len(names) == 1:
        return f"loss (nats/token, {names[0]})"
    if len(names) > 1:
        return "loss (nats/token; tokenizers differ: compare bits/byte instead)"
    return "loss (nats/token)"


def loss_ylim(runs: list[RunLog]) -> tuple[float, float]:
    """A y range that shows the part of training worth reading.

    The first steps sit at ln(vocab_size) (≈8.3 for 4,096 tokens) and would squash everything
    after them; the top is set by the smoothed loss 3 % of the way into each run, or the
    highest eval loss after that point, whichever is higher, so late evals are never cut off.
    """
    low, high = math.inf, -math.inf
    for run in runs:
        smoothed = smooth(run.loss, _span(run))
        low = min(low, min(run.loss), *(min(ys) for _, ys in run.evals.values()))
        at = min(len(run.tokens) - 1, (3 * len(run.tokens)) // 100)
        cut = run.tokens[at]
        high = max(high, smoothed[at])
        for xs, ys in run.evals.values():
            high = max(high, *(y for x, y in zip(xs, ys) if x >= cut), -math.inf)
    if not math.isfinite(high) or high <= low:
        high = low + 1.0
    margin = 0.05 * (high - low)
    return low - margin, high + margin


def _span(run: RunLog) -> float:
    return max(1.0, len(run.loss) / 30)  # about 30 independent points across the run


# -----------------------------------------------------------------------------
# Drawing


EVAL_STYLE = {  # split -> how its points are drawn
    "val": dict(marker="o", linestyle="--", markersize=4.5, linewidth=1.2),
    "test": dict(marker="^", linestyle=":", markersize=4.5, linewidth=1.2),
}


def draw(runs: list[RunLog]):
    """A matplotlib Figure of the runs: loss above, learning rate below, sharing the tokens axis."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise UserError(
            "tinystories plot needs matplotlib: pip install 'tinystories[plot]' (or pip install matplotlib)"
        ) from None

    # A Figure with its own Agg canvas, not pyplot: no display, no global state.
    fig = Figure(figsize=(9, 6.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    colors = [f"C{i % 10}" for i in range(len(runs))]

    for run, color in zip(runs, colors):
        ax_loss.plot(run.tokens, run.loss, color=color, alpha=0.22, linewidth=0.8)
        ax_loss.plot(run.tokens, smooth(run.loss, _span(run)), color=color, linewidth=1.8)
        for split, (xs, ys) in sorted(run.evals.items()):
            style = EVAL_STYLE.get(split, dict(marker="s", linestyle="-.", markersize=4, linewidth=1))
            ax_loss.plot(xs, ys, color=color, **style)
        ax_lr.plot(run.tokens, run.lr, color=color, linewidth=1.5)

    bottom, top = loss_ylim(runs)
    ax_loss.set_ylim(bottom, top)
    highest = max(max(r.loss) for r in runs)
    if highest > top:  # say what the cut hides, so nobody reads the first visible point as the start
        ax_loss.set_title(f"y axis cut at the top: the first steps reach {highest:.2f}", loc="right",
                          fontsize="small", color="0.4")
    ax_loss.set_ylabel(loss_ylabel([r.tokenizer for r in runs]))
    ax_loss.set_title("loss against tokens seen" + (f": {runs[0].label}" if len(runs) == 1 else ""), loc="left")
    ax_loss.grid(True, alpha=0.3)

    # Two legends: which colour is which run, and which line style is which curve.
    if len(runs) > 1:
        run_handles = [Line2D([], [], color=c, linewidth=2.5) for c in colors]
        legend = ax_loss.legend(run_handles, [r.label for r in runs], title="run", loc="upper right")
        ax_loss.add_artist(legend)
    splits = sorted({s for r in runs for s in r.evals})
    style_handles = [Line2D([], [], color="0.4", alpha=0.4, linewidth=0.8),
                     Line2D([], [], color="0.2", linewidth=1.8)]
    style_labels = ["train (each step)", "train (smoothed)"]
    for split in splits:
        style = EVAL_STYLE.get(split, dict(marker="s", linestyle="-."))
        style_handles.append(Line2D([], [], color="0.2", **style))
        style_labels.append(f"{split} (evaluation)")
    ax_loss.legend(style_handles, style_labels, loc="upper right" if len(runs) == 1 else "upper center",
                   fontsize="small")

    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("tokens seen")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_lr.xaxis.set_major_formatter(FuncFormatter(format_tokens))
    ax_lr.set_ylim(bottom=0)
    ax_lr.set_xlim(left=0)
    ax_lr.grid(True, alpha=0.3)
    return fig


def plot_runs(runs: list[RunLog], out) -> Path:
    """Draw the runs into the PNG file `out` (its folder is made if needed)."""
    from tinystories.outputs import write_file

    fig = draw(runs)
    # savefig picks the format from the name's suffix, so the temporary name is given it explicitly
    return write_file(out, None, write=lambda tmp: fig.savefig(tmp, format="png"))


# -----------------------------------------------------------------------------
# The command


def run(args) -> int:
    """`tinystories plot RUN_DIR [RUN_DIR ...] [--out FILE.png]`."""
    from tinystories.outputs import check_output_file

    if args.out is not None:  # checked first: reading the logs and drawing is work to waste
        if Path(args.out).suffix.lower() != ".png":
            raise UserError(f"--out {args.out} must end in .png")
        check_output_file(args.out, "--out")
    runs = [read_run(d) for d in args.run_dirs]
    for r, label in zip(runs, unique_labels([r.path for r in runs])):
        r.label = label
    out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "loss.png"
    if args.out is None:  # the default, inside the first run folder (which exists now)
        check_output_file(out, "the plot file")
    plot_runs(runs, out)
    for r in runs:
        last = {split: ys[-1] for split, (_, ys) in sorted(r.evals.items())}
        evals = "".join(f", {split} loss {y:.4f}" for split, y in last.items())
        print(f"{r.label}: {len(r.loss)} steps, {format_tokens(r.tokens[-1])} tokens{evals}")
    print(f"wrote {out}")
    return 0
