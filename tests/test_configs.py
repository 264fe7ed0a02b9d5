"""The shipped configs/ and the typed config loader (plsc/config.py).

The published table is typed in below independently of scripts/gen_published_configs.py, so a slip in one
of them shows up here; when ../shared is present it is also checked against the seed README itself.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

from plsc import cli
from plsc.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    parse_override,
    save_config,
)
from plsc.errors import PlscError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
GENERATOR = ROOT / "scripts" / "gen_published_configs.py"

# Seed README section 9.1: (mode, backbone, precision, format, ratio) -> (agedb30, cfp_fp, lfw).
PUBLISHED = {
    ("static", "Res50", "FP16", "NHWC", "0.1"): ("0.98200", "0.98943", "0.99850"),
    ("static", "Res50", "FP32", "NCHW", "0.1"): ("0.98267", "0.98986", "0.99850"),
    ("static", "Res50", "FP16", "NHWC", "1.0"): ("0.98300", "0.98929", "0.99850"),
    ("static", "Res50", "FP32", "NCHW", "1.0"): ("0.98400", "0.98929", "0.99833"),
    ("static", "Res100", "FP16", "NHWC", "0.1"): ("0.98383", "0.99200", "0.99850"),
    ("static", "Res100", "FP32", "NCHW", "0.1"): ("0.98317", "0.99157", "0.99850"),
    ("static", "Res100", "FP16", "NHWC", "1.0"): ("0.98367", "0.99086", "0.99867"),
    ("static", "Res100", "FP32", "NCHW", "1.0"): ("0.98417", "0.99129", "0.99867"),
    ("dynamic", "Res50", "FP16", "NHWC", "0.1"): ("0.98367", "0.99029", "0.99850"),
    ("dynamic", "Res50", "FP32", "NCHW", "0.1"): ("0.98400", "0.98986", "0.99867"),
    ("dynamic", "Res50", "FP16", "NHWC", "1.0"): ("0.98317", "0.98971", "0.99850"),
    ("dynamic", "Res50", "FP32", "NCHW", "1.0"): ("0.98350", "0.99000", "0.99850"),
    ("dynamic", "Res100", "FP16", "NHWC", "0.1"): ("0.98500", "0.99143", "0.99867"),
    ("dynamic", "Res100", "FP32", "NCHW", "0.1"): ("0.98383", "0.99114", "0.99867"),
    ("dynamic", "Res100", "FP16", "NHWC", "1.0"): ("0.98500", "0.99214", "0.99883"),
    ("dynamic", "Res100", "FP32", "NCHW", "1.0"): ("0.98400", "0.99100", "0.99850"),
    ("dynamic", "MobileFaceNet", "FP32", "NCHW", "0.1"): ("0.96200", "0.96571", "0.99567"),
    ("dynamic", "MobileFaceNet", "FP32", "NCHW", "1.0"): ("0.96167", "0.96657", "0.99533"),
}
MODEL = {
    "Res50": ("iresnet50", 512, "r50"),
    "Res100": ("iresnet100", 512, "r100"),
    "MobileFaceNet": ("mobilefacenet", 128, "mfn"),
}
BACKBONE_OF_MODEL = {name: backbone for backbone, (name, _, _) in MODEL.items()}


def all_yaml_files() -> list[Path]:
    return sorted(p for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def published_files() -> list[Path]:
    return sorted(CONFIGS.glob("ms1mv3_*.yaml"))


def load_generator(path: Path | None = None):
    """A generator script (default: the published configs') loaded as a module."""
    path = path or GENERATOR
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script executes
    spec.loader.exec_module(module)
    return module


# --- shipped configs


@pytest.mark.parametrize("path", all_yaml_files(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads(path, monkeypatch):
    monkeypatch.setenv("PLSC_DATA_ROOT", "/data")  # faces_mini.yaml and the published configs use it
    config = load_config(path)
    assert isinstance(config, Config)


def test_exactly_the_18_published_configs_exist():
    combos = {}
    for path in published_files():
        c = load_config(path, reads_data=False)
        backbone = BACKBONE_OF_MODEL[c.model.name]
        key = (
            c.train.mode,
            backbone,
            c.train.precision.upper(),
            c.model.data_format,
            f"{c.loss.sample_ratio:.1f}",
        )
        assert key not in combos, f"{path.name} duplicates {combos[key]}"
        combos[key] = path.name
    assert len(combos) == 18
    assert set(combos) == set(PUBLISHED)


@pytest.mark.parametrize("key", sorted(PUBLISHED), ids=lambda k: "_".join(k))
def test_published_config_matches_its_row(key, monkeypatch):
    mode, backbone, precision, data_format, ratio = key
    model_name, embedding, short = MODEL[backbone]
    name = f"ms1mv3_{short}_{mode}_{precision.lower()}_{data_format.lower()}_r{ratio}.yaml"
    path = CONFIGS / name
    assert path.is_file(), f"missing {name}"
    monkeypatch.delenv("PLSC_DATA_ROOT", raising=False)
    c = load_config(path, reads_data=False)

    assert (c.train.mode, c.train.precision, c.model.data_format) == (mode, precision.lower(), data_format)
    assert c.model.name == model_name and c.model.embedding_size == embedding
    assert c.loss.sample_ratio == float(ratio)
    # The capacity table's settings (FP16, ratio 0.1) train with the streaming head; the others whole-matrix.
    assert (c.loss.chunk_size > 0) == (precision == "FP16" and ratio == "0.1")
    assert c.loss.center_dtype == ("float16" if precision == "FP16" else "float32")
    # PLSC v2.2's training semantics (docs/design.md, "Training semantics"): dynamic mode clips the backbone
    # by min(2 / (norm + 1e-6), 2), static mode not at all; every gradient is 1/8 (its 8 ranks'); dense
    # momentum; the init std of 8 ranks; FP16 without master weights or unscaled center gradients.
    assert (c.optim.clip_norm, c.optim.clip_max_factor) == ((2.0, 2.0) if mode == "dynamic" else (0.0, 1.0))
    assert (c.optim.lr_reference_batch, c.optim.grad_divisor) == (512, 8.0)
    assert c.loss.momentum_mode == "dense" and c.loss.center_init_ranks == 8
    fp16 = precision == "FP16"
    assert (c.train.fp16_master_weights, c.train.unscale_center_grads) == (not fp16, not fp16)
    # The shared PLSC v2.2 MS1MV3 recipe.
    assert c.data.num_classes == 93431 and c.data.source == "folder" and c.data.num_workers == 8
    assert c.data.root == "${PLSC_DATA_ROOT}/MS1M_v3"  # as written: nothing is read here
    assert c.data.val_bins == [f"{c.data.root}/{name}.bin" for name in ("lfw", "cfp_fp", "agedb_30")]
    assert c.loss.margins == [1.0, 0.5, 0.0] and c.loss.scale == 64.0
    assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay) == (0.1, 0.9, 5e-4)
    assert (c.optim.warmup_steps, c.optim.schedule, c.optim.decay_unit) == (0, "step", "epoch")
    assert c.optim.decay_boundaries == [10, 16, 22] and c.optim.decay_factor == 0.1
    assert (c.train.batch_size, c.train.epochs, c.train.keep_checkpoints) == (128, 25, 1)
    assert (c.train.eval_interval, c.train.log_interval) == (2000, 100)
    assert (c.train.loss_scale_init, c.train.loss_scale_growth_interval) == (27648.0, 2000)

    # The header names the row, its published numbers and its checkpoint.
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    agedb, cfp, lfw = PUBLISHED[key]
    assert f"agedb30 {agedb}, cfp_fp {cfp}, lfw {lfw}" in header
    assert f"MS1M_v3_arcface_{backbone}_{mode}_{ratio}_{data_format}_{precision}_v2.2.tgz" in header
    assert "paddle.distributed.launch --gpus 0,1,2,3,4,5,6,7" in header
    assert "export PLSC_DATA_ROOT=" in header and "--set data.root=/path/to/MS1M_v3" in header


def test_table_in_this_test_matches_the_seed_readme(shared_dir):
    readme = (shared_dir / "seed" / "PLSC-v2.2-README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[1] == "MS1MV3":
            mode, _, backbone, precision, fmt, ratio, agedb, cfp, lfw, link = cells
            key = (mode.lower(), backbone, precision, fmt, ratio)
            rows[key] = (agedb, cfp, lfw)
            assert "_".join(key[1:2] + key[:1] + key[4:5] + key[3:4] + key[2:3]) in link
    assert rows == PUBLISHED


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.name=adamw"], "optim.name adamw steps the backbone only; the class centers keep sparse "
                               "momentum SGD: set optim.center_lr and optim.center_weight_decay"),
        (["optim.name=adamw", "optim.center_lr=0.1"], "set optim.center_lr and optim.center_weight_decay"),
        (["optim.name=adamw", "optim.center_weight_decay=5e-4"], "set optim.center_lr and"),
        (["optim.warmup_steps=10", "optim.warmup_epochs=1"],
         "optim.warmup_steps (10) and optim.warmup_epochs (1) both set: give the warmup in one unit"),
    ],
)
def test_settings_that_only_make_sense_together(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert message in str(info.value) and "\n" not in str(info.value)
    adamw = load_config(overrides=["optim.name=adamw", "optim.center_lr=0.1", "optim.center_weight_decay=0"])
    assert (adamw.optim.betas, adamw.optim.eps) == ([0.9, 0.999], 1e-8)  # torch.optim.AdamW's defaults


# --- the generator


def test_generator_output_equals_the_committed_files(tmp_path):
    gen = load_generator()
    written = gen.write(tmp_path)
    assert len(written) == 18
    committed = {p.name: p.read_text() for p in published_files()}
    generated = {p.name: p.read_text() for p in sorted(tmp_path.iterdir())}
    assert generated.keys() == committed.keys()
    for name, text in generated.items():
        assert committed[name] == text, f"configs/{name} differs: run scripts/gen_published_configs.py"
    assert gen.check(CONFIGS) == []


def test_generator_is_idempotent(tmp_path):
    gen = load_generator()
    assert len(gen.write(tmp_path)) == 18
    before = {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    assert gen.write(tmp_path) == []
    assert gen.main(["--out", str(tmp_path)]) == 0
    after = {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    assert after == before
    assert gen.main(["--check", "--out", str(tmp_path)]) == 0


def test_generator_check_reports_drift(tmp_path, capsys):
    gen = load_generator()
    gen.write(tmp_path)
    victim = tmp_path / "ms1mv3_r50_static_fp16_nhwc_r0.1.yaml"
    victim.write_text(victim.read_text().replace("epochs: 25", "epochs: 24"))
    (tmp_path / "ms1mv3_r18_dynamic_fp32_nchw_r0.5.yaml").write_text("{}\n")
    (tmp_path / "ms1mv3_mfn_dynamic_fp32_nchw_r1.0.yaml").unlink()
    assert gen.main(["--check", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "differs" in err and "r50_static_fp16_nhwc_r0.1" in err
    assert "not produced" in err and "r18" in err
    assert "missing" in err and "mfn_dynamic_fp32_nchw_r1.0" in err


def test_generator_reads_nothing_outside_itself():
    source = GENERATOR.read_text() + (GENERATOR.parent / "generated_configs.py").read_text()  # and its helper
    assert "shared" not in source.replace("self-contained", "")
    assert (
        "open(" not in source and "read_text" in source
    )  # reads only its own output files (for idempotence)


# --- the arcface_torch generator (scripts/gen_arcface_torch_configs.py; its values: tests/test_plan.py)

ARCFACE_GENERATOR = ROOT / "scripts" / "gen_arcface_torch_configs.py"


def test_arcface_torch_generator_output_equals_the_committed_files_and_reports_drift(tmp_path, capsys):
    gen = load_generator(ARCFACE_GENERATOR)
    assert gen.check(CONFIGS / "arcface_torch") == [], "run scripts/gen_arcface_torch_configs.py"
    assert len(gen.write(tmp_path)) == len(gen.TABLE) and gen.write(tmp_path) == []  # idempotent
    victim = tmp_path / "ms1mv3_r50.yaml"
    victim.write_text(victim.read_text().replace("epochs: 20", "epochs: 25"))
    (tmp_path / "ms1mv3_r18.yaml").write_text("{}\n")
    assert gen.main(["--check", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "differs" in err and "ms1mv3_r50.yaml" in err and "not produced" in err and "ms1mv3_r18" in err
    source = ARCFACE_GENERATOR.read_text()
    assert "open(" not in source and "shared" not in source  # reads only its own output files


# Settings each arcface_torch config takes from its own configs/<name>.py, with the line cited beside them.
ARCFACE_CITED = ("data.root", "data.num_classes", "data.num_images", "model.name", "loss.margins",
                 "loss.sample_ratio", "optim.lr", "optim.weight_decay", "optim.warmup_epochs",
                 "train.batch_size", "train.epochs", "train.precision")


@pytest.mark.parametrize("path", sorted((CONFIGS / "arcface_torch").glob("*.yaml")), ids=lambda p: p.stem)
def test_arcface_torch_config_validates_without_the_data_and_cites_its_source(path, monkeypatch):
    monkeypatch.delenv("PLSC_DATA_ROOT", raising=False)
    config = load_config(path, reads_data=False)  # load_config validates
    assert config.data.root.startswith("${PLSC_DATA_ROOT}/") and config.data.num_images > 0
    text = path.read_text()
    assert text.splitlines()[0] == f"# arcface_torch's configs/{path.stem}.py over its configs/base.py"
    raw = yaml.safe_load(text)
    for key in ARCFACE_CITED:
        section, name = key.split(".")
        assert name in raw[section], f"{path.name}: {key} not written out"
        line = next(line for line in text.splitlines() if line.startswith(f"  {name}:"))
        assert re.search(rf"# .*configs/{path.stem}\.py:\d+", line), f"{path.name}: {key} cites no source"
    if config.optim.name == "adamw":  # the class centers' own rule, stated in the file
        assert config.optim.center_lr > 0 and config.optim.center_weight_decay is not None
        assert raw["optim"]["center_lr"] == config.optim.center_lr


# --- plsc/config.py


def write_yaml(tmp_path: Path, data, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_defaults_load_without_a_file():
    c = load_config()
    assert c.train.batch_size == 128 and c.model.name == "iresnet50" and c.loss.sample_ratio == 1.0


def test_config_error_is_a_plsc_error():
    assert issubclass(ConfigError, PlscError)


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section 'trian'.*known: data, model, loss, optim, train"):
        load_config(write_yaml(tmp_path, {"trian": {"epochs": 1}}))


def test_unknown_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train\.epoch'"):
        load_config(write_yaml(tmp_path, {"train": {"epoch": 1}}))
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.learning_rate'"):
        load_config(overrides=["optim.learning_rate=0.1"])
    with pytest.raises(ConfigError, match=r"unknown section 'optimizer'"):
        load_config(overrides=["optimizer.lr=0.1"])


def test_file_problems_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write_yaml(tmp_path, "train: [1, 2\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write_yaml(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(write_yaml(tmp_path, "train: 5\n"))


def test_empty_file_and_empty_section_keep_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path, "")).to_dict() == Config().to_dict()
    assert load_config(write_yaml(tmp_path, "train:\n")).to_dict() == Config().to_dict()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train.batch_size=64", {"train": {"batch_size": 64}}),
        ("optim.lr=0.05", {"optim": {"lr": 0.05}}),
        ("optim.weight_decay=1.0e-4", {"optim": {"weight_decay": 1.0e-4}}),
        ("optim.decay_boundaries=[8, 14,20]", {"optim": {"decay_boundaries": [8, 14, 20]}}),
        ("data.skip_bad_samples=true", {"data": {"skip_bad_samples": True}}),
        ("data.skip_bad_samples=false", {"data": {"skip_bad_samples": False}}),
        ("data.root=/data/MS1M_v3", {"data": {"root": "/data/MS1M_v3"}}),
        ("data.root=a=b", {"data": {"root": "a=b"}}),
        ("data.root='123'", {"data": {"root": "123"}}),
        ("data.root=", {"data": {"root": ""}}),
        (" train.mode = static", {"train": {"mode": "static"}}),
    ],
)
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["train.batch_size", "batch_size=3", "a.b.c=1", ".x=1", "train.=1"])
def test_malformed_override_is_an_error(text):
    with pytest.raises(ConfigError, match="override"):
        parse_override(text)


def test_overrides_are_typed_and_applied_after_the_file(tmp_path):
    path = write_yaml(tmp_path, {"train": {"batch_size": 32, "epochs": 3}, "optim": {"lr": 0.2}})
    c = load_config(
        path,
        [
            "train.batch_size=16",
            "loss.scale=30",  # int -> float
            "train.epochs=2.0",  # integral float -> int
            "loss.margins=[1, 0, 0.35]",
            "data.val_bins=[a.bin, b.bin]",
            "data.skip_bad_samples=true",
            "model.data_format=NHWC",
            "loss.sample_ratio=0.1",
        ],
    )
    assert c.train.batch_size == 16 and c.optim.lr == 0.2
    assert c.loss.scale == 30.0 and isinstance(c.loss.scale, float)
    assert c.train.epochs == 2 and isinstance(c.train.epochs, int)
    assert c.loss.margins == [1.0, 0.0, 0.35] and all(isinstance(m, float) for m in c.loss.margins)
    assert c.data.val_bins == ["a.bin", "b.bin"]
    assert c.data.skip_bad_samples is True
    assert c.model.data_format == "NHWC" and c.loss.sample_ratio == 0.1
    # Later overrides win over earlier ones.
    assert load_config(overrides=["train.epochs=3", "train.epochs=4"]).train.epochs == 4


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batch_size=abc", "train.batch_size: expected an integer, got 'abc'"),
        ("train.batch_size=2.5", "train.batch_size: expected an integer, got 2.5"),
        ("train.batch_size=true", "train.batch_size: expected an integer, got True"),
        ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
        ("optim.lr=false", "optim.lr: expected a number, got False"),
        ("data.skip_bad_samples=1", "data.skip_bad_samples: expected true or false, got 1"),
        ("data.skip_bad_samples=yes please", "data.skip_bad_samples: expected true or false"),
        ("data.root=[a, b]", "data.root: expected a string"),
        ("data.val_bins=lfw.bin", "data.val_bins: expected a list, got 'lfw.bin'"),
        ("optim.decay_boundaries=[10, x]", "optim.decay_boundaries[1]: expected an integer, got 'x'"),
    ],
)
def test_type_errors_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    assert text.startswith(f"--set {override}")


def test_type_errors_in_a_file_name_the_file(tmp_path):
    path = write_yaml(tmp_path, "train:\n  batch_size: lots\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: train.batch_size: expected an integer, got 'lots'"


@pytest.mark.parametrize(
    "override, choices",
    [
        ("train.mode=eager", "dynamic, static"),
        ("train.precision=bf16", "fp32, fp16, amp"),
        ("model.data_format=nhwc", "NCHW, NHWC"),  # case matters
        ("loss.center_dtype=float64", "float32, float16"),
        ("loss.momentum_mode=sparse", "lazy, dense"),
        ("optim.schedule=cosine", "step, poly"),
        ("optim.name=adam", "sgd, adamw"),
        ("optim.decay_unit=epochs", "epoch, step"),
        ("data.source=lmdb", "folder, rec, synthetic"),
    ],
)
def test_literal_choices_are_enforced(override, choices):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert str(info.value).endswith(f"is not one of {choices}")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "override, match",
    [
        ("loss.sample_ratio=0", r"loss\.sample_ratio must be in \(0, 1\]"),
        ("loss.sample_ratio=1.5", r"loss\.sample_ratio must be in \(0, 1\]"),
        ("loss.margins=[1.0, 0.5]", r"loss\.margins must be \[m1, m2, m3\]"),
        ("train.batch_size=0", r"train\.batch_size must be >= 1"),
        ("model.width=0", r"model\.width must be > 0"),
    ],
)
def test_validation(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=-0.1", "optim.lr must be > 0, got -0.1"),
        ("optim.lr=0", "optim.lr must be > 0, got 0.0"),
        ("optim.lr=.nan", "optim.lr must be a finite number, got nan"),
        ("optim.lr=.inf", "optim.lr must be a finite number, got inf"),
        ("optim.momentum=1.0", "optim.momentum must be in [0, 1), got 1.0"),
        ("optim.momentum=-0.5", "optim.momentum must be in [0, 1), got -0.5"),
        ("optim.weight_decay=-1e-4", "optim.weight_decay must be >= 0, got -0.0001"),
        ("optim.warmup_steps=-1", "optim.warmup_steps must be >= 0, got -1"),
        ("optim.warmup_epochs=-1", "optim.warmup_epochs must be >= 0, got -1"),
        ("optim.betas=[0.9]", "optim.betas must be [beta1, beta2], each in [0, 1), got [0.9]"),
        ("optim.betas=[0.9, 1.0]", "optim.betas must be [beta1, beta2], each in [0, 1), got [0.9, 1.0]"),
        ("optim.eps=0", "optim.eps must be > 0, got 0.0"),
        ("optim.center_lr=-0.1", "optim.center_lr must be >= 0 (0: the backbone's rate), got -0.1"),
        ("optim.center_weight_decay=-1",
         "optim.center_weight_decay must be >= 0 or null (optim.weight_decay), got -1.0"),
        ("data.num_images=-1", "data.num_images must be >= 0 (0: counted from the data), got -1"),
        ("optim.decay_factor=0", "optim.decay_factor must be in (0, 1], got 0.0"),
        ("optim.decay_boundaries=[10, -2]",
         "optim.decay_boundaries must be a list of numbers >= 0, got [10, -2]"),
        ("optim.clip_norm=-1", "optim.clip_norm must be >= 0 (0: no clipping), got -1.0"),
        ("optim.clip_max_factor=0",
         "optim.clip_max_factor must be > 0 (1: clipping only ever shrinks the gradient), got 0.0"),
        ("optim.grad_divisor=0", "optim.grad_divisor must be > 0 (1: the loss's own gradient), got 0.0"),
        ("loss.center_init_ranks=-1",
         "loss.center_init_ranks must be >= 0 (0: std 0.01; N: PLSC v2.2's std on N ranks), got -1"),
        ("loss.scale=0", "loss.scale must be > 0, got 0.0"),
        ("loss.scale=-64", "loss.scale must be > 0, got -64.0"),
        ("loss.scale=.inf", "loss.scale must be a finite number, got inf"),
        ("loss.sample_ratio=-0.1", "loss.sample_ratio must be in (0, 1], got -0.1"),
        ("loss.sample_ratio=.nan", "loss.sample_ratio must be a finite number, got nan"),
        ("loss.interclass_filtering_threshold=-0.1",
         "loss.interclass_filtering_threshold must be in [0, 1) (0: no filtering), got -0.1"),
        ("loss.interclass_filtering_threshold=1",
         "loss.interclass_filtering_threshold must be in [0, 1) (0: no filtering), got 1.0"),
        ("loss.interclass_filtering_threshold=.nan",
         "loss.interclass_filtering_threshold must be a finite number, got nan"),
        ("loss.margins=[0.0, 0.5, 0.0]", "loss.margins: m1 must be > 0, got 0.0"),
        ("loss.margins=[1.0, -0.1, 0.0]", "loss.margins: m2 must be in [0, pi/2), got -0.1"),
        ("loss.margins=[1.0, 1.6, 0.0]", "loss.margins: m2 must be in [0, pi/2), got 1.6"),
        ("loss.margins=[1.0, 0.0, 1.0]", "loss.margins: m3 must be in [0, 1), got 1.0"),
        ("loss.margins=[1.0, 0.0, -0.35]", "loss.margins: m3 must be in [0, 1), got -0.35"),
        ("loss.margins=[1.0, .nan, 0.0]", "loss.margins must be a finite number, got [1.0, nan, 0.0]"),
        ("loss.margins=[1.0, 0.0, 0.0]", "loss.margins [1, 0, 0] add no margin (a plain softmax): set "
                                         "loss.plain_softmax=true"),
        ("loss.plain_softmax=true",
         "loss.plain_softmax=true needs loss.margins [1.0, 0.0, 0.0], got [1.0, 0.5, 0.0]"),
        ("train.batch_size=-3", "train.batch_size must be >= 1, got -3"),
        ("train.epochs=-1", "train.epochs must be >= 0, got -1"),
        ("train.max_steps=-5", "train.max_steps must be >= 0 (0: train.epochs decides), got -5"),
        ("train.log_interval=0", "train.log_interval must be >= 1, got 0"),
        ("train.eval_interval=-1", "train.eval_interval must be >= 0 (0: verify at the end only), got -1"),
        ("train.save_interval=-1",
         "train.save_interval must be >= 0 (0: save at the end of every epoch only), got -1"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints must be >= 1, got 0"),
        ("train.eval_batch_size=0", "train.eval_batch_size must be >= 1, got 0"),
        ("train.seed=-1", "train.seed must be >= 0, got -1"),
        ("train.max_skipped_steps=0", "train.max_skipped_steps must be >= 1, got 0"),
        ("train.loss_scale_init=0", "train.loss_scale_init must be > 0, got 0.0"),
        ("train.loss_scale_backoff_factor=1", "train.loss_scale_backoff_factor must be in (0, 1), got 1.0"),
        ("data.image_size=0", "data.image_size must be >= 1, got 0"),
        ("data.num_workers=-1", "data.num_workers must be >= 0 (0: load in the training process), got -1"),
        ("data.num_classes=-2", "data.num_classes must be >= 0 (0: read from the labels), got -2"),
        ("model.embedding_size=0", "model.embedding_size must be >= 1, got 0"),
        ("model.width=.nan", "model.width must be a finite number, got nan"),
        ("model.dropout=1.0", "model.dropout must be in [0, 1), got 1.0"),
    ],
)
def test_values_out_of_range_are_one_line_errors_naming_key_and_range(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_range_errors_reach_the_command_line_as_one_line(tmp_path, capsys):
    from plsc import cli

    code = cli.main(["train", "--config", str(CONFIGS / "cpu" / "mini.yaml"), "--output", str(tmp_path),
                     "--set", "optim.lr=-0.1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == "plsc: error: optim.lr must be > 0, got -0.1\n"
    assert not any(tmp_path.iterdir())  # refused before anything is written


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss.margins=[1.0, 0.0, 0.0]", "loss.plain_softmax=true"],  # asked for: a plain softmax
        ["loss.margins=[0.9, 0.4, 0.15]"],  # PLSC's combined margin
        ["loss.margins=[1.0, 0.0, 0.35]"],  # CosFace
        ["train.epochs=0", "train.eval_interval=0", "train.save_interval=0", "optim.momentum=0"],
        ["optim.weight_decay=0", "data.num_workers=0", "loss.sample_ratio=1.0", "optim.decay_factor=1"],
        ["loss.interclass_filtering_threshold=0"],  # off, the default
        ["loss.interclass_filtering_threshold=0.999"],
    ],
)
def test_boundary_values_that_are_allowed_load(overrides):
    load_config(overrides=overrides)


def test_config_from_dict_and_save_round_trip(tmp_path):
    c = config_from_dict(
        {"model": {"name": "mobilefacenet", "embedding_size": 128}, "train": {"mode": "static"}}
    )
    assert c.model.embedding_size == 128 and c.train.mode == "static"
    with pytest.raises(ConfigError, match="unknown key 'model.depth'"):
        config_from_dict({"model": {"depth": 50}})
    path = tmp_path / "saved.yaml"
    save_config(c, path)
    assert load_config(path).to_dict() == c.to_dict()


def test_every_published_config_round_trips_through_save(tmp_path):
    for path in published_files():
        c = load_config(path, reads_data=False)
        save_config(c, tmp_path / path.name)
        assert load_config(tmp_path / path.name, reads_data=False).to_dict() == c.to_dict()


def test_override_accepts_exponent_without_dot():
    # YAML 1.1 (PyYAML) reads 5e-4 as a string; float fields accept it anyway.
    assert load_config(overrides=["optim.weight_decay=5e-4"]).optim.weight_decay == 5e-4
    with pytest.raises(ConfigError):
        load_config(overrides=["optim.weight_decay=fast"])


def test_published_file_names_follow_the_scheme():
    pattern = re.compile(r"ms1mv3_(r50|r100|mfn)_(static|dynamic)_(fp16|fp32)_(nhwc|nchw)_r(0\.1|1\.0)\.yaml")
    for path in published_files():
        assert pattern.fullmatch(path.name), path.name


# --- data named through PLSC_DATA_ROOT ----------------------------------------------------------------------

FACES_MINI = CONFIGS / "cpu" / "faces_mini.yaml"


def test_faces_mini_finds_its_data_under_plsc_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("PLSC_DATA_ROOT", str(tmp_path))
    data = load_config(FACES_MINI).data
    assert data.root == f"{tmp_path}/faces-mini"
    assert data.val_bins == [f"{tmp_path}/faces-mini/lfw_disjoint.bin"]


def test_faces_mini_without_plsc_data_root_is_a_one_line_error(monkeypatch):
    monkeypatch.delenv("PLSC_DATA_ROOT", raising=False)
    unset = r"faces_mini\.yaml: data paths use \$\{PLSC_DATA_ROOT\}, which is not set"
    with pytest.raises(PlscError, match=unset) as raised:
        load_config(FACES_MINI)
    assert "\n" not in str(raised.value)


def test_data_root_on_the_command_line_needs_no_variable(monkeypatch):
    monkeypatch.delenv("PLSC_DATA_ROOT", raising=False)
    data = load_config(FACES_MINI, ["data.root=/data/faces"]).data
    assert (data.root, data.val_bins) == ("/data/faces", ["/data/faces/lfw_disjoint.bin"])


def test_configs_without_the_variable_load_with_it_unset(monkeypatch):
    monkeypatch.delenv("PLSC_DATA_ROOT", raising=False)
    data = load_config(CONFIGS / "cpu" / "mini.yaml").data
    assert "PLSC_DATA_ROOT" not in data.root


def test_published_configs_find_ms1m_under_plsc_data_root(monkeypatch):
    monkeypatch.setenv("PLSC_DATA_ROOT", "/data")
    for path in published_files():
        data = load_config(path).data
        assert data.root == "/data/MS1M_v3", path.name
        assert data.val_bins == [f"/data/MS1M_v3/{name}.bin" for name in ("lfw", "cfp_fp", "agedb_30")]


PUBLISHED_EXAMPLE = CONFIGS / "ms1mv3_r50_dynamic_fp32_nchw_r0.1.yaml"


def test_training_a_published_config_without_plsc_data_root_is_a_one_line_error(monkeypatch, tmp_path,
                                                                                  capsys):
    monkeypatch.delenv("PLSC_DATA_ROOT", raising=False)
    output = tmp_path / "run"
    assert cli.main(["train", "--config", str(PUBLISHED_EXAMPLE), "--output", str(output)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"plsc: error: {PUBLISHED_EXAMPLE}: data paths use ${{PLSC_DATA_ROOT}}, which is not set: "
        "export PLSC_DATA_ROOT=/folder/holding/the/data sets, or --set data.root=..."
    ]
    assert not output.exists()


def test_only_paths_that_are_read_need_the_variable(monkeypatch):
    """Synthetic data reads no data.root; verification files are read whatever the source; a caller that
    reads no data (reads_data=False, as ``plsc capacity``) needs the variable for neither."""
    monkeypatch.delenv("PLSC_DATA_ROOT", raising=False)
    synthetic = load_config(PUBLISHED_EXAMPLE, ["data.source=synthetic", "data.val_bins=[]"]).data
    assert synthetic.root == "${PLSC_DATA_ROOT}/MS1M_v3"
    with pytest.raises(ConfigError, match=r"data paths use \$\{PLSC_DATA_ROOT\}, which is not set"):
        load_config(PUBLISHED_EXAMPLE, ["data.source=synthetic"])
    with pytest.raises(ConfigError, match=r"data paths use \$\{PLSC_DATA_ROOT\}, which is not set"):
        load_config(PUBLISHED_EXAMPLE, ["data.val_bins=[]"])
    assert load_config(PUBLISHED_EXAMPLE, reads_data=False).data.root == "${PLSC_DATA_ROOT}/MS1M_v3"


def test_a_published_config_trains_on_synthetic_data_without_plsc_data_root(monkeypatch, tmp_path):
    """As the capacity trials and throughput runs do (repro/): the saved config.yaml resumes the same way."""
    monkeypatch.delenv("PLSC_DATA_ROOT", raising=False)
    output = tmp_path / "run"
    tiny = ["data.source=synthetic", "data.val_bins=[]", "data.num_classes=20", "data.synthetic_samples=64",
            "data.image_size=16", "data.num_workers=0", "model.name=iresnet18", "model.width=0.0625",
            "model.embedding_size=16", "train.batch_size=8", "train.log_interval=1", "train.eval_interval=0"]
    flags = [flag for setting in tiny for flag in ("--set", setting)]
    command = ["train", "--config", str(PUBLISHED_EXAMPLE), "--output", str(output), *flags]
    assert cli.main([*command, "--set", "train.max_steps=1"]) == 0
    assert cli.main(["train", "--output", str(output), "--resume", "--set", "train.max_steps=2"]) == 0
    assert len((output / "train_log.jsonl").read_text().splitlines()) == 2  # one record a step


def test_config_names_resolve_with_or_without_yaml_and_under_the_repository_configs(tmp_path, monkeypatch):
    from plsc.config import REPOSITORY_CONFIGS, ConfigError, load_config

    mini = REPOSITORY_CONFIGS / "cpu" / "mini.yaml"
    expected = load_config(mini).to_dict()
    monkeypatch.chdir(tmp_path)  # not the repository: only configs/ under it has cpu/mini
    assert load_config("cpu/mini").to_dict() == expected
    assert load_config("cpu/mini.yaml").to_dict() == expected
    assert load_config(mini.with_suffix("")).to_dict() == expected  # an absolute name without .yaml
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "mini.yaml").write_text("train:\n  seed: 7\n")  # a file here wins over configs/
    assert load_config("cpu/mini").train.seed == 7
    with pytest.raises(ConfigError) as error:
        load_config("cpu/nope")
    names = ["cpu/nope", "cpu/nope.yaml"]
    tried = [*names, *(REPOSITORY_CONFIGS / name for name in names)]
    assert str(error.value) == f"config file not found: cpu/nope (tried {', '.join(map(str, tried))})"
