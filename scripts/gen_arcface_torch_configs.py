#!/usr/bin/env python3
"""Write arcface_torch's main training settings as plsc YAML files under configs/arcface_torch/.

arcface_torch is ``recognition/arcface_torch`` of deepinsight/insightface (master). Each of its configs is a
Python file read over ``configs/base.py`` (utils/utils_config.py: ``cfg.update(job_cfg)``) and trained by
``train_v2.py``. The values below are typed in by hand from those files, with the line that sets each, so this
script reads nothing but itself; a config keeps arcface_torch's file name.

Usage::

    python scripts/gen_arcface_torch_configs.py            # (re)write configs/arcface_torch/*.yaml
    python scripts/gen_arcface_torch_configs.py --out DIR  # write somewhere else
    python scripts/gen_arcface_torch_configs.py --check    # exit 1 if the folder differs from the output

Idempotent: the output depends only on this file, and files whose content is already right are not touched.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling generated_configs, run from anywhere
import generated_configs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "configs" / "arcface_torch"

# Line of each setting in arcface_torch's per-run configs: the ResNet configs share one layout, the two ViT
# configs list weight_decay, gradient_acc and optimizer where the others list momentum.
RESNET_LINES = {"margin_list": 8, "network": 9, "embedding_size": 12, "sample_rate": 13, "fp16": 14,
                "weight_decay": 16, "batch_size": 17, "lr": 18, "verbose": 19, "rec": 22, "num_classes": 23,
                "num_image": 24, "num_epoch": 25, "warmup_epoch": 26, "val_targets": 27}
VIT_8GPU_LINES = {"margin_list": 8, "network": 9, "embedding_size": 12, "sample_rate": 13, "fp16": 14,
                  "weight_decay": 15, "batch_size": 16, "gradient_acc": 17, "optimizer": 18, "lr": 19,
                  "verbose": 20, "rec": 23, "num_classes": 24, "num_image": 25, "num_epoch": 26,
                  "warmup_epoch": 27, "val_targets": 28}
VIT_64GPU_LINES = {"margin_list": 8, "network": 9, "embedding_size": 12, "sample_rate": 13, "fp16": 14,
                   "weight_decay": 15, "batch_size": 16, "optimizer": 17, "lr": 18, "verbose": 19, "rec": 22,
                   "num_classes": 23, "num_image": 24, "num_epoch": 25, "warmup_epoch": 26, "val_targets": 27}

# The data sets as the configs name them (rec folder, num_classes, num_image).
MS1MV3 = ("ms1m-retinaface-t1", 93431, 5179510)
GLINT360K = ("glint360k", 360232, 17091657)
WEBFACE42M = ("WebFace42M", 2059906, 42474557)

ARCFACE = (1.0, 0.5, 0.0)
COSFACE = (1.0, 0.0, 0.4)
VAL_TARGETS = ("lfw", "cfp_fp", "agedb_30")

# arcface_torch's backbone name -> plsc model name and ViT options (backbones/__init__.py).
NETWORKS = {
    "r50": {"model": "iresnet50", "source": "backbones/__init__.py:11-12"},
    "r100": {"model": "iresnet100", "source": "backbones/__init__.py:13-14"},
    "vit_b_dp005_mask_005": {"model": "vit_b", "drop_path": 0.05, "patch_mask_ratio": 0.05,
                             "source": "backbones/__init__.py:68-74"},
}


@dataclass(frozen=True)
class Row:
    name: str  # arcface_torch's config file name without .py
    network: str
    data: tuple[str, int, int]
    margins: tuple[float, float, float]
    sample_rate: float
    weight_decay: float
    batch_size: int
    lr: float
    num_epoch: int
    warmup_epoch: int
    verbose: int
    gpus: int  # as arcface_torch's README trains it
    readme: str  # the README's line for this setting
    lines: dict
    optimizer: str = "sgd"
    gradient_acc: int = 1
    val_targets: tuple[str, ...] = VAL_TARGETS
    # adamw: the class centers' SGD rate, plsc's choice (arcface_torch steps them with AdamW), and where
    # arcface_torch trains WebFace42M with SGD at the nearest global batch.
    center_lr: float = 0.0
    center_lr_source: str = ""

    @property
    def file_name(self) -> str:
        return f"{self.name}.yaml"

    def cite(self, key: str) -> str:
        return f"configs/{self.name}.py:{self.lines[key]}"


TABLE: tuple[Row, ...] = (
    Row("ms1mv3_r50", "r50", MS1MV3, ARCFACE, 1.0, 5e-4, 128, 0.1, 20, 0, 2000, 8,
        "README.md:35 (8 GPUs), README.md:100 (MS1MV3 r50)", RESNET_LINES),
    Row("ms1mv3_r100", "r100", MS1MV3, ARCFACE, 1.0, 5e-4, 128, 0.1, 20, 0, 2000, 8,
        "README.md:101 (MS1MV3 r100, single host)", RESNET_LINES),
    Row("glint360k_r100", "r100", GLINT360K, COSFACE, 1.0, 1e-4, 128, 0.1, 20, 0, 2000, 8,
        "README.md:104 (Glint360k r100, single host)", RESNET_LINES),
    Row("wf42m_pfc02_r100", "r100", WEBFACE42M, COSFACE, 0.2, 5e-4, 128, 0.1, 20, 0, 10000, 8,
        "README.md:109 (WF42M-PFC-0.2 r100, single host)", RESNET_LINES),
    Row("wf42m_pfc02_8gpus_r50_bs4k", "r50", WEBFACE42M, COSFACE, 0.2, 5e-4, 512, 0.4, 20, 2, 10000, 8,
        "README.md:117 (WF42M-PFC-0.2 r50(512*8))", RESNET_LINES),
    Row("wf42m_pfc03_32gpu_r50", "r50", WEBFACE42M, COSFACE, 0.3, 5e-4, 128, 0.4, 20, 2, 2000, 32,
        "README.md:134 (WF42M-PFC-0.3 r50(128*32))", RESNET_LINES),
    Row("wf42m_pfc03_32gpu_r100", "r100", WEBFACE42M, COSFACE, 0.3, 5e-4, 128, 0.4, 20, 2, 2000, 32,
        "README.md:135 (WF42M-PFC-0.3 r100(128*32))", RESNET_LINES),
    Row("wf42m_pfc03_40epoch_8gpu_vit_b", "vit_b_dp005_mask_005", WEBFACE42M, COSFACE, 0.3, 0.1, 256, 0.001,
        40, 4, 2000, 8, "README.md:52-55 and 111 (WF42M-PFC-0.3 ViT-B, 8 GPUs)", VIT_8GPU_LINES,
        optimizer="adamw", gradient_acc=12, val_targets=(), center_lr=0.2,
        center_lr_source="configs/wf42m_pfc02_r100_16gpus.py:17-18 (128 x 16 GPUs, lr 0.2)"),
    Row("wf42m_pfc03_40epoch_64gpu_vit_b", "vit_b_dp005_mask_005", WEBFACE42M, COSFACE, 0.3, 0.1, 384, 0.001,
        40, 4, 2000, 64, "README.md:139 (WF42M-PFC-0.3 VIT-B(384*64))", VIT_64GPU_LINES,
        optimizer="adamw", val_targets=(), center_lr=0.4,
        center_lr_source="configs/wf42m_pfc0008_32gpu_r100.py:17-18 (512 x 32 GPUs, lr 0.4, its largest)"),
)

CENTER_WEIGHT_DECAY = 5e-4  # arcface_torch's SGD configs' weight_decay (e.g. configs/wf42m_pfc02_r100.py:16)
SEED = 2048  # configs/base.py:47
LOG_INTERVAL = 10  # configs/base.py:37 (frequent)
LOSS_SCALE_INIT = 65536.0  # torch.cuda.amp.GradScaler's default init_scale, 2**16
LOSS_SCALE_GROWTH_INTERVAL = 100  # train_v2.py:174


def _margin_name(margins: tuple[float, float, float]) -> str:
    return {ARCFACE: "ArcFace", COSFACE: "CosFace"}[margins]


def _header(row: Row) -> list[str]:
    folder, classes, images = row.data
    global_batch = row.batch_size * row.gpus
    launch = (f"plsc train --config arcface_torch/{row.name} --nproc 8" if row.gpus == 8 else
              f"plsc train --config arcface_torch/{row.name} --nproc 8 --nodes IP1,...,IP{row.gpus // 8}")
    lines = [
        f"# arcface_torch's configs/{row.name}.py over its configs/base.py",
        "# (recognition/arcface_torch of deepinsight/insightface, master; train_v2.py trains it).",
        f"# Its README: {row.readme}.",
        f"# {row.gpus} GPUs x {row.batch_size} per GPU = {global_batch:,} images per step"
        + (f" ({row.gradient_acc} accumulated: {global_batch * row.gradient_acc:,})" if row.gradient_acc > 1
           else "") + ".",
        "#",
        f"# Data: insightface's {folder}/ (train.rec, train.idx"
        + (", lfw.bin, cfp_fp.bin, agedb_30.bin)" if row.val_targets else ")"),
        "# in the folder PLSC_DATA_ROOT names (dataset.py:29-41 and utils/utils_callbacks.py:55 read",
        f"# them there). On {row.gpus} GPUs"
        + (":" if row.gpus == 8 else f" ({row.gpus // 8} nodes of 8, the same command on each):"),
        "#   export PLSC_DATA_ROOT=/path/to/datasets",
        f"#   {launch}",
        f"#   plsc plan --config arcface_torch/{row.name} --gpus {row.gpus}   # schedule and memory first",
        "#",
        "# Matched from train_v2.py: the margin softmax at scale 64 (107-113); clipping of the",
        "# backbone's gradient at norm 5 (189, 196); GradScaler(growth_interval=100) (174), torch's",
        "# initial scale 2**16, unscaling the class centers' gradient too (188); fp16 as autocast over",
        "# float32 weights (plsc's amp); the gradients of the global batch's mean loss",
        "# (partial_fc_v2.py:199-259): grad_divisor 1; centers initialised N(0, 0.01^2)",
        "# (partial_fc_v2.py:71); warmup, then polynomial decay to 0 at the last step, power 1",
        "# (lr_scheduler.py:7, train_v2.py:137-143). The README's results were trained by the",
        "# PolyScheduler this replaced, power 2 (lr_scheduler.py:10 at insightface commit dfa209de):",
        "# --set optim.poly_power=2 for that schedule.",
        "# Not matched: DDP's float16 gradient compression (train_v2.py:101); DALI (base.py:40, off)"
        + ("." if row.gradient_acc == 1 else ";"),
        *(["# gradient_acc's per-batch schedule (see optim below)."] if row.gradient_acc > 1 else []),
        "#",
        "# Generated by scripts/gen_arcface_torch_configs.py; edit the script and re-run it, not this file.",
    ]
    return lines


def _data(row: Row) -> list[str]:
    folder, classes, images = row.data
    bins = [f"    - ${{PLSC_DATA_ROOT}}/{folder}/{name}.bin" for name in row.val_targets]
    return [
        "data:",
        "  source: rec",
        f"  root: ${{PLSC_DATA_ROOT}}/{folder}  # {row.cite('rec')}",
        "  rec_file: train.rec",
        *(["  val_bins:", *bins] if bins else [f"  val_bins: []  # {row.cite('val_targets')}: none"]),
        f"  num_classes: {classes}  # {row.cite('num_classes')}",
        f"  num_images: {images}  # {row.cite('num_image')}",
        "  image_size: 112",
        "  num_workers: 8  # arcface_torch: 2 (base.py:50); loader processes change no number",
    ]


def _model(row: Row) -> list[str]:
    network = NETWORKS[row.network]
    lines = [
        "model:",
        f"  name: {network['model']}  # {row.cite('network')}: {row.network} ({network['source']})",
        f"  embedding_size: 512  # {row.cite('embedding_size')}",
        "  data_format: NCHW",
        "  dropout: 0.0  # train_v2.py:96",
    ]
    if "drop_path" in network:
        lines += [
            f"  drop_path: {network['drop_path']}  # drop_path_rate of {row.network}",
            f"  patch_mask_ratio: {network['patch_mask_ratio']}  # mask_ratio of {row.network}",
        ]
    return lines


def _loss(row: Row) -> list[str]:
    m1, m2, m3 = row.margins
    sampled = row.sample_rate < 1
    return [
        "loss:",
        f"  margins: [{m1}, {m2}, {m3}]  # {_margin_name(row.margins)} ({row.cite('margin_list')})",
        "  scale: 64.0  # train_v2.py:108",
        "  interclass_filtering_threshold: 0.0  # base.py:20: off (CombinedMarginLoss, train_v2.py:107-113)",
        f"  sample_ratio: {row.sample_rate}  # {row.cite('sample_rate')}"
        + ("" if sampled else ": every center, model parallel"),
        "  # torch's SGD sees the whole weight: unsampled rows get a zero gradient, their velocity decays and"
        if row.optimizer == "sgd" else
        "  # The centers' SGD as arcface_torch's SGD configs have it, on the whole shard (see optim below).",
        *(["  # weight decay applies (partial_fc_v2.py:104 indexes the parameter; train_v2.py:121-123)."]
          if row.optimizer == "sgd" else []),
        "  momentum_mode: dense",
        "  center_dtype: float32  # float32 parameters under autocast",
        "  center_init_ranks: 0  # N(0, 0.01^2), partial_fc_v2.py:71",
    ]


def _optim(row: Row) -> list[str]:
    warmup = f"  warmup_epochs: {row.warmup_epoch}  # {row.cite('warmup_epoch')}; steps: train_v2.py:137"
    common_tail = [
        "  schedule: poly",
        "  poly_power: 1.0  # lr_scheduler.py:7 (train_v2.py:140-143 passes none)",
        "  clip_norm: 5.0  # clip_grad_norm_(backbone.parameters(), 5): train_v2.py:189, 196",
        "  clip_max_factor: 1.0",
        "  grad_divisor: 1.0",
    ]
    if row.optimizer == "sgd":
        return [
            "optim:",
            "  name: sgd  # torch.optim.SGD over backbone and centers (train_v2.py:115-123)",
            f"  lr: {row.lr}  # {row.cite('lr')}, not scaled by the global batch",
            "  lr_reference_batch: 0",
            "  momentum: 0.9  # train_v2.py:123",
            f"  weight_decay: {row.weight_decay}  # {row.cite('weight_decay')}",
            warmup,
            *common_tail,
        ]
    beta_line = "  betas: [0.9, 0.999]  # torch's defaults: train_v2.py:130-132 passes lr and decay only"
    lines = [
        "optim:",
        f"  name: adamw  # {row.cite('optimizer')}; torch.optim.AdamW (train_v2.py:125-132)",
        f"  lr: {row.lr}  # {row.cite('lr')}",
        "  lr_reference_batch: 0",
        f"  weight_decay: {row.weight_decay}  # {row.cite('weight_decay')}: decoupled, every parameter",
        beta_line,
        "  eps: 1.0e-08",
        "  # arcface_torch's AdamW steps the class centers too (train_v2.py:130-132 hands it the",
        "  # PartialFC weight: every row of the shard, each step, lr 0.001, weight decay 0.1). plsc keeps",
        "  # them on sparse momentum SGD (docs/design.md, 'Training semantics'). Their rate and decay are",
        "  # plsc's choice: the rate of arcface_torch's SGD WebFace42M config of the nearest global batch,",
        f"  # {row.center_lr_source}, and its weight decay",
        f"  # {CENTER_WEIGHT_DECAY} (configs/wf42m_pfc02_r100.py:16), following this schedule.",
        "  momentum: 0.9",
        f"  center_lr: {row.center_lr}",
        f"  center_weight_decay: {CENTER_WEIGHT_DECAY}",
        warmup,
        *common_tail,
    ]
    if row.gradient_acc > 1:
        lines += [
            f"  # arcface_torch steps its optimizer every {row.gradient_acc} batches",
            f"  # ({row.cite('gradient_acc')}; train_v2.py:187, 195) on the gradient of their mean",
            "  # loss (loss / gradient_acc, train_v2.py:183), as train.grad_accum does. It samples the",
            "  # class centers and steps its schedule every batch (train_v2.py:138, 199); plsc samples",
            "  # once per optimizer step, from all its batches' labels, and counts the schedule in",
            "  # optimizer steps: each update takes about the rate arcface_torch's takes.",
        ]
    return lines


def _train(row: Row) -> list[str]:
    return [
        "train:",
        f"  batch_size: {row.batch_size}  # per GPU ({row.cite('batch_size')})",
        f"  epochs: {row.num_epoch}  # {row.cite('num_epoch')}",
        f"  grad_accum: {row.gradient_acc}  # gradient_acc: "
        + (row.cite("gradient_acc") if "gradient_acc" in row.lines else "base.py:44"),
        f"  seed: {SEED}  # configs/base.py:47",
        f"  log_interval: {LOG_INTERVAL}  # configs/base.py:37",
        f"  eval_interval: {row.verbose}  # {row.cite('verbose')}",
        "  save_interval: 0  # a checkpoint at the end of every epoch (train_v2.py:216-229)",
        "  keep_checkpoints: 1",
        "  mode: dynamic",
        f"  precision: amp  # fp16 ({row.cite('fp16')}): autocast over float32 weights",
        f"  loss_scale_init: {LOSS_SCALE_INIT}",
        f"  loss_scale_growth_interval: {LOSS_SCALE_GROWTH_INTERVAL}",
        "  loss_scale_growth_factor: 2.0",
        "  loss_scale_backoff_factor: 0.5",
        "  unscale_center_grads: true",
    ]


def render(row: Row) -> str:
    """The YAML text of one configuration (header comment + the five sections)."""
    sections = [_header(row), _data(row), _model(row), _loss(row), _optim(row), _train(row)]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def generate() -> dict[str, str]:
    """File name -> text of every configuration."""
    return {row.file_name: render(row) for row in TABLE}


def write(out_dir: Path) -> list[str]:
    """Write the files into out_dir; returns the names whose content changed (empty on a re-run)."""
    return generated_configs.write(generate(), out_dir)


def check(out_dir: Path) -> list[str]:
    """Problems found in out_dir: missing or differing files, and YAML files the generator does not write."""
    return generated_configs.check(generate(), out_dir, "*.yaml")


def main(argv: list[str] | None = None) -> int:
    return generated_configs.main(argv, __doc__.splitlines()[0], generate(), DEFAULT_OUT, "*.yaml")


if __name__ == "__main__":
    sys.exit(main())
