"""Training curves: the run's log (``<output>/train_log.jsonl``), VisualDL scalars beside it, ``plsc plot``.

The log is the record, one strict-JSON object per line, in step order:

* a training record at each log point: ``{"step", "epoch", "loss", "lr", "ips", "eta_s", "mem_mb", ...}``
  (``loss``: the mean over the steps since the previous record; ``ips``: images per second, all ranks);
* an evaluation record after each verification: ``{"step", "eval": {set name: accuracy}}``.

When the ``visualdl`` package is installed (``pip install 'plsc[visualdl]'``) rank 0 also writes the same
numbers as VisualDL scalars to ``<output>/visualdl`` (view them with ``visualdl --logdir <output>/visualdl``):
``train/loss``, ``train/lr``, ``train/ips`` and ``eval/<set>`` (accuracy), against the step. Without it
nothing else is written. A resumed run appends to the log from the step it resumes at (the records after it
are dropped); its VisualDL scalars go to a new file in the same folder, and VisualDL shows the steps the
interrupted run had logged after that step too.

``plsc plot`` (:func:`plot_runs`) draws loss, learning rate and accuracy against the step from the log alone,
with matplotlib (``pip install 'plsc[plot]'``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from plsc import strict_json
from plsc.atomic import append_line
from plsc.errors import PlscError

log = logging.getLogger("plsc.train")

LOG_FILE = "train_log.jsonl"
VISUALDL_DIR = "visualdl"
TRAIN_SCALARS = ("loss", "lr", "ips")  # written as train/<key>
PANELS = (("loss", "loss"), ("lr", "learning rate"), ("accuracy", "verification accuracy"))


def json_line(record: dict) -> str:
    """One strict-JSON line: a non-finite number (the mean loss of a window of skipped steps) becomes null,
    since NaN and Infinity are not JSON."""
    return strict_json.dumps(record) + "\n"


class CurveWriter:
    """Rank 0's writer of a run's curves: log records, and VisualDL scalars when VisualDL is installed."""

    def __init__(self, output: Path):
        self.log_path = Path(output) / LOG_FILE
        self.visualdl_dir = Path(output) / VISUALDL_DIR
        self._scalars = None  # the VisualDL LogWriter, opened at the first record (False: not installed)

    def training(self, record: dict) -> None:
        append_line(self.log_path, json_line(record))
        self._add_scalars(record["step"], {f"train/{key}": record.get(key) for key in TRAIN_SCALARS})

    def evaluation(self, step: int, results: dict[str, dict]) -> None:
        accuracies = {name: metrics["accuracy"] for name, metrics in results.items()}
        append_line(self.log_path, json_line({"step": step, "eval": accuracies}))
        self._add_scalars(step, {f"eval/{name}": value for name, value in accuracies.items()})

    def close(self) -> None:
        if self._scalars:
            self._scalars.close()
        self._scalars = None

    def _add_scalars(self, step: int, values: dict) -> None:
        writer = self._writer()
        if not writer:
            return
        for tag, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(tag=tag, value=float(value), step=step)

    def _writer(self):
        if self._scalars is None:
            try:
                from visualdl import LogWriter
            except ImportError:
                self._scalars = False
            else:
                self._scalars = LogWriter(logdir=str(self.visualdl_dir))
                log.info("VisualDL scalars in %s", self.visualdl_dir)
        return self._scalars


# ----------------------------------------------------------------------------------------------------
# Reading the log


@dataclass
class RunCurves:
    """The curves of one run's log: training series and each verification set's accuracy."""

    name: str
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)  # NaN where the log holds null
    lr: list[float] = field(default_factory=list)
    accuracy: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)  # set: (steps, values)

    def series(self, panel: str) -> dict[str, tuple[list[int], list[float]]]:
        """``{label: (steps, values)}`` drawn in ``panel`` (one of PANELS' keys)."""
        if panel == "accuracy":
            return dict(self.accuracy)
        return {"": (self.steps, getattr(self, panel))}


def log_file(run: str | Path) -> Path:
    """A run folder's log, or the log file itself."""
    run = Path(run)
    path = run / LOG_FILE if run.is_dir() else run
    if not path.is_file():
        raise PlscError(f"{path} not found: pass a run folder (plsc train --output) or its {LOG_FILE}")
    return path


def read_curves(run: str | Path, name: str | None = None) -> RunCurves:
    """The curves in a run's log; lines that are not JSON objects with a step (a record cut short) are
    skipped, as a resume drops them."""
    path = log_file(run)
    curves = RunCurves(name or (path.parent.name if path.name == LOG_FILE else path.stem))
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        if isinstance(record.get("eval"), dict):
            for set_name, value in record["eval"].items():
                steps, values = curves.accuracy.setdefault(set_name, ([], []))
                steps.append(record["step"])
                values.append(_number(value))
        elif "loss" in record:
            curves.steps.append(record["step"])
            curves.loss.append(_number(record["loss"]))
            curves.lr.append(_number(record.get("lr")))
    return curves


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def training_records(path: str | Path) -> list[dict]:
    """The training records (those with a loss) of a log file, in order."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [record for record in records if "loss" in record]


# ----------------------------------------------------------------------------------------------------
# Drawing


def _matplotlib():
    """(Figure, MaxNLocator): pyplot's global state is not needed to draw into a file."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise PlscError("plsc plot needs matplotlib: pip install 'plsc[plot]'") from None
    return Figure, MaxNLocator


def run_labels(runs: list[Path]) -> list[str]:
    """Each run's folder name; the whole path where two runs share a name."""
    names = [log_file(run).parent.name if Path(run).is_dir() else Path(run).stem for run in runs]
    return [str(run) if names.count(name) > 1 else name for run, name in zip(runs, names, strict=True)]


def plot_runs(runs: list[str | Path], output: str | Path | None = None):
    """Loss, learning rate and verification accuracy against the step, one panel each, every run's lines
    in each panel (a colour per run); written to ``output`` (PNG, or any format matplotlib knows by the
    suffix) when given. Returns the matplotlib Figure."""
    Figure, MaxNLocator = _matplotlib()
    runs = [Path(run) for run in runs]
    curves = [read_curves(run, label) for run, label in zip(runs, run_labels(runs), strict=True)]
    figure = Figure(figsize=(5 * len(PANELS), 4), layout="constrained")
    axes = figure.subplots(1, len(PANELS))
    for ax, (panel, title) in zip(axes, PANELS, strict=True):
        for index, run in enumerate(curves):
            for label, (steps, values) in run.series(panel).items():
                ax.plot(steps, values, color=f"C{index}", marker="o" if panel == "accuracy" else None,
                        linestyle=_LINESTYLES[sorted(run.accuracy).index(label) % len(_LINESTYLES)]
                        if label else "-", label=f"{run.name} {label}".strip())
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    if output is not None:
        _save(figure, Path(output))
    return figure


_LINESTYLES = ("-", "--", ":", "-.")  # one per verification set of a run


def _save(figure, output: Path) -> None:
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(output)
    except (OSError, ValueError) as exc:  # ValueError: a suffix matplotlib has no writer for
        raise PlscError(f"cannot write {output}: {getattr(exc, 'strerror', None) or exc}") from None
