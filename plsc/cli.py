"""``plsc``: the command line.

Bad input ends in one ``plsc: error: ...`` line and a non-zero exit code, never a traceback (set
``PLSC_DEBUG=1`` to see one, and Paddle's own console output, which plsc.console otherwise keeps off).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
from pathlib import Path

from plsc.config import finite_float
from plsc.console import quiet_framework
from plsc.errors import PlscError, memory_hint
from plsc.malloc import reexec_with_huge_pages
from plsc.output_paths import require_output_file, require_output_folder


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("--config", default=None,
                   help="YAML config file (see configs/); with --resume the default is <output>/config.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value; repeatable, e.g. --set train.batch_size=64")
    p.add_argument("--output", default=None, help="output folder (default: output/<config name>)")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT_DIR",
                        help="continue from <output>/checkpoints/latest, or from the given checkpoint "
                             "folder; settings that change shapes or the data order must stay as saved")
    resume.add_argument("--resume-weights-only", nargs="?", const=True, default=False,
                        metavar="CHECKPOINT_DIR",
                        help="like --resume, but the optimizer restarts (momentum from zero), the data order "
                             "may change, and with another class count only the backbone is taken (step 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="move another run's checkpoints, best models and log in --output aside "
                        "(to <output>/old-<time>) instead of refusing to start")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train on N local processes (started through paddle.distributed.launch; "
                        "per-rank logs in <output>/log)")
    p.add_argument("--nodes", default=None, metavar="IP,IP,...",
                   help="train on several machines: every node's address, the same list on each node, where "
                        "the same command runs; N processes on each (--nproc). The first node waits "
                        "train.node_wait_s for the others")
    p.set_defaults(run=_run_train)


def _train_config(args):
    """The config to train with and the output folder: --config, or with --resume the run's own config.yaml
    (the settings it was started with, --set overrides included), then this command's --set overrides."""
    from plsc import run_lock
    from plsc.config import load_config

    config_file = args.config
    if config_file is None:
        if not (args.resume or args.resume_weights_only) or args.output is None:
            raise PlscError("train needs --config (or --output RUN_FOLDER --resume to continue that run)")
        config_file = Path(args.output) / "config.yaml"
        if not config_file.is_file():
            # A run writes its config.yaml just after taking the folder's lock: a folder held without one is
            # a run starting, not a folder that is no run.
            run_lock.require_free(args.output, "resume it")
            raise PlscError(f"{config_file} not found: {args.output} is not a run folder; pass --config")
    output = Path(args.output or Path("output") / Path(config_file).stem)
    return load_config(config_file, args.overrides), output


def _require_classes_for_ranks(config, nproc: int) -> None:
    """Every rank owns at least one class: checked on the labels once here, not after N processes have
    started and read them."""
    from plsc.data import build_dataset
    from plsc.distributed import require_classes_per_rank
    from plsc.engine.trainer import require_data_root

    require_data_root(config.data)
    if nproc < 1:  # launch_command refuses it too, but after <output>/log exists
        raise PlscError(f"--nproc must be at least 1, got {nproc}")
    require_classes_per_rank(build_dataset(config.data).num_classes, nproc)


def _continue_command(output: Path, world_size: int) -> str:
    """The command that continues an interrupted run (its settings are in <output>/config.yaml)."""
    command = ["plsc", "train", "--output", str(output), "--resume"]
    if world_size > 1:
        command += ["--nproc", str(world_size)]
    return shlex.join(command)


def _run_train(args) -> int:
    from plsc.engine import run_folder
    from plsc.engine.trainer import Trainer, TrainingInterrupted
    from plsc.nodes import parse_nodes

    config, output = _train_config(args)
    require_output_folder(output, "--output")
    resume = args.resume or args.resume_weights_only
    weights_only = bool(args.resume_weights_only)
    nodes = parse_nodes(args.nodes) if args.nodes is not None else None
    if (args.nproc is not None and args.nproc != 1) or (nodes is not None and len(nodes) > 1):
        from plsc.launch import run_train  # the config loaded: a bad one fails here once, not in N children

        nproc = args.nproc if args.nproc is not None else 1
        world_size = nproc * len(nodes or [None])
        _require_classes_for_ranks(config, world_size)  # before any process starts or folder is made
        # Before <output>/log; the launcher holds the folder for its ranks (they share its lock).
        start = (config, output, resume, weights_only, args.overwrite, world_size)
        resuming_from = run_folder.check_output(*start)
        with run_folder.lock(*start, resuming_from):
            return run_train(nproc, args.argv, output, nodes, config.train.node_wait_s)
    trainer = Trainer(config, output, resume=resume, weights_only=weights_only, overwrite=args.overwrite)
    try:
        result = trainer.run()
    except TrainingInterrupted as exc:
        if trainer.rank == 0:
            print(f"plsc: {exc}; continue with: {_continue_command(output, trainer.comm.world_size)}",
                  file=sys.stderr)
        return 128 + exc.signum
    if trainer.rank == 0:
        _print_metrics(result.last_eval, f"verification at step {result.steps}")
        print(f"checkpoint: {result.last_checkpoint}")
        for name, metrics in result.best.items():
            print(f"best model for {name}: {output / 'best_model' / name} "
                  f"(accuracy {metrics['accuracy']:.4f} at step {metrics['step']})")
        print(f"wall time: {result.wall_time_s:.0f} s")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="verification accuracy on .bin files of a checkpoint, an exported "
                                    "model or a run's best models")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", "--model", dest="model", metavar="PATH",
                       help="a plsc checkpoint (a step folder or best_model/<set>), a PLSC v2.2 checkpoint, "
                            "an export folder (plsc export) or its .json/.pdmodel/.onnx file")
    model.add_argument("--run", dest="run_folder", metavar="DIR",
                       help="a run folder (train --output): each set on the run's best model for it "
                            "(best_model/<set>), a set without one on checkpoints/latest")
    p.add_argument("--bin", dest="bins", action="extend", nargs="+", default=None, metavar="FILE",
                   help="insightface .bin verification files (--bin a.bin b.bin, or repeated); default: the "
                        "data.val_bins of the run's config.yaml or of the plsc checkpoint's saved config")
    p.add_argument("--ijb", default=None, metavar="ROOT",
                   help="IJB-B/IJB-C 1:1 verification (TAR at FAR 1e-6..1e-1) on insightface's IJB layout: "
                        "ROOT/loose_crop and ROOT/meta (instead of .bin files)")
    p.add_argument("--target", choices=["IJBC", "IJBB"], default="IJBC", help="the IJB set (default IJBC)")
    p.add_argument("--roc", default=None, metavar="IMAGE",
                   help="with --ijb: draw the ROC to this file (needs matplotlib: pip install 'plsc[plot]')")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--engine", choices=["auto", "paddle", "dygraph", "onnx"], default="auto",
                   help="for a checkpoint: paddle (Paddle Inference, conv + BatchNorm folded), dygraph (the "
                        "model's own forward), auto (Paddle Inference on the CPU, dygraph on a GPU; "
                        "default); for an export folder holding both formats: paddle or onnx (auto: paddle)")
    _add_model_flags(p)
    p.set_defaults(run=_run_eval, outputs={"json": "file", "roc": "file"})


def _add_model_flags(p) -> None:
    group = p.add_argument_group("PLSC v2.2 checkpoints (detected from the tensors when omitted; must agree)")
    group.add_argument("--backbone", default=None, help="e.g. FresResNet50, FresResNet100, MobileFaceNet_128")
    group.add_argument("--embedding-size", type=int, default=None)
    group.add_argument("--data-format", choices=["NCHW", "NHWC"], default=None,
                       help="the backbone's layout (default: the checkpoint's, else NCHW); exports take NCHW")


def _model_hints(args) -> dict:
    return {"backbone": args.backbone, "embedding_size": args.embedding_size, "data_format": args.data_format}


def _run_eval(args) -> int:
    from plsc.eval.runner import evaluate_model, evaluate_run

    if args.ijb is not None:
        results = _run_ijb(args)
    else:
        if args.roc is not None:
            raise PlscError("--roc draws an IJB ROC: it needs --ijb")
        run = args.run_folder
        evaluate, source = (evaluate_run, run) if run else (evaluate_model, args.model)
        results = evaluate(source, args.bins, args.batch_size, progress=True, engine=args.engine,
                           **_model_hints(args))
        _print_metrics(results, f"verification of {source}")
    if args.json:
        from plsc import strict_json
        from plsc.atomic import write_atomic

        write_atomic(Path(args.json), strict_json.dumps(results, indent=1) + "\n")
    return 0


def _run_ijb(args) -> dict:
    from tabulate import tabulate

    from plsc.eval.ijb import evaluate_ijb
    from plsc.eval.sources import identify, open_model

    if args.run_folder or args.bins:
        raise PlscError("--ijb evaluates one model on an IJB set: give --checkpoint/--model, "
                        "not --run or --bin")
    embed, image_size = open_model(identify(args.model, args.engine), args.engine, **_model_hints(args))
    results = evaluate_ijb(embed, image_size, args.ijb, args.target, args.batch_size, progress=True,
                           roc_output=args.roc)
    (tars,) = [metrics["tar_at_far"] for metrics in results.values()]
    print(f"{args.target} 1:1 verification of {args.model} (TAR at FAR)")
    print(tabulate([[args.target, *tars.values()]], headers=["set", *tars], floatfmt=".4f"))
    return results


def _print_metrics(results: dict, title: str) -> None:
    if not results:
        return
    from tabulate import tabulate

    models = [[m["model"]] if "model" in m else [] for m in results.values()]  # a run's: one per set
    rows = [
        [name, m["accuracy"], m["std"], m["threshold"], m["xnorm"], m["tar_at_far_1e-3"], m["pairs"], *model]
        for (name, m), model in zip(results.items(), models, strict=True)
    ]
    headers = ["set", "accuracy", "std", "threshold", "xnorm", "TAR@FAR=1e-3", "pairs"]
    print(title)
    print(tabulate(rows, headers=headers + (["model"] if any(models) else []), floatfmt=".4f"))


def _add_convert(sub) -> None:
    from plsc.faces import DETECTOR_NAMES

    p = sub.add_parser("convert", help="MXNet RecordIO <-> PLSC's folder layout; verification pairs -> .bin")
    kinds = p.add_subparsers(dest="kind", required=True)
    rec = kinds.add_parser("rec2images", help=".rec/.idx -> images/NNNNNNNN.jpg + label.txt (bytes verbatim)")
    rec.add_argument("--rec", required=True, help="the .rec file")
    rec.add_argument("--idx", default=None, help="its .idx (default: beside the .rec)")
    rec.add_argument("--output", required=True, help="output folder; rerun after an interruption to finish")
    rec.set_defaults(run=_run_rec2images, outputs={"output": "folder"})
    images = kinds.add_parser("images2rec", help="images/ + label.txt -> InsightFace .rec/.idx/property")
    images.add_argument("--root", required=True, help="folder holding label.txt and images/")
    images.add_argument("--label-file", default=None, help="label file inside --root (default: label.txt)")
    images.add_argument("--output", required=True,
                        help="output prefix: writes PREFIX.rec, PREFIX.idx, property")
    images.add_argument("--layout", choices=["auto", "insightface", "im2rec"], default="auto",
                        help="insightface: header and identity records, at most 2**24 records (float32 "
                             "keys); im2rec: images only, keyed in the .idx, any count (arcface_torch's "
                             "WebFace42M layout); auto (default): insightface when it fits")
    images.set_defaults(run=_run_images2rec, outputs={"output": "file"})
    pairs = kinds.add_parser("pairs2bin", help="pairs file ('IMAGE1 IMAGE2 1|0' lines) -> insightface .bin")
    pairs.add_argument("--pairs", required=True, metavar="FILE",
                       help="a pair per line: two image paths relative to --root, then 1 (same person) or 0")
    pairs.add_argument("--root", required=True, help="folder the image paths start from")
    pairs.add_argument("--output", required=True, metavar="X.bin",
                       help="the .bin to write (its stem names the set in plsc eval and training logs)")
    pairs.add_argument("--align", choices=DETECTOR_NAMES, default=None, const="auto", nargs="?",
                       help="the images are photos: cut each one's largest face as plsc prepare does "
                            "(detector as its --detector, default auto); else files are stored as they are")
    pairs.set_defaults(run=_run_pairs2bin, outputs={"output": "file"})


def _run_rec2images(args) -> int:
    from plsc.data.convert import rec_to_images

    summary = rec_to_images(args.rec, args.idx, args.output, progress=True)
    copied = ", ".join(summary.copied) or "-"
    print(f"{summary.images} images of {summary.num_classes} classes in {summary.output} "
          f"({summary.written} written, {summary.skipped} already there); copied: {copied}")
    return 0


def _run_images2rec(args) -> int:
    from plsc.data.convert import images_to_rec

    summary = images_to_rec(args.root, args.label_file, args.output, progress=True, layout=args.layout)
    print(f"{summary.images} images of {summary.num_classes} classes written to {summary.output} "
          f"({summary.layout} layout)")
    return 0


def _run_pairs2bin(args) -> int:
    from plsc.data.verification_bin import bin_name
    from plsc.faces.pairs import pairs_to_bin

    bin_name(args.output)  # a name that cannot name a verification set fails now, not after reading
    count = pairs_to_bin(args.pairs, args.root, args.output, progress=True, align=args.align)
    print(f"{count} pairs written to {args.output}")
    return 0


def _add_prepare(sub) -> None:
    from plsc.faces import DETECTOR_NAMES, FACE_POLICIES, FORMATS

    p = sub.add_parser("prepare", help="photos in one folder per person -> aligned 112x112 faces in PLSC's "
                                       "layout (or .rec), a report, held-out verification pairs")
    p.add_argument("--input", required=True, help="folder with one sub-folder of photos per person")
    p.add_argument("--output", required=True, help="new (or empty) folder for the training set")
    p.add_argument("--format", choices=FORMATS, default="folder",
                   help="folder: images/ + label.txt; rec: train.rec/.idx + property (default: folder)")
    p.add_argument("--faces", choices=FACE_POLICIES, default="largest",
                   help="a photo with several faces: keep the largest, skip the photo, or keep all "
                        "(default: largest); every such photo is listed in OUTPUT/report.tsv")
    p.add_argument("--detector", choices=DETECTOR_NAMES, default="auto",
                   help="mtcnn: five landmarks, faces aligned (pip install 'plsc[faces]'); haar: OpenCV's "
                        "cascade, boxes only, faces centre-cropped; auto: mtcnn when installed")
    p.add_argument("--haar-cascade", default=None, metavar="XML", help="another OpenCV cascade file")
    p.add_argument("--image-size", type=int, default=112, help="side of the crops (default: 112)")
    p.add_argument("--holdout-identities", type=int, default=0, metavar="K",
                   help="keep K people (drawn at random) out of the training set, in OUTPUT/holdout/")
    p.add_argument("--pairs", type=int, default=0, metavar="N",
                   help="draw N verification pairs of the held-out people (half same, half different) "
                        "into OUTPUT/holdout.bin and OUTPUT/holdout_pairs.txt")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out people and pairs (default: 0)")
    p.set_defaults(run=_run_prepare)


def _run_prepare(args) -> int:
    from plsc.faces.prepare import PrepareOptions, prepare

    options = PrepareOptions(
        input=Path(args.input), output=Path(args.output), format=args.format, faces=args.faces,
        detector=args.detector, haar_cascade=args.haar_cascade, image_size=args.image_size,
        holdout_identities=args.holdout_identities, pairs=args.pairs, seed=args.seed,
    )
    summary = prepare(options, progress=True)
    crops = "aligned on five landmarks" if summary.aligned else "centre-cropped (no landmarks: NOT aligned)"
    print(f"{summary.photos} photos of {summary.people} people: "
          f"{summary.faces_written} faces of {summary.identities} people for training, {crops} "
          f"({summary.detector})")
    print(f"no face: {summary.no_face}, several faces: {summary.several_faces} (--faces {args.faces}), "
          f"unreadable: {summary.unreadable}; listed in {Path(args.output) / 'report.tsv'}")
    if summary.people_without_faces:
        print(f"people left out (no face in any photo): {', '.join(summary.people_without_faces)}")
    if summary.holdout_identities:
        print(f"held out: {summary.holdout_faces} faces of {summary.holdout_identities} people in "
              f"{Path(args.output) / 'holdout'}" + (f", {summary.pairs} pairs in "
                                                      f"{Path(args.output) / 'holdout.bin'}" if summary.pairs
                                                      else ""))
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint's backbone for Paddle Inference or ONNX Runtime")
    p.add_argument("--checkpoint", required=True,
                   help="a plsc checkpoint or best_model/<name> folder, or a PLSC v2.2 checkpoint folder")
    p.add_argument("--format", "--export_type", dest="format", choices=["paddle", "onnx"], default="paddle",
                   help="paddle: Paddle Inference files (paddle.jit.save); onnx: converted by paddle2onnx")
    p.add_argument("--output", required=True, help="output folder (gets <name>.* and export.json)")
    p.add_argument("--name", default=None, help="file name stem (default: the backbone name, as PLSC)")
    p.add_argument("--opset", type=int, default=11, help="ONNX opset version")
    _add_model_flags(p)
    p.set_defaults(run=_run_export, outputs={"output": "folder"})


def _run_export(args) -> int:
    from plsc.export import export_checkpoint

    description = export_checkpoint(
        args.checkpoint, args.output, args.format, name=args.name, opset=args.opset, **_model_hints(args)
    )
    files = description["artifacts"][args.format]["files"]
    print(f"exported {description['model']['name']} to {args.output}: {', '.join(files)}, export.json")
    return 0


def _add_infer(sub) -> None:
    p = sub.add_parser("infer", help="embed images with an exported model")
    p.add_argument("--model", required=True, help="export folder (with export.json), or a model file")
    p.add_argument("--images", required=True, help="an image file, or a folder (searched recursively)")
    p.add_argument("--engine", choices=["paddle", "onnx"], default=None,
                   help="Paddle Inference or onnxruntime (default: paddle if exported, else onnx)")
    p.add_argument("--output", default=None, metavar="F.npy",
                   help="write the embeddings [N, E] here and the image list to F.txt (default: print them)")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(run=_run_infer, outputs={"output": "file"})


def _run_infer(args) -> int:
    from plsc.export import embeddings_path, run_inference, save_embeddings

    if args.output:
        embeddings_path(args.output)  # a bad name fails now, not after the whole run
    paths, embeddings = run_inference(args.model, args.images, args.engine, args.batch_size, progress=True)
    if args.output:
        save_embeddings(args.output, paths, embeddings, args.images)
        print(f"{len(paths)} embeddings of size {embeddings.shape[1]} written to {args.output}")
        return 0
    for path, embedding in zip(paths, embeddings, strict=True):
        head = " ".join(f"{value:.4f}" for value in embedding[:4])
        print(f"{path}\tnorm {float((embedding ** 2).sum()) ** 0.5:.4f}\t[{head} ...]")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="face recognition demo: index a gallery, name the faces in a photo")
    steps = p.add_subparsers(dest="step", required=True)
    index = steps.add_parser("index", help="embed the largest face of each gallery image into an index file")
    index.add_argument("--gallery", required=True, help="gallery folder (label file paths start there)")
    index.add_argument("--label", default=None, metavar="FILE",
                       help="IMAGE<TAB>NAME per line (default: GALLERY/label.txt)")
    index.add_argument("--index", required=True, metavar="OUT", help="index file to write (an .npz)")
    _add_demo_model_flags(index, "crop margin per side, a fraction of the face box (default: 0.05)")
    index.set_defaults(run=_run_demo_index, outputs={"index": "file"})
    rec = steps.add_parser("recognize", help="detect the faces of an image (or folder) and name them")
    rec.add_argument("--index", required=True, help="index file from plsc demo index (same --model)")
    rec.add_argument("--input", required=True, help="an image, or a folder of images (searched recursively)")
    rec.add_argument("--output", required=True, help="folder for each annotated image and its .json")
    rec.add_argument("--cdd-num", "--cdd_num", type=int, default=10,
                     help="nearest gallery faces that vote for a name (default: 10)")
    rec.add_argument("--threshold", type=finite_float, default=None,
                     help="least cosine similarity of a voting candidate (default: the model's verification "
                          "threshold when its checkpoint records one, else 0.45)")
    rec.add_argument("--font", default=None, help="TrueType/OpenType font for the names (needs Pillow)")
    _add_demo_model_flags(rec, "crop margin per side (default: the index's)")
    rec.set_defaults(run=_run_demo_recognize, outputs={"output": "folder"})


def _add_demo_model_flags(p, margin_help: str) -> None:
    from plsc.faces import DETECTOR_NAMES

    p.add_argument("--model", required=True,
                   help="export folder, model file (Paddle Inference, ONNX), or plsc/PLSC v2.2 checkpoint")
    p.add_argument("--engine", choices=["paddle", "onnx"], default=None, help="for an export holding both")
    p.add_argument("--margin", type=finite_float, default=None, help=margin_help)
    group = p.add_argument_group("face detector (default: plsc prepare's, MTCNN when installed, else Haar)")
    group.add_argument("--detector", choices=DETECTOR_NAMES, default="auto",
                       help="mtcnn: five landmarks, faces aligned as plsc prepare aligns them; haar: "
                            "OpenCV's cascade, faces centre-cropped (as data/tiny was cut); auto: mtcnn when "
                            "installed")
    group.add_argument("--det-model-file-path", "--det_model_file_path", default=None, metavar="FILE",
                       help="a PaddleDetection inference model instead, e.g. BlazeFace's inference.pdmodel")
    group.add_argument("--det-params-file-path", "--det_params_file_path", default=None, metavar="FILE",
                       help="its parameters (default: beside it, .pdiparams)")
    group.add_argument("--det-threshold", type=finite_float, default=None,
                       help="its least score (default: 0.5)")
    group.add_argument("--haar-cascade", default=None, metavar="XML", help="another OpenCV cascade file")


def _demo_detector(args) -> dict:
    from plsc.demo.pipeline import detector_options

    return detector_options(args.det_model_file_path, args.det_params_file_path, args.det_threshold,
                            args.haar_cascade, args.detector)


def _run_demo_index(args) -> int:
    from plsc.demo import build_index

    index = build_index(args.gallery, args.model, args.index, args.label, args.engine, _demo_detector(args),
                        args.margin)
    print(f"{len(index.names)} gallery faces of {len(set(index.names))} people "
          f"({int((~index.detected).sum())} whole images, no face found) indexed in {args.index}")
    return 0


def _run_demo_recognize(args) -> int:
    from plsc.demo import recognize

    results = recognize(args.index, args.model, args.input, args.output, args.cdd_num, args.threshold,
                        args.font, args.engine, _demo_detector(args), args.margin)
    for result in results:
        names = ", ".join(f"{face['name']} ({face['score']:.2f})" for face in result["faces"]) or "no face"
        print(f"{result['input']}: {names}")
    print(f"annotated images and JSON in {args.output}")
    return 0


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="draw loss, learning rate and verification accuracy against the step "
                                    "from runs' train_log.jsonl (needs matplotlib: pip install 'plsc[plot]')")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run folders (train --output) or their train_log.jsonl; several share each panel")
    p.add_argument("--output", default="curves.png", metavar="FILE",
                   help="the image to write (default: curves.png); its suffix picks the format (.png, .svg)")
    p.set_defaults(run=_run_plot)


def _run_plot(args) -> int:
    from plsc.engine.curves import plot_runs

    plot_runs(args.runs, args.output)
    print(f"curves of {', '.join(args.runs)} drawn in {args.output}")
    return 0


def _add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="check that this machine can train: versions, Paddle's own check, fast "
                                      "paths, 5-step runs; a pass/fail table with what to do")
    p.add_argument("--output", default="output/doctor", help="folder for the logs (default: output/doctor)")
    p.set_defaults(run=_run_doctor, outputs={"output": "folder"})


def _run_doctor(args) -> int:
    from plsc.doctor import run_doctor

    return run_doctor(Path(args.output))


def _add_bench(sub) -> None:
    from plsc.bench import add_bench_parser

    add_bench_parser(sub)


def _add_capacity(sub) -> None:
    from plsc.capacity import FIXED_OVERHEAD_MIB  # numpy only: --help stays fast

    p = sub.add_parser("capacity", help="classes that fit: plsc's memory model (plsc/capacity.py)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--predict", action="store_true",
                      help="predict the largest class count whose peak memory fits the device, per rank")
    p.add_argument("--config", required=True, help="YAML config of the run (batch, embedding, ratio, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value; repeatable")
    memory = p.add_mutually_exclusive_group(required=True)
    memory.add_argument("--device-memory-mib", type=finite_float, metavar="M",
                        help="memory of one device in MiB, as nvidia-smi reports it (a V100-32G: 32510)")
    memory.add_argument("--device-memory-gib", type=finite_float, metavar="G", help="the same in GiB")
    p.add_argument("--world-size", type=int, default=1, metavar="N", help="ranks (devices) sharing classes")
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu",
                   help="gpu: fused margin loss, FP16 activations, checkpoint copies on the host; "
                        "cpu: everything in host memory (default: gpu)")
    defaults = ", ".join(f"{mib} on {device}" for device, mib in FIXED_OVERHEAD_MIB.items())
    p.add_argument("--fixed-overhead-mib", type=finite_float, default=None, metavar="M",
                   help=f"per-device memory outside the model (default: {defaults})")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the prediction as JSON")
    p.set_defaults(run=_run_capacity, outputs={"json": "file"})


def _run_capacity(args) -> int:
    from plsc.capacity import GIB, MIB, describe, memory_model, predict, setting_from_config
    from plsc.config import load_config

    config = load_config(args.config, args.overrides, reads_data=False)  # a prediction opens no data
    overhead = None if args.fixed_overhead_mib is None else int(args.fixed_overhead_mib * MIB)
    if args.device_memory_mib is not None:
        memory = int(args.device_memory_mib * MIB)
    else:
        memory = int(args.device_memory_gib * GIB)
    setting = setting_from_config(config, memory, args.world_size, args.device, overhead)
    prediction = predict(memory_model(config, setting))
    print(describe(prediction))
    if args.json:
        from plsc import strict_json
        from plsc.atomic import write_atomic

        write_atomic(Path(args.json), strict_json.dumps(prediction.to_dict(), indent=1) + "\n")
    return 0


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="what a run will do before it starts: world size, batch, steps, learning "
                                    "rates, memory per device, backbone size, departures from PLSC v2.2")
    p.add_argument("--config", required=True, help="YAML config of the run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value; repeatable")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="ranks of the run (default: as paddle.distributed.launch set them, else 1)")
    p.add_argument("--images", type=int, default=None, metavar="N",
                   help="training images (default: counted from data.root's label file or .rec index)")
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu",
                   help="the memory prediction's device, as plsc capacity (default: gpu)")
    p.add_argument("--device-memory-gib", type=finite_float, default=32.0, metavar="G",
                   help="memory of one device, to say whether the run fits (default: 32, a V100 32G)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the plan as JSON")
    p.set_defaults(run=_run_plan, outputs={"json": "file"})


def _run_plan(args) -> int:
    from plsc.capacity import GIB, memory_model, setting_from_config
    from plsc.config import load_config
    from plsc.distributed import launched_world_size
    from plsc.engine.plan import MemoryPrediction, describe_plan, make_plan, planned_data
    from plsc.models.cost import shared_scratch_builds

    config = load_config(args.config, args.overrides, reads_data=False)  # only the data it counts is read
    world = launched_world_size() if args.gpus is None else args.gpus
    if world < 1:
        raise PlscError(f"--gpus must be >= 1, got {world}")
    images, source, num_classes = planned_data(config, args.images)
    setting = setting_from_config(config, int(args.device_memory_gib * GIB), world, args.device)
    with shared_scratch_builds():  # the plan's cost and the memory model read one build of the backbone
        plan = make_plan(config, world, images, source, num_classes)  # refuses bad counts before any probe
        model = memory_model(config, setting)
    memory = MemoryPrediction(model.peak(num_classes), model.binding_phase(num_classes), args.device,
                              setting.device_memory_bytes)
    plan = dataclasses.replace(plan, memory=memory)
    print(describe_plan(plan))
    if args.json:
        from plsc import strict_json
        from plsc.atomic import write_atomic

        write_atomic(Path(args.json), strict_json.dumps(plan.to_dict(), indent=1) + "\n")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage mistakes in one line, like every other plsc error (argparse prints the whole usage first;
    ``--help`` still shows it). Subcommand parsers are of the same class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _check_outputs(args) -> None:
    """Every path a command will write (its ``outputs``: option name -> "folder" or "file"), checked
    before the command does any work."""
    for name, kind in getattr(args, "outputs", {}).items():
        value = getattr(args, name)
        if value is not None:
            flag = "--" + name.replace("_", "-")
            (require_output_folder if kind == "folder" else require_output_file)(value, flag)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="plsc", description="Paddle Large Scale Classification")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_eval, _add_prepare, _add_convert, _add_export, _add_infer, _add_demo,
                _add_bench, _add_capacity, _add_plan, _add_plot, _add_doctor):
        add(sub)
    return parser


def _setup_console() -> None:
    """plsc's own lines as ``HH:MM:SS LEVEL message``; Paddle's noise off (plsc.console)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    # On plsc's loggers, not the root: Paddle 2.6 sets the root logger to WARNING when it is imported.
    logging.getLogger("plsc").setLevel(logging.INFO)
    quiet_framework()


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command line (not a call from Python): start over with plsc's malloc settings
        reexec_with_huge_pages("plsc.cli", sys.argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc hands on to each process
    _setup_console()
    try:
        with memory_hint("", "the sizes in the settings (train.batch_size, data.image_size, "
                             "model.embedding_size, --batch-size)"):
            _check_outputs(args)
            return args.run(args)
    except PlscError as exc:
        if os.environ.get("PLSC_DEBUG"):
            raise
        print(f"plsc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("plsc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (plsc ... | head): end quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
