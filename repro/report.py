"""Render the reproduction tables into docs/reproduction.md, their summary into README.md, and draw the
capacity / throughput figure.

    python -m repro.report            # rewrite the marker blocks and the PNG, only where they changed
    python -m repro.report --check    # exit 1 when a document or the PNG is stale, 0 when all are current

Inputs are ``repro/claims.yaml`` and the newest result of each claim under ``--results-dir``. Each table sits
between ``<!-- repro:<name>:begin -->`` and ``<!-- repro:<name>:end -->`` (names: accuracy, capacity, nhwc,
throughput, figure in docs/reproduction.md; glance and capacity-summary in README.md); everything outside the
markers is left alone. Rendering is a pure function of its inputs, and the PNG is drawn with fixed size,
dpi, style and no metadata, so regenerating gives identical bytes.
"""

from __future__ import annotations

import io
import math
import sys
from collections import Counter
from pathlib import Path

from tabulate import tabulate

from devtools import docblocks
from repro.claims import (
    AccuracyGroup,
    CapacityGroup,
    Claim,
    ClaimGroup,
    Claims,
    CpuCapacityGroup,
    CpuThroughputGroup,
    ModelCapacityGroup,
    NhwcGroup,
    OwnAccuracyGroup,
    ThroughputGroup,
    load_claims,
)
from repro.results import RESULTS_DIR, CaseResult, load_results

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCUMENT = ROOT / "docs" / "reproduction.md"
FIGURE = ROOT / "repro" / "figures" / "capacity_throughput.png"
BLOCKS = ("accuracy", "capacity", "nhwc", "throughput", "figure")
README_BLOCKS = ("glance", "capacity-summary", "own-accuracy")
NOT_RUN = "not run"
NONE = "—"
FIGURE_SIZE_IN, FIGURE_DPI = (11.0, 4.2), 100

Results = dict[str, CaseResult]


# --- tables


def render_blocks(claims: Claims, results: Results, figure_link: str) -> dict[str, str]:
    return {
        "accuracy": _join(
            accuracy_block(claims.accuracy, results), own_accuracy_block(claims.own_accuracy, results)
        ),
        "capacity": _join(
            capacity_block(claims.capacity, results),
            capacity_model_block(claims.capacity_model, results),
            cpu_capacity_block(claims.cpu_capacity, results),
        ),
        "nhwc": nhwc_block(claims.nhwc, results),
        "throughput": _join(
            throughput_block(claims.throughput, results), cpu_throughput_block(claims.cpu_throughput, results)
        ),
        "figure": f"![Maximum classes and throughput: published and measured]({figure_link})",
    }


def _join(*blocks: str) -> str:
    return "\n\n".join(blocks)


def accuracy_block(group: AccuracyGroup, results: Results) -> str:
    keys = list(group.bins)
    header = ["Mode", "Backbone", "Precision", "Format", "Ratio"]
    header += [f"{key} published / measured" for key in keys] + ["Verdict", "Hardware"]
    rows = []
    for claim in group.rows:
        result = results.get(claim.id)
        pairs = [_pair(claim, result, key, "{:.5f}") for key in keys]
        setting = [claim.mode, claim.backbone, claim.precision, claim.format, f"{claim.ratio:.1f}"]
        rows.append(setting + pairs + _outcome(result))
    return _block(group, results, header, rows)


def capacity_block(group: CapacityGroup, results: Results) -> str:
    header = ["Framework", "Mode", "Precision", "Backbone", "Published classes (pool)", "Measured classes"]
    header += ["Verdict", "Hardware"]
    rows = []
    for claim in group.rows:
        result = results.get(claim.id)
        published = f"{claim.published['classes']:,.0f} ({claim.pool_mib} MiB)"
        measured = _measured(result, "classes", "{:,.0f}")
        outcome = ["reference (other framework)", NONE] if claim.reference else _outcome(result)
        rows.append(
            [claim.framework, claim.mode, claim.precision, claim.backbone, published, measured] + outcome
        )
    return _block(group, results, header, rows, f"Batch {group.batch}, sample ratio {group.ratio:g}.")


def nhwc_block(group: NhwcGroup, results: Results) -> str:
    header = ["Claim", "Precision", "Published", "Measured", "Pass range", "Verdict", "Hardware"]
    rows = []
    for claim in group.rows:
        result = results.get(claim.id)
        published = f"{claim.published['change']:+.0%} {claim.quantity.replace('_', ' ')}"
        tolerance = _accepted_range(group.tolerance_for(claim).bounds(claim.published["change"]))
        measured = _measured(result, "change", "{:+.1%}")
        rows.append([claim.id, claim.precision, published, measured, tolerance] + _outcome(result))
    return _block(group, results, header, rows, f'The README says: "{group.text}"')


def throughput_block(group: ThroughputGroup, results: Results) -> str:
    header = ["Mode", "Backbone", "Precision", "Format", "Published", "Measured (images/s)", "Verdict"]
    header += ["Hardware"]
    rows = []
    for claim in group.rows:
        result = results.get(claim.id)
        measured = _measured(result, "images_per_s", "{:,.0f}")
        setting = [claim.mode, claim.backbone, claim.precision, claim.format]
        rows.append(setting + ["unavailable (approximate, chart image only)", measured] + _outcome(result))
    return _block(group, results, header, rows, f"Batch {group.batch}, sample ratio {group.ratio:g}.")


def capacity_model_block(group: ModelCapacityGroup, results: Results) -> str:
    header = ["Mode", "Backbone", "Published classes", "Predicted classes", "Predicted / published"]
    header += ["Binding phase", "Bytes per class", "Verdict"]
    rows = []
    for claim in group.rows:
        result = results.get(claim.id)
        published = claim.published["classes"]
        predicted = _measured(result, "classes", "{:,.0f}")
        ratio = NONE if result is None else f"{result.measured['classes'] / published:.2f}"
        phase = NONE if result is None else result.details.get("binding_phase", NONE)
        per_class = _detail(result, "bytes_per_class", "{:,.0f}")
        mode, backbone = claim.predicts.split("_")[2], claim.predicts.split("_")[-1].capitalize()
        verdict = NOT_RUN if result is None else result.verdict
        rows.append([mode, backbone, f"{published:,.0f}", predicted, ratio, phase, per_class, verdict])
    lead = f"Predicted for {group.world_size} GPUs of {group.device_memory_mib} MiB ({group.section})"
    setting = f"Batch {group.batch_per_rank} per GPU, sample ratio {group.ratio:g}, FP16 class centers."
    return _block(group, results, header, rows, setting, lead=lead)


def cpu_capacity_block(group: CpuCapacityGroup, results: Results) -> str:
    header = ["Peak RSS cap", "Fixed overhead (measured)", "Max classes (fits / fails)", "Model's max"]
    header += ["Binding phase", "Bytes per class measured / model", "Model error per class / peak"]
    header += ["Verdict", "Hardware"]
    rows = []
    for claim in group.rows:
        result = results.get(claim.id)
        if result is None:
            rows.append([f"{claim.memory_cap_mib / 1024:g} GiB"] + [NONE] * 6 + _outcome(result))
            continue
        details, measured = result.details, result.measured
        cap = f"{details['memory_cap_mib'] / 1024:g} GiB"  # the trials' cap, whatever claims.yaml says now
        overhead = _detail(result, "fixed_overhead_mib", "{:,.0f} MiB")
        bracket = f"{measured['classes']:,.0f} / {details['fails_at_classes']:,.0f}"
        model_max = f"{details['predicted_classes']:,.0f}"
        if "classes_error" in details:
            model_max += f" ({details['classes_error']:+.1%})"
        phase = details.get("binding_phase", NONE)
        per_class = f"{details['bytes_per_class']:,.0f} / {details['predicted_bytes_per_class']:,.0f}"
        errors = f"{measured['bytes_per_class_error']:+.1%} / {measured['peak_error']:+.1%}"
        rows.append([cap, overhead, bracket, model_max, phase, per_class, errors] + _outcome(result))
    return _block(group, results, header, rows, lead=group.section)


def cpu_throughput_block(group: CpuThroughputGroup, results: Results) -> str:
    header = ["Mode", "Config", "Images/s (median)", "Window min - max", "Verdict", "Hardware"]
    rows = []
    for claim in group.rows:
        result = results.get(claim.id)
        spread = NONE
        if result is not None:
            spread = f"{result.details['window_min']:,.1f} - {result.details['window_max']:,.1f}"
        measured = _measured(result, "images_per_s", "{:,.1f}")
        rows.append([claim.mode, claim.config, measured, spread] + _outcome(result))
    return _block(group, results, header, rows, lead=group.section[0].upper() + group.section[1:])


def own_accuracy_block(group: OwnAccuracyGroup, results: Results) -> str:
    header = ["Claim", "Config", "Verification file", "Claimed", "Measured", "Demo (group1.jpg)", "Verdict",
              "Hardware"]
    rows, curves = [], []
    for claim in group.rows:
        result = results.get(claim.id)
        claimed = f">= {claim.published['accuracy']:.4f}"
        measured = _measured(result, "accuracy", "{:.4f}")
        rows.append([claim.id, claim.config, claim.bin, claimed, measured, _demo(result)] + _outcome(result))
        if result is not None and result.details.get("curve"):
            points = tabulate(result.details["curve"], ["step", "accuracy"], tablefmt="github",
                              floatfmt=".4f")
            curves.append(f"{claim.id}: {claim.bin} during the run (its log's verification records):\n\n"
                          f"{points}")
    lead = f"{group.section}; {group.hardware}"
    demo = ("Demo: faces of ../shared/data/demo/query/group1.jpg that `sh scripts/demo.sh` (Haar detector) "
            "names as query/expected.json does, with the run's best model.")
    return "\n\n".join([_block(group, results, header, rows, lead=lead), demo, *curves])


def _demo(result: CaseResult | None) -> str:
    demo = None if result is None else result.details.get("demo")
    return NONE if demo is None else f"{demo['right']} of {demo['faces']}"


def own_accuracy_summary(claims: Claims, results: Results) -> str:
    """README's sentence on the faces-mini run and the demo with its model, every number from a result."""
    claim = claims.own_accuracy.rows[0]
    result = results.get(claim.id)
    if result is None:
        return f"`{claim.config}` has not been run by the reproduction harness yet."
    details = result.details
    sentence = (f"`{claim.config}` reached {result.measured['accuracy']:.4f} on {claim.bin} (600 pairs of "
                f"people not in its training data) after {details['checkpoint_step']} steps "
                f"({result.hardware.get('summary', NONE)}, {result.duration_s / 60:.0f} min)")
    demo = details.get("demo")
    if demo is None:
        return sentence + "; the demo was not scored (no demo photos)."
    return (sentence + f"; with its best model `sh scripts/demo.sh` named {demo['right']} of the "
            f"{demo['faces']} faces of `group1.jpg` as expected "
            "([docs/reproduction.md](docs/reproduction.md)).")


def _detail(result: CaseResult | None, key: str, spec: str) -> str:
    if result is None or result.details.get(key) is None:
        return NONE
    return spec.format(result.details[key])


def _block(
    group: ClaimGroup, results: Results, header, rows, setting: str = "", lead: str | None = None
) -> str:
    tolerance = f"Tolerance: {group.tolerance.describe()}, {group.tolerance.note}" if group.tolerance else ""
    lead = lead or f"Published (seed README {group.section}; {group.hardware})"
    tiers = list(dict.fromkeys(group.tier_for(claim) for claim in group.rows))
    tier_names = ", ".join(f"`{tier}`" for tier in tiers)
    lines = [
        f"{lead}. {setting}".strip(),
        tolerance,
        group.note,
        f"Tier{'s' if len(tiers) > 1 else ''} {tier_names}: {_run_count(group, results)} of "
        f"{len(group.rows)} cases run.",
    ]
    prose = "\n\n".join(line for line in lines if line)
    return prose + "\n\n" + tabulate(rows, header, tablefmt="github", disable_numparse=True)


def _accepted_range(bounds: tuple[float, float]) -> str:
    low, high = bounds
    if math.isinf(low):
        return f"accepts <= {high:+.0%}"
    if math.isinf(high):
        return f"accepts >= {low:+.0%}"
    return f"accepts {low:+.0%} to {high:+.0%}"


def _run_count(group: ClaimGroup, results: Results) -> int:
    return sum(claim.id in results for claim in group.rows)


def _pair(claim: Claim, result: CaseResult | None, key: str, spec: str) -> str:
    return f"{spec.format(claim.published[key])} / {_measured(result, key, spec)}"


def _measured(result: CaseResult | None, key: str, spec: str) -> str:
    if result is None or result.measured.get(key) is None:
        return NONE
    return spec.format(result.measured[key])


def _outcome(result: CaseResult | None) -> list[str]:
    """[verdict, hardware] cells: "not run" and a dash when there is no result."""
    if result is None:
        return [NOT_RUN, NONE]
    return [result.verdict, result.hardware.get("summary", NONE)]


def capacity_summary(claims: Claims, results: Results) -> str:
    """README's capacity sentence: the model's prediction for the first published Paddle row and the CPU
    tier's measurement, every number from a result file."""
    group, row = claims.capacity_model, claims.capacity_model.rows[0]
    prediction, cpu = results.get(row.id), results.get(claims.cpu_capacity.rows[0].id)
    setting = (f"PLSC v2.2's {row.published['classes'] / 1e6:.0f}M setting ({group.hardware}, "
               f"{row.config}, batch {group.batch_per_rank} per GPU, ratio {group.ratio:g})")
    if prediction is None:
        predicted = f"plsc's memory model has not been run for {setting}"
    else:
        int8 = prediction.details.get("int8_velocity_classes")
        with_int8 = "" if int8 is None else f" ({int8 / 1e6:.1f}M with `loss.velocity_dtype=int8`)"
        predicted = (f"with the streaming head (`loss.chunk_size`) plsc's memory model predicts "
                     f"{prediction.measured['classes'] / 1e6:.1f}M classes{with_int8} for {setting}, "
                     f"bound by its {prediction.details['binding_phase']} phase")
    if cpu is None:
        measured = "the CPU tier has not been run"
    else:
        details = cpu.details
        error = cpu.measured["bytes_per_class_error"]
        measured = (f"the CPU tier fits {cpu.measured['classes']:,.0f} classes under a "
                    f"{details['memory_cap_mib'] / 1024:g} GiB cap on peak RSS, the model's bytes per class "
                    f"{error:+.1%} off the measured {details['bytes_per_class']:,.0f} ({cpu.verdict})")
    return f"Capacity: {predicted}; {measured}:"


def glance_block(claims: Claims, results: Results) -> str:
    """README's summary: per group of claims, how many passed, failed or were not run."""
    header = ["Claims", "Count", "Verdicts"]
    rows = []
    for group in claims.groups():
        measured = [claim for claim in group.rows if not getattr(claim, "reference", False)]
        verdicts = Counter(results[c.id].verdict if c.id in results else NOT_RUN for c in measured)
        ordered = sorted(verdicts.items(), key=lambda item: (item[0] == NOT_RUN, item[0]))  # "not run" last
        summary = ", ".join(f"{count} {verdict}" for verdict, count in ordered)
        rows.append([group.section, len(measured), summary])
    return tabulate(rows, headers=header, tablefmt="github")


# --- documents


def marker(name: str, edge: str) -> str:
    return docblocks.marker(f"repro:{name}", edge)


def replace_blocks(text: str, blocks: dict[str, str]) -> str:
    """``text`` with the content between each block's begin/end markers replaced."""
    for name, content in blocks.items():
        text = docblocks.replace_block(text, f"repro:{name}", content)
    return text


# --- figure


def render_figure(claims: Claims, results: Results) -> bytes:
    """PNG bytes of the figure; identical inputs give identical bytes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with style.context("default"):
        figure = Figure(figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI)
        FigureCanvasAgg(figure)
        capacity_axes, throughput_axes = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
        _plot_capacity(capacity_axes, claims.capacity, results, _predictions(claims.capacity_model, results))
        _plot_throughput(throughput_axes, claims.throughput, results)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=FIGURE_DPI, metadata={"Software": None})
    return buffer.getvalue()


def _predictions(group: ModelCapacityGroup, results: Results) -> dict[str, float]:
    """``{capacity claim id: predicted classes}`` for the predictions that have a result."""
    return {row.predicts: results[row.id].measured["classes"] for row in group.rows if row.id in results}


def _plot_capacity(axes, group: CapacityGroup, results: Results, predictions: dict[str, float]) -> None:
    settings = list(dict.fromkeys(map(_capacity_setting, group.rows)))
    backbones = list(dict.fromkeys(claim.backbone for claim in group.rows))
    width = 0.8 / len(backbones)
    for offset, backbone in enumerate(backbones):
        claims = [claim for claim in group.rows if claim.backbone == backbone]
        xs = [settings.index(_capacity_setting(claim)) + (offset - 0.5) * width for claim in claims]
        published = [claim.published["classes"] / 1e6 for claim in claims]
        axes.bar(xs, published, width, label=f"{backbone} published")
        measured = [
            (x, results[claim.id].measured["classes"] / 1e6)
            for x, claim in zip(xs, claims, strict=True)
            if claim.id in results
        ]
        if measured:
            axes.plot(*zip(*measured, strict=True), "kD", label="measured" if offset == 0 else None)
        predicted = [
            (x, predictions[claim.id] / 1e6)
            for x, claim in zip(xs, claims, strict=True)
            if claim.id in predictions
        ]
        if predicted:
            axes.plot(
                *zip(*predicted, strict=True),
                "rx",
                markersize=9,
                label="predicted (plsc's model)" if offset == 0 else None,
            )
    axes.set_xticks(range(len(settings)), settings, fontsize=8)
    axes.set_ylabel("maximum classes (millions)")
    axes.set_title(f"Maximum classes, {group.hardware}", fontsize=9)
    axes.legend(fontsize=8)


def _capacity_setting(claim) -> str:
    return f"{claim.framework}\n{claim.mode} {claim.precision}"


def _plot_throughput(axes, group: ThroughputGroup, results: Results) -> None:
    axes.set_title(f"Throughput, batch {group.batch}, ratio {group.ratio:g}", fontsize=9)
    measured = [
        (claim, results[claim.id].measured["images_per_s"])
        for claim in group.rows
        if results.get(claim.id) and results[claim.id].measured.get("images_per_s") is not None
    ]
    if not measured:
        message = "not measured yet\n(published values: chart image only)"
        axes.text(0.5, 0.5, message, ha="center", va="center")
        axes.set_axis_off()
        return
    labels = [f"{claim.mode}\n{claim.backbone} {claim.precision}" for claim, _ in measured]
    axes.bar(range(len(measured)), [value for _, value in measured], color="tab:green", label="measured")
    axes.set_xticks(range(len(measured)), labels, fontsize=7)
    axes.set_ylabel("images / s")
    axes.legend(fontsize=8)


# --- command line


def build(documents: dict[str, Path], results_dir: Path, figure: Path) -> docblocks.Rendered:
    """({document: text}, PNG bytes) as they should be."""
    claims, results = load_claims(), load_results(results_dir)
    readme, document = documents["readme"], documents["doc"]
    blocks = render_blocks(claims, results, docblocks.figure_link(figure, document))
    texts = {
        document: replace_blocks(docblocks.read_document(document), blocks),
        readme: replace_blocks(docblocks.read_document(readme), {
            "glance": glance_block(claims, results), "capacity-summary": capacity_summary(claims, results),
            "own-accuracy": own_accuracy_summary(claims, results),
        }),
    }
    return texts, render_figure(claims, results)


def main(argv: list[str] | None = None) -> int:
    return docblocks.main(
        argv, prog="python -m repro.report", description=__doc__.split("\n\n")[0],
        documents={"readme": README, "doc": DOCUMENT}, results_dir=RESULTS_DIR, figure=FIGURE, build=build,
        regenerate="`make report` (python -m repro.report)",
    )


if __name__ == "__main__":
    sys.exit(main())
