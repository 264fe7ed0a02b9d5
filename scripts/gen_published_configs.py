#!/usr/bin/env python3
"""Write the 18 published PLSC v2.2 MS1MV3 configurations as plsc YAML files.

The table below is the accuracy table of PLSC v2.2's README (section 9.1, "Accuracy on Verification
Datasets"), copied by hand so this script reads nothing but itself. Every file it writes is self-contained
(plsc's loader has no include mechanism); generating them keeps the 18 files consistent.

Usage::

    python scripts/gen_published_configs.py            # (re)write configs/ms1mv3_*.yaml
    python scripts/gen_published_configs.py --out DIR  # write somewhere else
    python scripts/gen_published_configs.py --check    # exit 1 if configs/ differs from what would be written

Idempotent: the output depends only on this file, and files whose content is already right are not touched.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling generated_configs, run from anywhere
import generated_configs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "configs"
CHECKPOINT_URL = "https://plsc.bj.bcebos.com/pretrained_model/"


@dataclass(frozen=True)
class Row:
    mode: str  # "static" | "dynamic"
    backbone: str  # as the README writes it: "Res50" | "Res100" | "MobileFaceNet"
    precision: str  # "FP16" | "FP32"
    data_format: str  # "NHWC" | "NCHW"
    ratio: str  # "0.1" | "1.0", kept as text: it is part of the checkpoint name
    agedb30: str  # accuracies as printed, kept as text so the header repeats them digit for digit
    cfp_fp: str
    lfw: str

    @property
    def checkpoint(self) -> str:
        parts = (self.backbone, self.mode, self.ratio, self.data_format, self.precision)
        return "MS1M_v3_arcface_" + "_".join(parts) + "_v2.2.tgz"

    @property
    def file_name(self) -> str:
        short = BACKBONES[self.backbone]["short"]
        parts = (short, self.mode, self.precision.lower(), self.data_format.lower(), "r" + self.ratio)
        return "ms1mv3_" + "_".join(parts) + ".yaml"


# PLSC v2.2 README, section 9.1, in the README's row order (8 x V100 32G, batch 128 per GPU / 1024 global).
TABLE: tuple[Row, ...] = (
    Row("static", "Res50", "FP16", "NHWC", "0.1", "0.98200", "0.98943", "0.99850"),
    Row("static", "Res50", "FP32", "NCHW", "0.1", "0.98267", "0.98986", "0.99850"),
    Row("static", "Res50", "FP16", "NHWC", "1.0", "0.98300", "0.98929", "0.99850"),
    Row("static", "Res50", "FP32", "NCHW", "1.0", "0.98400", "0.98929", "0.99833"),
    Row("static", "Res100", "FP16", "NHWC", "0.1", "0.98383", "0.99200", "0.99850"),
    Row("static", "Res100", "FP32", "NCHW", "0.1", "0.98317", "0.99157", "0.99850"),
    Row("static", "Res100", "FP16", "NHWC", "1.0", "0.98367", "0.99086", "0.99867"),
    Row("static", "Res100", "FP32", "NCHW", "1.0", "0.98417", "0.99129", "0.99867"),
    Row("dynamic", "Res50", "FP16", "NHWC", "0.1", "0.98367", "0.99029", "0.99850"),
    Row("dynamic", "Res50", "FP32", "NCHW", "0.1", "0.98400", "0.98986", "0.99867"),
    Row("dynamic", "Res50", "FP16", "NHWC", "1.0", "0.98317", "0.98971", "0.99850"),
    Row("dynamic", "Res50", "FP32", "NCHW", "1.0", "0.98350", "0.99000", "0.99850"),
    Row("dynamic", "Res100", "FP16", "NHWC", "0.1", "0.98500", "0.99143", "0.99867"),
    Row("dynamic", "Res100", "FP32", "NCHW", "0.1", "0.98383", "0.99114", "0.99867"),
    Row("dynamic", "Res100", "FP16", "NHWC", "1.0", "0.98500", "0.99214", "0.99883"),
    Row("dynamic", "Res100", "FP32", "NCHW", "1.0", "0.98400", "0.99100", "0.99850"),
    Row("dynamic", "MobileFaceNet", "FP32", "NCHW", "0.1", "0.96200", "0.96571", "0.99567"),
    Row("dynamic", "MobileFaceNet", "FP32", "NCHW", "1.0", "0.96167", "0.96657", "0.99533"),
)

# README backbone -> plsc model name, PLSC v2.2 backbone class, embedding size, file-name part.
BACKBONES = {
    "Res50": {"model": "iresnet50", "plsc22": "FresResNet50", "embedding": 512, "short": "r50"},
    "Res100": {"model": "iresnet100", "plsc22": "FresResNet100", "embedding": 512, "short": "r100"},
    "MobileFaceNet": {
        "model": "mobilefacenet",
        "plsc22": "MobileFaceNet_128",
        "embedding": 128,
        "short": "mfn",
    },
}

RUN_GPUS = "0,1,2,3,4,5,6,7"


# Sampled centers per chunk of the streaming head (plsc.loss.streaming) in the configs of the capacity rows.
CAPACITY_CHUNK_SIZE = 4096


def capacity_row(row: Row) -> bool:
    """The settings of PLSC v2.2's maximum-class-count table (FP16, ratio 0.1): the streaming head."""
    return row.precision == "FP16" and row.ratio == "0.1"


def render(row: Row, index: int) -> str:
    """The YAML text of one published configuration (header comment + the five sections)."""
    bb = BACKBONES[row.backbone]
    fp16 = row.precision == "FP16"
    dynamic = row.mode == "dynamic"
    name = row.file_name
    lines = [
        f"# PLSC v2.2 published configuration {index} of {len(TABLE)}:"
        " seed README section 9.1 (accuracy table),",
        f"# row  {row.mode.capitalize()} | MS1MV3 | {row.backbone} | {row.precision} | {row.data_format}"
        f" | ratio {row.ratio}",
        f"#   published accuracy: agedb30 {row.agedb30}, cfp_fp {row.cfp_fp}, lfw {row.lfw}",
        f"#   checkpoint & log:   {row.checkpoint}",
        f"#                       ({CHECKPOINT_URL}{row.checkpoint})",
        f"#   PLSC v2.2 backbone {bb['plsc22']}, embedding {bb['embedding']}; trained on 8 x V100 32G,",
        "#   batch 128 per GPU (1024 global), ArcFace, model-parallel classifier (PartialFC when ratio < 1).",
        "#",
        "# Data: MS1M_v3/ (prepared as in seed README section 4: images/, label.txt, lfw.bin, cfp_fp.bin,",
        "# agedb_30.bin) in the folder PLSC_DATA_ROOT names. Run on one node with 8 GPUs:",
        "#   export PLSC_DATA_ROOT=/path/to/datasets",
        f"#   python -m paddle.distributed.launch --gpus {RUN_GPUS} plsc train --config configs/{name}",
        "# Or, instead of the variable, add --set data.root=/path/to/MS1M_v3 (the .bin files follow it).",
        "# Multi-node: add --ips=<ip1>,<ip2>,... and run the same command on every node",
        "# (the global batch then grows with the GPU count).",
        "#",
        "# Generated by scripts/gen_published_configs.py; edit the script and re-run it, not this file.",
        "",
        "data:",
        "  source: folder",
        "  root: ${PLSC_DATA_ROOT}/MS1M_v3",
        "  label_file: label.txt",
        "  val_bins:",
        "    - ${PLSC_DATA_ROOT}/MS1M_v3/lfw.bin",
        "    - ${PLSC_DATA_ROOT}/MS1M_v3/cfp_fp.bin",
        "    - ${PLSC_DATA_ROOT}/MS1M_v3/agedb_30.bin",
        "  num_classes: 93431  # MS1M_v3 (MS1M-RetinaFace); MS1M_v2 would be 85742",
        "  image_size: 112",
        "  num_workers: 8",
        "",
        "model:",
        f"  name: {bb['model']}  # PLSC v2.2 {bb['plsc22']}",
        f"  embedding_size: {bb['embedding']}",
        "  width: 1.0",
        f"  data_format: {row.data_format}",
        "  dropout: 0.0",
        "",
        "loss:",
        "  margins: [1.0, 0.5, 0.0]  # ArcFace (m1, m2, m3)",
        "  scale: 64.0",
        f"  sample_ratio: {row.ratio}" + ("  # PartialFC" if row.ratio != "1.0" else "  # full FC"),
        "  center_dtype: "
        + ("float16  # PLSC v2.2 FP16 stores the classifier shards in float16" if fp16 else "float32"),
        *(
            [
                "  # PLSC v2.2's sparse_momentum steps every row of the shard, weight decay and momentum",
                "  # (dynamic/utils/hybrid_optimizer.py:85-101; static/utils/optimization_pass.py:23).",
                "  momentum_mode: dense",
            ]
            if row.ratio != "1.0"
            else ["  momentum_mode: dense  # ratio 1.0 samples every center: lazy and dense are one update"]
        ),
        "  # Initial std sqrt(2 / (embedding + ceil(93431 / 8))) as PLSC v2.2's on its 8 ranks",
        "  # (dynamic/classifiers/lsc.py:53,66); its matrix itself (RandomState(2021), lsc.py:67) is not.",
        "  center_init_ranks: 8",
        *(
            [f"  chunk_size: {CAPACITY_CHUNK_SIZE}  # the streaming head, as the capacity table (README 9.2)"]
            if capacity_row(row) else []
        ),
        "",
        "optim:",
        "  # PLSC v2.2 trains at global_batch * lr / 512 (dynamic/train.py:104, static/train.py:101);",
        "  # its logs print total_batch_size 1024 and lr 0.200000 from step 100",
        "  # (experiments/logs/*/training.log).",
        "  lr: 0.1",
        "  lr_reference_batch: 512",
        "  momentum: 0.9",
        "  weight_decay: 0.0005",
        "  warmup_steps: 0",
        "  schedule: step",
        "  decay_unit: epoch",
        "  decay_boundaries: [10, 16, 22]",
        "  decay_factor: 0.1",
        *(
            [
                "  # PLSC v2.2 dynamic: the backbone's gradient times min(2 / (norm + 1e-6), 2)",
                "  # (configs/config.py:49-50, dynamic/utils/parallel_grad_scaler.py:21-62). The published",
                "  # dynamic logs list no grad_norm_clip argument among the run's arguments.",
                "  clip_norm: 2.0",
                "  clip_max_factor: 2.0",
            ]
            if dynamic
            else ["  clip_norm: 0.0  # PLSC v2.2's static Momentum has no grad_clip (static_model.py:105)"]
        ),
        "  # PLSC v2.2 divides each rank's loss (the global batch's mean) by its rank count, 8 in its logs:",
        "  # dynamic/utils/parallel_grad_scaler.py:86-88; static: fleet's 1/nranks loss-gradient scale.",
        "  grad_divisor: 8.0",
        "",
        "train:",
        "  batch_size: 128  # per GPU; 1024 global on 8 GPUs",
        "  epochs: 25",
        "  log_interval: 100",
        "  eval_interval: 2000",
        "  save_interval: 0  # checkpoint at the end of every epoch",
        "  keep_checkpoints: 1",
        f"  mode: {row.mode}",
        f"  precision: {row.precision.lower()}",
    ]
    if fp16:
        lines += [
            "  loss_scale_init: 27648.0  # dynamic scaling: x2 per 2000 good steps, x0.5 after an inf/nan",
            "  loss_scale_growth_interval: 2000",
            "  # PLSC v2.2 FP16 backbones are float16 parameters updated without float32 master copies",
            "  # (dynamic/train.py:114-115,138-146; static/static_model.py:105-131: multi_precision unset).",
            "  fp16_master_weights: false",
            "  # PLSC v2.2 FP16 never unscales the class centers' gradient (dynamic/utils/",
            "  # parallel_grad_scaler.py:148-157; static/utils/optimization_pass.py:89, amp_pass).",
            "  unscale_center_grads: false",
        ]
    lines.append("  # seed: plsc's default; PLSC v2.2 left it unset (seed None)")
    return "\n".join(lines) + "\n"


def generate() -> dict[str, str]:
    """File name -> text of every published configuration."""
    return {row.file_name: render(row, i) for i, row in enumerate(TABLE, start=1)}


def write(out_dir: Path) -> list[str]:
    """Write the files into out_dir; returns the names whose content changed (empty on a re-run)."""
    return generated_configs.write(generate(), out_dir)


def check(out_dir: Path) -> list[str]:
    """Problems found in out_dir: missing or differing files, and ms1mv3_*.yaml files not generated."""
    return generated_configs.check(generate(), out_dir, "ms1mv3_*.yaml")


def main(argv: list[str] | None = None) -> int:
    return generated_configs.main(argv, __doc__.splitlines()[0], generate(), DEFAULT_OUT, "ms1mv3_*.yaml")


if __name__ == "__main__":
    sys.exit(main())
