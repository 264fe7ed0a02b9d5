"""PLSC v2.2's ``tools/*.py`` command lines mapped onto plsc's subcommands (the scripts in tools/ call these).

Each ``*_argv`` function parses the seed tool's flags and returns the equivalent ``plsc`` argument list;
:func:`run` prints nothing of its own and returns what ``plsc`` returns. Differences from PLSC v2.2:

- ``export.py``: ``--is_static`` is accepted and not needed (plsc reads static- and dynamic-mode checkpoints
  alike); ``--backbone`` and ``--embedding_size`` default to what the checkpoint holds instead of
  FresResNet50 / 512, and must agree with it when given.
- ``test_recognition.py``: faces are always detected (``--det`` only chooses the PaddleDetection model of
  ``--det_model_file_path`` over OpenCV's bundled Haar cascade) and always embedded (``--rec`` is implied);
  the index file is plsc's (an .npz whatever its name), so it must be built by plsc too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from plsc.config import finite_float
from plsc.errors import PlscError


def _bool(text: str) -> bool:
    """PLSC's str2bool: true/false, yes/no, 1/0 (any case)."""
    value = text.strip().lower()
    if value in ("true", "yes", "t", "y", "1"):
        return True
    if value in ("false", "no", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {text!r}")


def mx_recordio_2_images_argv(argv: list[str]) -> list[str]:
    p = argparse.ArgumentParser(prog="tools/mx_recordio_2_images.py",
                                description="Extract InsightFace RecordIO: plsc convert rec2images.")
    p.add_argument("--root_dir", required=True, help="folder of train.rec, train.idx (and the .bin sets)")
    p.add_argument("--output_dir", required=True, help="output folder: images/, label.txt and the .bin sets")
    args = p.parse_args(argv)
    root = Path(args.root_dir)
    return ["convert", "rec2images", "--rec", str(root / "train.rec"), "--idx", str(root / "train.idx"),
            "--output", args.output_dir]


def export_argv(argv: list[str]) -> list[str]:
    p = argparse.ArgumentParser(prog="tools/export.py", description="Export a checkpoint: plsc export.")
    p.add_argument("--checkpoint_dir", required=True, help="a plsc or PLSC v2.2 checkpoint folder")
    p.add_argument("--output_dir", required=True, help="output folder")
    p.add_argument("--export_type", choices=["paddle", "onnx"], default="paddle")
    p.add_argument("--is_static", type=_bool, default=False,
                   help="accepted for PLSC compatibility: both modes' checkpoints are read alike")
    p.add_argument("--backbone", default=None, help="e.g. FresResNet50 (default: the checkpoint's)")
    p.add_argument("--embedding_size", type=int, default=None, help="e.g. 512 (default: the checkpoint's)")
    args = p.parse_args(argv)
    plsc_argv = ["export", "--checkpoint", args.checkpoint_dir, "--output", args.output_dir,
                 "--format", args.export_type]
    if args.backbone is not None:
        plsc_argv += ["--backbone", args.backbone]
    if args.embedding_size is not None:
        plsc_argv += ["--embedding-size", str(args.embedding_size)]
    return plsc_argv


def recognition_argv(argv: list[str]) -> list[str]:
    p = argparse.ArgumentParser(
        prog="tools/test_recognition.py",
        description="Face recognition demo: with --build_index, plsc demo index; else plsc demo recognize.",
    )
    p.add_argument("--det", action="store_true", help="detect with the --det_model_file_path model")
    p.add_argument("--det_model_file_path", default=None, help="PaddleDetection inference model (.pdmodel)")
    p.add_argument("--det_params_file_path", default=None, help="its parameters (default: beside it)")
    p.add_argument("--det_thresh", type=finite_float, default=None,
                   help="least detection score (default: 0.5)")
    p.add_argument("--rec", action="store_true", help="accepted for PLSC compatibility: always on")
    p.add_argument("--rec_model_file_path", required=True,
                   help="exported model file (.pdmodel, .json, .onnx), export folder or checkpoint")
    p.add_argument("--rec_params_file_path", default=None, help="the .pdiparams beside the model file")
    p.add_argument("--rec_thresh", type=finite_float, default=None,
                   help="least cosine similarity of a voting candidate (default: the model's, else 0.45)")
    p.add_argument("--build_index", default=None, metavar="INDEX", help="index file to build from --img_dir")
    p.add_argument("--img_dir", default=None, help="gallery folder (with --build_index)")
    p.add_argument("--label", default=None, help="gallery label file (default: IMG_DIR/label.txt)")
    p.add_argument("--index", default=None, help="index file to search (without --build_index)")
    p.add_argument("--input", default=None, help="query image or folder (without --build_index)")
    p.add_argument("--output", default="./output", help="folder for the annotated images (default ./output)")
    p.add_argument("--cdd_num", type=int, default=10, help="nearest gallery faces that vote (default 10)")
    args = p.parse_args(argv)
    _check_params_beside(args.rec_model_file_path, args.rec_params_file_path)
    detector = []
    if args.det and args.det_model_file_path:
        detector += ["--det-model-file-path", args.det_model_file_path]
        if args.det_params_file_path:
            detector += ["--det-params-file-path", args.det_params_file_path]
    if args.det_thresh is not None:
        detector += ["--det-threshold", str(args.det_thresh)]
    if args.build_index:
        if not args.img_dir:
            p.error("--build_index needs --img_dir, the gallery folder")
        label = ["--label", args.label] if args.label else []
        return ["demo", "index", "--gallery", args.img_dir, *label, "--index", args.build_index,
                "--model", args.rec_model_file_path, *detector]
    if not (args.index and args.input):
        p.error("either --build_index with --img_dir, or --index with --input")
    threshold = ["--threshold", str(args.rec_thresh)] if args.rec_thresh is not None else []
    return ["demo", "recognize", "--index", args.index, "--model", args.rec_model_file_path, "--input",
            args.input, "--output", args.output, "--cdd-num", str(args.cdd_num), *threshold, *detector]


def _check_params_beside(model_file: str, params_file: str | None) -> None:
    if params_file is None:
        return
    expected = Path(model_file).with_suffix(".pdiparams")
    if Path(params_file).resolve() != expected.resolve():
        raise PlscError(f"--rec_params_file_path must be the .pdiparams beside the model file ({expected}), "
                        f"got {params_file}")


TOOLS = {
    "mx_recordio_2_images": mx_recordio_2_images_argv,
    "export": export_argv,
    "test_recognition": recognition_argv,
}


def run(tool: str, argv: list[str] | None = None) -> int:
    """Run PLSC v2.2's ``tools/<tool>.py`` command line as the plsc command it maps to."""
    from plsc import cli

    argv = sys.argv[1:] if argv is None else argv
    try:
        plsc_argv = TOOLS[tool](argv)
    except PlscError as exc:
        print(f"plsc: error: {exc}", file=sys.stderr)
        return 2
    return cli.main(plsc_argv)
