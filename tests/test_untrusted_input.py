"""Input that is wrong, damaged or hostile: never a silently wrong result, never unbounded work for a small
file, always one line (no traceback).

Each class of fault is tested through the functions that meet it; the command line only where the single
line of output is the point.
"""

from __future__ import annotations

import json
import math
import pickle
import random
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import paddle
import pytest

from plsc import checkpoint as ckpt
from plsc import cli, safe_pickle, strict_json
from plsc.checkpoint import plsc22
from plsc.checkpoint.shards import FileRows, RowPieces
from plsc.config import ConfigError, load_config, parse_override
from plsc.data.folder import FolderDataset
from plsc.data.recordio import IRHeader, RecordDataset, RecordWriter, pack
from plsc.data.verification_bin import load_bin
from plsc.demo.index import load_index
from plsc.engine import trainer as trainer_module
from plsc.errors import PlscError, memory_hint
from plsc.eval.verification import evaluate
from plsc.export.exporter import EXPORT_JSON, read_description
from plsc.output_paths import require_output_file, require_output_folder

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.name=iresnet18", "model.width=0.125", "model.embedding_size=16", "data.image_size=32",
        "data.num_workers=0", "data.val_bins=[]", "train.batch_size=16", "train.max_steps=1"]


def jpeg() -> bytes:
    ok, data = cv2.imencode(".jpg", np.full((8, 8, 3), 128, np.uint8))
    assert ok
    return data.tobytes()


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


# ------------------------------------------------------------------------------------------------------------
# 6. Silent wrong results


def write_records(path: Path, labels) -> None:
    with RecordWriter(path, path.with_suffix(".idx")) as writer:
        for key, label in enumerate(labels):
            writer.write(pack(IRHeader(0, label, key, 0), jpeg()), key=key)


@pytest.mark.parametrize("label", [math.inf, math.nan, 1e15, 2.0**24, 16777217.0, -1.0])
def test_recordio_label_must_be_a_class(tmp_path, label):
    # inf once became class -9223372036854775808; 16777217 is stored as float32 16777216 (rounded).
    rec = tmp_path / "labels.rec"
    write_records(rec, [0.0, label])
    with pytest.raises(PlscError, match=r"labels\.rec: key 1: label \S+ is not a non-negative integer below"):
        RecordDataset(rec)


def test_recordio_largest_exact_label_is_a_class(tmp_path):
    rec = tmp_path / "labels.rec"
    write_records(rec, [0.0, 2.0**24 - 1])
    assert RecordDataset(rec).labels.tolist() == [0, 2**24 - 1]


def test_recordio_header_naming_more_images_than_records_is_refused_at_once(tmp_path):
    rec = tmp_path / "header.rec"
    with RecordWriter(rec, rec.with_suffix(".idx")) as writer:
        writer.write(pack(IRHeader(2, (1e15, 1e15 + 1), 0, 0), b""), key=0)  # keys 1..1e15-1 "are images"
        writer.write(pack(IRHeader(0, 0.0, 1, 0), jpeg()), key=1)
    with pytest.raises(PlscError, match=r"header\.rec: header record says images are keys 1\.\.1e\+15-1, but "
                                        r"the file has 2 records"):
        RecordDataset(rec)


@pytest.mark.parametrize("label", [str(2**40), str(2**31), "\u0663", "+3", "3_000", "9" * 5000, "-1"])
def test_folder_label_must_be_a_class(tmp_path, label):
    # int() reads "\u0663" (Arabic-Indic three), "+3" and "3_000"; 2**40 once sized a 70 TB class matrix.
    (tmp_path / "label.txt").write_text(f"images/a.jpg\t0\nimages/b.jpg\t{label}\n")
    message = r"label\.txt line 2: label '[^']{1,24}' is not a non-negative integer below 2147483648$"
    with pytest.raises(PlscError, match=message):
        FolderDataset(tmp_path)


def test_duplicate_yaml_keys_are_an_error(tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text("model:\n  width: 0.5\n  width: 0.25\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: line 3: key 'width' is given twice"):
        load_config(config)
    config.write_text("model: {width: 0.5}\nmodel: {name: iresnet18}\n")
    with pytest.raises(ConfigError, match=r"line 2: key 'model' is given twice"):
        load_config(config)


def test_yaml_merge_keys_still_override(tmp_path):
    # "<<: *base" then a key of its own is YAML's way to override, not a duplicate.
    config = tmp_path / "merge.yaml"
    config.write_text("model:\n  <<: &base {width: 0.5, embedding_size: 64}\n  width: 0.25\n")
    loaded = load_config(config)
    assert (loaded.model.width, loaded.model.embedding_size) == (0.25, 64)


def test_strict_json_writes_null_for_undefined_numbers():
    value = {"a": math.nan, "b": [np.float32("inf"), 1.5, np.float64("-inf")], "c": np.int64(3),
             "d": (np.bool_(True), None), "e": "NaN"}

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    parsed = json.loads(strict_json.dumps(value, indent=1), parse_constant=refuse)
    assert parsed == {"a": None, "b": [None, 1.5, None], "c": 3, "d": [True, None], "e": "NaN"}


def test_strict_json_reads_only_json():
    for text in ("NaN", '{"a": Infinity}', "[-Infinity]", "[" * 5000 + "]" * 5000, '{"a": 1'):
        with pytest.raises(ValueError):
            strict_json.loads(text)
    assert strict_json.loads('{"a": [1, null, 2.5]}') == {"a": [1, None, 2.5]}


@pytest.mark.parametrize("text", ["[" * 5000, '{"model": NaN}'])
def test_export_description_that_is_not_json_is_one_line(tmp_path, text):
    (tmp_path / EXPORT_JSON).write_text(text)
    with pytest.raises(PlscError, match=r"export\.json: corrupt export description \("):
        read_description(tmp_path)


def test_demo_index_whose_meta_is_not_an_object_is_one_line(tmp_path):
    path = tmp_path / "gallery.npz"
    empty = np.zeros((0, 4), np.float32)
    np.savez(path, embeddings=empty, names=np.array([], str), paths=np.array([], str), boxes=np.zeros((0, 4)),
             detected=np.zeros(0, bool), probe=empty, meta=np.array("[]"))
    with pytest.raises(PlscError, match=r"gallery\.npz is not a plsc demo index"):
        load_index(path)


# The checkpoint manifest is written by the manifest-schema code (plsc/checkpoint/__init__.py), which holds
# no floats of its own beyond the validated (finite) config.
JSON_WRITERS_ELSEWHERE = {}


def test_every_json_writer_is_strict():
    found = {}
    for path in sorted((ROOT / "plsc").rglob("*.py")):
        name = str(path.relative_to(ROOT))
        count = len(re.findall(r"(?<![\w.])json\.dumps?\(", path.read_text()))
        if count and name != "plsc/strict_json.py":
            found[name] = count
    assert found == JSON_WRITERS_ELSEWHERE


def poisoned_backbone(directory: Path, key_part: str, value: float) -> str:
    model = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4))
    state = {key: tensor.numpy() for key, tensor in model.state_dict().items()}
    (key,) = [key for key in state if key_part in key]
    state[key].flat[2] = value
    directory.mkdir(parents=True, exist_ok=True)
    paddle.save({k: paddle.to_tensor(v) for k, v in state.items()}, str(directory / ckpt.BACKBONE))
    return key


@pytest.mark.parametrize("key_part, value",
                         [("_variance", math.nan), ("_mean", math.inf), ("0.weight", -math.inf)])
def test_checkpoint_with_non_finite_weights_is_refused_naming_the_tensor(tmp_path, key_part, value):
    key = poisoned_backbone(tmp_path, key_part, value)
    with pytest.raises(PlscError, match=rf"backbone\.pdparams: tensor {key} holds 1 non-finite value "):
        ckpt.load_backbone_state(tmp_path)


def test_optimizer_state_with_nan_names_the_nested_tensor(tmp_path):
    state = {"conv.w_velocity_0": np.zeros(3, np.float32), "LR_Scheduler": {"last_lr": 0.1},
             "master_weights": {"conv.w": np.array([1.0, np.nan], np.float32)}}
    with open(tmp_path / ckpt.OPTIMIZER, "wb") as f:
        pickle.dump(state, f, protocol=4)
    with pytest.raises(PlscError, match=r"tensor master_weights/conv\.w holds 1 non-finite value"):
        ckpt.load_optimizer_state(tmp_path)


def test_plsc22_tensor_with_inf_is_refused_naming_it(tmp_path):
    path = tmp_path / "batch_norm_0.w_2.pdparam"
    tensor = np.array([1, np.inf, np.inf], np.float32)
    path.write_bytes(pickle.dumps(("batch_norm_0.w_2", tensor), protocol=4))
    message = r"tensor batch_norm_0\.w_2 holds 2 non-finite values \(nan or inf\) of 3;"
    with pytest.raises(PlscError, match=message):
        plsc22.read_tensor_file(path)


def test_center_shard_with_nan_is_refused_naming_the_rows(tmp_path):
    centers = np.ones((10, 4), np.float32)
    centers[6, 1] = np.nan
    np.save(tmp_path / "rank00000.weight.npy", centers)
    pieces = RowPieces([FileRows(tmp_path / "rank00000.weight.npy", 0, 10)], 4, np.float32)
    with pytest.raises(PlscError, match=r"rank00000\.weight\.npy: tensor rows 4\.\.7 holds 1 non-finite"):
        for _ in pieces.blocks(block_rows=4):
            pass


def test_verification_refuses_nan_embeddings_instead_of_reporting_chance():
    embeddings = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    embeddings[5, 0] = np.nan
    with pytest.raises(PlscError, match=r"nan or inf embeddings \(1 values of 320\)"):
        evaluate(embeddings, np.arange(20) % 2 == 0)


# ------------------------------------------------------------------------------------------------------------
# 7. Bounded work for bounded input

ALIAS_BOMB = "".join(
    [f'a: &a [{",".join(["lol"] * 9)}]\n']
    + [f"{b}: &{b} [{','.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefg", "bcdefgh", strict=True)]
    + ["model: {width: *h}\n"]
)  # 9**8 = 43 million values in under 400 bytes


def test_yaml_alias_expansion_is_bounded(tmp_path):
    config = tmp_path / "bomb.yaml"
    config.write_text(ALIAS_BOMB)
    assert config.stat().st_size < 400
    with pytest.raises(ConfigError) as error:
        load_config(config)
    assert "expands to more than 10000 values" in str(error.value) and len(str(error.value)) < 200


def test_yaml_recursive_alias_and_deep_nesting_are_one_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: &m\n  width: 0.5\n  name: *m\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: line 1: an alias refers to a node containing it"):
        load_config(config)
    config.write_text("model: {width: " + "[" * 5000 + "]" * 5000 + "}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: nested too deeply"):
        load_config(config)
    with pytest.raises(ConfigError, match=r"^override 'model\.width=&a \[1, \*a\]': line 1: an alias refers"):
        parse_override("model.width=&a [1, *a]")


def test_error_messages_show_a_bounded_part_of_a_large_value(tmp_path):
    config = tmp_path / "big.yaml"
    config.write_text("model:\n  width: [" + ", ".join(["1234567"] * 5000) + "]\n")
    with pytest.raises(ConfigError) as error:
        load_config(config)
    message = str(error.value)
    assert message.startswith(f"{config}: model.width: expected a number, got [") and len(message) < 200


def naive_tree_size(value) -> int:
    children = []
    if isinstance(value, dict):
        children = [*value.keys(), *value.values()]
    elif isinstance(value, (list, tuple)):
        children = list(value)
    return 1 + sum(naive_tree_size(child) for child in children)


def random_shared_structure(rng: random.Random):
    pool = [1, 2.5, "s", b"b", None, True]
    for _ in range(30):
        kind = rng.choice(["list", "tuple", "dict"])
        items = [rng.choice(pool) for _ in range(rng.randint(0, 4))]
        pool.append(list(items) if kind == "list" else tuple(items) if kind == "tuple" else
                    {f"k{i}": item for i, item in enumerate(items)})
    return pool[-1]


def test_expanded_size_counts_shared_containers_as_often_as_they_are_reached():
    rng = random.Random(7)
    for _ in range(50):
        value = random_shared_structure(rng)
        assert safe_pickle.expanded_size(value, 10**9) == naive_tree_size(value)
    assert safe_pickle.expanded_size([[1, 2]] * 3, 10**9) == 1 + 3 * 3
    looped = [1]
    looped.append(looped)
    assert safe_pickle.expanded_size(looped, 100) > 100


def test_bin_of_nested_shared_references_is_refused(tmp_path):
    nest = [True, False]
    for _ in range(20):  # 2**21 booleans from a file of a few hundred bytes
        nest = [nest, nest]
    path = tmp_path / "bomb.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b"], nest), protocol=4))
    assert path.stat().st_size < 300
    with pytest.raises(PlscError, match=r"bomb\.bin: the insightface verification \.bin unpickles to a "
                                        r"structure far larger than the file"):
        load_bin(path)


def test_bin_listing_one_stored_image_many_times_is_refused_before_decoding(tmp_path):
    image = jpeg()  # pickled once, then referenced from the memo: 2 bytes per copy, 112 x 112 x 3 decoded
    path = tmp_path / "same.bin"
    path.write_bytes(pickle.dumps(([image] * 400, [True, False] * 100), protocol=4))
    assert path.stat().st_size < 400 * len(image)
    message = rf"same\.bin: its 400 images add up to {400 * len(image)} bytes, more than the file's \d+: "
    with pytest.raises(PlscError, match=message + "images are listed more than once"):
        load_bin(path)


# ------------------------------------------------------------------------------------------------------------
# 8. One line, never a traceback


@pytest.mark.parametrize("override, key", [
    (f"train.seed={2**64}", "train.seed"),
    (f"train.seed={2**32}", "train.seed"),
    ("data.image_size=30000", "data.image_size"),
    ("model.embedding_size=1.0e+9", "model.embedding_size"),
    (f"data.num_classes={2**40}", "data.num_classes"),
    ("model.width=1000", "model.width"),
    ("train.batch_size=10000000", "train.batch_size"),
    ("data.num_workers=100000", "data.num_workers"),
])
def test_settings_beyond_what_can_run_are_refused(override, key):
    with pytest.raises(ConfigError, match=rf"^{key} must be "):
        load_config(overrides=[override])


def test_paddle_keeps_only_the_low_32_bits_of_a_seed():
    """Why train.seed < 2**32: above it, seeds alias smaller ones (Paddle 2.6 and 3.x alike)."""
    draws = []
    for seed in (5, 5 + 2**32, 6):
        paddle.seed(seed)
        draws.append(paddle.randn([4]).numpy())
    assert np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[0], draws[2])


def test_memory_errors_name_the_settings_to_lower():
    with pytest.raises(PlscError, match=r"^out of memory allocating x \(Unable to allocate .*\); lower a.b$"):
        with memory_hint("allocating x", "a.b"):
            np.empty(2**62, np.uint8)


def test_trainer_out_of_memory_for_the_class_centers_names_the_class_count(tmp_path, monkeypatch, tiny_dir):
    def no_memory(*args, **kwargs):
        raise MemoryError("(ResourceExhausted) Fail to alloc memory of 137438953472 size")

    monkeypatch.setattr(trainer_module, "build_head", no_memory)
    config = load_config(overrides=[*TINY, f"data.root={tiny_dir}"])
    with pytest.raises(PlscError, match=r"^out of memory allocating the centers of 40 classes \(Fail to "
                                        r"alloc .*\); lower the class count \(data\.num_classes"):
        trainer_module.Trainer(config, tmp_path / "run")


@pytest.mark.parametrize("nproc, message", [
    ("41", "cannot shard 40 classes over 41 ranks; use at most 40 ranks"),
    ("0", "--nproc must be at least 1, got 0"),
])
def test_nproc_the_classes_cannot_fill_is_refused_before_anything_starts(nproc, message, tmp_path, tiny_dir,
                                                                         monkeypatch, capsys):
    import plsc.launch

    def must_not_start(*args, **kwargs):
        raise AssertionError("processes started")

    monkeypatch.setattr(plsc.launch, "run_train", must_not_start)
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{root: {tiny_dir}}}\n")
    output = tmp_path / "out"
    settings = [part for setting in TINY for part in ("--set", setting)]
    argv = ["train", "--config", str(config), "--output", str(output), "--nproc", nproc, *settings]
    assert cli.main(argv) == 2
    assert one_line(capsys.readouterr().err) == f"plsc: error: {message}"
    assert not output.exists()


def test_plsc_capacity_with_nan_memory_is_one_line():
    result = subprocess.run([sys.executable, "-m", "plsc.cli", "capacity", "--predict", "--config",
                             "configs/cpu/mini.yaml", "--device-memory-mib", "nan"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert line.startswith("plsc capacity: error: argument --device-memory-mib: 'nan' is not a finite number")


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400"])
def test_number_flags_refuse_non_finite_values(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["capacity", "--predict", "--config", "configs/cpu/mini.yaml", "--device-memory-gib", "8",
                  f"--fixed-overhead-mib={value}"])
    assert exit_.value.code == 2
    assert "is not a finite number" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", [
    ["train", "--config", "{config}", "--output", "{target}"],
    ["export", "--checkpoint", "{missing}", "--output", "{target}"],
    ["doctor", "--output", "{target}"],
    ["eval", "--checkpoint", "{missing}", "--bin", "x.bin", "--json", "{target}/r.json"],
    ["capacity", "--predict", "--config", "configs/cpu/mini.yaml", "--device-memory-gib", "8",
     "--json", "{target}/p.json"],
])
@pytest.mark.parametrize("under", [False, True])
def test_output_that_is_a_file_or_under_a_file_is_one_line_before_any_work(command, under, tmp_path, capsys,
                                                                              monkeypatch):
    monkeypatch.chdir(ROOT)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    target = blocker / "sub" if under else blocker
    config = tmp_path / "c.yaml"
    config.write_text("data: {root: data/tiny}\n")
    argv = [part.format(config=config, target=target, missing=tmp_path / "none") for part in command]
    assert cli.main(argv) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("plsc: error: --") and line.endswith(f"{blocker} is a file, not a folder")


def test_output_in_an_unwritable_folder_is_named(tmp_path, monkeypatch):
    # Tests run as root here, which writes through permissions; the refusal itself is what is checked.
    monkeypatch.setattr("plsc.output_paths.os.access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(PlscError, match=rf"^--output {tmp_path}/run: cannot write in {tmp_path} \(permiss"):
        require_output_folder(tmp_path / "run", "--output")
    with pytest.raises(PlscError, match=rf"^--json {tmp_path}/r.json: cannot write in {tmp_path} "):
        require_output_file(tmp_path / "r.json", "--json")
    with pytest.raises(PlscError, match=rf"^--json {tmp_path} is a folder; name a file$"):
        require_output_file(tmp_path, "--json")


@pytest.mark.parametrize("text, message", [
    ("[]", "expected a JSON object of checkpoint facts, found a list"),
    ('{"num_classes": "many"}', r"num_classes must be an integer in \[1, 2147483648\], found many"),
    ('{"num_classes": -3}', r"num_classes must be an integer in \[1, "),
    ('{"num_classes": 1e15}', r"num_classes must be an integer in \[1, "),
    ('{"embedding_size": true}', r"embedding_size must be an integer in \[1, 8192\], found True"),
    ('{"pretrain_world_size": 1.5}', r"pretrain_world_size must be an integer in \[1, "),
    ("[" * 5000, r"corrupt meta\.json"),
    ('{"num_classes": ' + "9" * 5000 + "}", r"corrupt meta\.json"),
])
def test_plsc22_meta_json_of_the_wrong_shape_is_one_line(tmp_path, text, message):
    (tmp_path / "meta.json").write_text(text)
    with pytest.raises(PlscError, match=rf"meta\.json: {message}"):
        plsc22.read_meta(tmp_path)


def test_plsc22_meta_json_nulls_count_as_not_recorded(tmp_path):
    (tmp_path / "meta.json").write_text('{"num_classes": 10, "pretrain_world_size": null, "epoch": 3}')
    assert plsc22.read_meta(tmp_path) == {"num_classes": 10, "epoch": 3}

