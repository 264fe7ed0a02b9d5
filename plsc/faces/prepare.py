"""``plsc prepare``: one folder per person, photos of any size -> aligned 112x112 face crops in PLSC's layout
(or InsightFace's RecordIO), an identities file, a report of the photos that were not used as they are, and
optionally held-out people with verification pairs.

Input: ``INPUT/<person>/<photo>`` (photos anywhere below a person's folder). Output (folder format)::

    OUTPUT/images/NNNNNNNN.jpg   aligned crops of the training people
    OUTPUT/label.txt             images/NNNNNNNN.jpg<TAB>label (plsc.data.folder's layout)
    OUTPUT/identities.txt        label<TAB>person folder name
    OUTPUT/report.tsv            photo<TAB>faces found<TAB>what was done, for every photo not used as one face
    OUTPUT/prepare.json          settings and counts
    OUTPUT/holdout/...           the held-out people, same layout (--holdout-identities)
    OUTPUT/holdout.bin           their verification pairs (--pairs), insightface's format
    OUTPUT/holdout_pairs.txt     the same pairs as 'holdout/images/A holdout/images/B 1|0' lines

With ``--format rec`` the training crops go to ``OUTPUT/train.rec``, ``train.idx`` and ``property`` instead of
``images/`` and ``label.txt``. Output file names are numbers: no name from the input becomes a path.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from plsc import strict_json
from plsc.atomic import write_atomic
from plsc.console import Progress
from plsc.data.folder import IMAGE_SUFFIXES, read_image
from plsc.data.recordio import write_insightface
from plsc.errors import PlscError
from plsc.faces import FACE_POLICIES, FORMATS
from plsc.faces.align import TEMPLATE_SIZE, encode_jpeg, face_crop, template_for
from plsc.faces.detect import largest_face, open_face_detector
from plsc.faces.pairs import draw_pairs, pairs_to_bin
from plsc.names import path_component

log = logging.getLogger("plsc.faces")



@dataclass
class PrepareOptions:
    input: Path
    output: Path
    format: str = "folder"
    faces: str = "largest"
    detector: str = "auto"  # plsc.faces.detect.DETECTOR_NAMES
    haar_cascade: str | None = None
    image_size: int = TEMPLATE_SIZE
    holdout_identities: int = 0
    pairs: int = 0
    seed: int = 0


@dataclass
class Crop:
    person: str
    source: str  # the photo, relative to the input folder
    jpeg: bytes


@dataclass
class PrepareSummary:
    photos: int = 0
    people: int = 0
    faces_written: int = 0
    identities: int = 0
    no_face: int = 0
    several_faces: int = 0
    unreadable: int = 0
    holdout_identities: int = 0
    holdout_faces: int = 0
    pairs: int = 0
    detector: str = ""
    aligned: bool = True
    people_without_faces: list[str] = field(default_factory=list)
    output: str = ""


def prepare(options: PrepareOptions, progress: bool = True) -> PrepareSummary:
    """Detect, align and write every person's faces (see the module); everything is checked before the
    photos are read, and the label file is written last."""
    _check_options(options)
    people = list_people(options.input)
    check_empty_output(options.output)
    detector = open_face_detector(options.detector, options.haar_cascade)
    summary = PrepareSummary(people=len(people), detector=detector.name, aligned=detector.landmarks,
                             output=str(options.output))
    if not detector.landmarks:
        log.warning("%s finds no landmarks: faces are centre-cropped from its boxes, not aligned",
                    detector.name)
    crops, report = _detect_all(people, options, detector, summary, progress)
    found = {crop.person for crop in crops}
    summary.people_without_faces = [name for name, _ in people if name not in found]
    options.output.mkdir(parents=True, exist_ok=True)
    write_atomic(options.output / "report.tsv", "photo\tfaces\toutcome\n" + "".join(report))
    if not crops:
        raise PlscError(f"{options.input}: no face found in any photo (see {options.output / 'report.tsv'})")
    training, holdout = _split_people(sorted(found), options)
    holdout_samples = _labelled(crops, holdout)
    # drawn before anything else is written: too few pairs stops the run with only the report written
    pairs = []
    if options.pairs:
        pairs = draw_pairs([label for _, label in holdout_samples], options.pairs, options.seed)
    summary.identities = len(training)
    summary.faces_written = _write_training(crops, training, options)
    if holdout:
        _write_holdout(holdout_samples, holdout, pairs, options)
        summary.holdout_identities, summary.holdout_faces = len(holdout), len(holdout_samples)
        summary.pairs = len(pairs)
    write_atomic(options.output / "prepare.json",
                 strict_json.dumps({"settings": _settings(options), **asdict(summary)}, indent=1) + "\n")
    return summary


def _check_options(options: PrepareOptions) -> None:
    if options.format not in FORMATS:
        raise PlscError(f"--format must be one of {', '.join(FORMATS)}, got {options.format!r}")
    if options.faces not in FACE_POLICIES:
        raise PlscError(f"--faces must be one of {', '.join(FACE_POLICIES)}, got {options.faces!r}")
    if options.holdout_identities < 0 or options.pairs < 0:
        raise PlscError("--holdout-identities and --pairs must be >= 0")
    template_for(options.image_size)  # a size the template cannot take fails before any photo is read
    if options.pairs and options.holdout_identities < 2:
        raise PlscError("--pairs needs --holdout-identities of at least 2 (different-person pairs need two)")


def _settings(options: PrepareOptions) -> dict:
    return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(options).items()}


# ----------------------------------------------------------------------------------------------------------
# Input and output folders


def list_people(input_dir: Path) -> list[tuple[str, list[Path]]]:
    """(person, photos) per sub-folder of ``input_dir``, sorted; hidden entries are ignored."""
    if not input_dir.is_dir():
        raise PlscError(f"--input is not a folder: {input_dir}")
    people = []
    for folder in sorted(p for p in input_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        name = person_name(folder.name, folder)
        photos = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                        and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        if photos:
            people.append((name, photos))
    if not people:
        raise PlscError(f"{input_dir}: no person folders with images ({', '.join(IMAGE_SUFFIXES)}) in it; "
                        "expected INPUT/<person>/<photo>")
    return people


def person_name(name: str, folder: Path) -> str:
    """The folder's name as it goes into identities.txt (a tab-separated line per person)."""
    path_component(name, str(folder))
    if any(char in name for char in "\t\r\n"):
        raise PlscError(f"{folder}: a person's folder name cannot hold a tab or a line break: rename it")
    return name


def check_empty_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise PlscError(f"--output {output} exists and is not an empty folder: choose a new one")


# ----------------------------------------------------------------------------------------------------------
# Detection


def _detect_all(people, options: PrepareOptions, detector, summary: PrepareSummary, progress: bool):
    """Every photo's crops, and the report lines of the photos not used as exactly one face."""
    crops, report = [], []
    total = sum(len(photos) for _, photos in people)
    with Progress(total, "detect + align", "photos", enabled=progress) as bar:
        for name, photos in people:
            for photo in photos:
                source = photo.relative_to(options.input).as_posix()
                line = _detect_photo(photo, name, source, options, detector, crops, summary)
                if line:
                    report.append(line)
                bar.update(1)
    summary.photos = total
    return crops, report


def _detect_photo(photo, name, source, options, detector, crops, summary) -> str | None:
    """Append the photo's crops per the faces policy; the report line when it is not one face."""
    try:
        image = read_image(photo)
    except PlscError:
        summary.unreadable += 1
        return f"{source}\t-\tskipped: unreadable\n"
    faces = detector(image)
    if not faces:
        summary.no_face += 1
        return f"{source}\t0\tskipped: no face found\n"
    if len(faces) > 1:
        summary.several_faces += 1
        if options.faces == "skip":
            return f"{source}\t{len(faces)}\tskipped: several faces (--faces skip)\n"
    kept = faces if options.faces == "all" else [largest_face(faces)]
    crops.extend(Crop(name, source, encode_jpeg(face_crop(image, face, options.image_size))) for face in kept)
    if len(faces) > 1:
        outcome = "all kept (--faces all)" if options.faces == "all" else "largest kept (--faces largest)"
        return f"{source}\t{len(faces)}\t{outcome}\n"
    return None


def _split_people(people: list[str], options: PrepareOptions) -> tuple[list[str], list[str]]:
    """(training people, held-out people): ``holdout_identities`` drawn at random (seeded)."""
    count = options.holdout_identities
    if count == 0:
        return people, []
    if count >= len(people):
        raise PlscError(f"--holdout-identities {count} leaves no one to train on: {len(people)} people have "
                        "faces")
    chosen = set(np.random.default_rng(options.seed).choice(len(people), count, replace=False).tolist())
    training = [person for n, person in enumerate(people) if n not in chosen]
    return training, [person for n, person in enumerate(people) if n in chosen]


# ----------------------------------------------------------------------------------------------------------
# Writing


def _labelled(crops: list[Crop], people: list[str]) -> list[tuple[Crop, int]]:
    labels = {name: label for label, name in enumerate(people)}
    return [(crop, labels[crop.person]) for crop in crops if crop.person in labels]


def _write_identities(folder: Path, people: list[str]) -> None:
    lines = "".join(f"{label}\t{name}\n" for label, name in enumerate(people))
    write_atomic(folder / "identities.txt", lines)


def write_image_folder(folder: Path, samples: list[tuple[Crop, int]]) -> list[str]:
    """``folder/images/NNNNNNNN.jpg`` and ``folder/label.txt`` (written last); the relative image names."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for number, (crop, _) in enumerate(samples, 1):
        names.append(f"images/{number:08d}.jpg")
        write_atomic(folder / names[-1], crop.jpeg, durable=False)
    lines = "".join(f"{name}\t{label}\n" for name, (_, label) in zip(names, samples, strict=True))
    write_atomic(folder / "label.txt", lines)
    return names


def _write_training(crops: list[Crop], people: list[str], options: PrepareOptions) -> int:
    samples = _labelled(crops, people)
    _write_identities(options.output, people)
    if options.format == "rec":
        write_insightface(options.output / "train", [(crop.jpeg, label) for crop, label in samples],
                          image_size=(options.image_size, options.image_size))
    else:
        write_image_folder(options.output, samples)
    return len(samples)


def _write_holdout(samples: list[tuple[Crop, int]], people: list[str], pairs: list[tuple[int, int, bool]],
                   options: PrepareOptions) -> None:
    """The held-out people as a folder of their own, and their ``pairs`` (indices into ``samples``) as a .bin
    and the pairs file it is made of."""
    folder = options.output / "holdout"
    names = write_image_folder(folder, samples)
    _write_identities(folder, people)
    if not pairs:
        return
    lines = "".join(f"holdout/{names[a]}\tholdout/{names[b]}\t{int(same)}\n" for a, b, same in pairs)
    write_atomic(options.output / "holdout_pairs.txt", lines)
    # The .bin that `plsc convert pairs2bin` makes of that file: one way to build a .bin
    pairs_to_bin(options.output / "holdout_pairs.txt", options.output, options.output / "holdout.bin",
                 progress=False)


__all__ = ["FACE_POLICIES", "FORMATS", "PrepareOptions", "PrepareSummary", "prepare"]
