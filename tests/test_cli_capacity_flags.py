"""``plsc capacity``'s memory flags: MiB and GiB give the same device, and --help states the overhead the
model uses when --fixed-overhead-mib is left out. A prediction reads no data: the published configs predict
without PLSC_DATA_ROOT."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from plsc.capacity import has_allocator_counters
from plsc.cli import build_parser, main

# The model probes Paddle's host allocator counters (as tests/test_capacity_model.py).
pytestmark = pytest.mark.skipif(not has_allocator_counters(), reason="Paddle lacks host allocator counters")
CONFIG = "model: {name: iresnet18, width: 0.0625, embedding_size: 32}\ndata: {image_size: 16}\n"


PUBLISHED = sorted((Path(__file__).resolve().parent.parent / "configs").glob("ms1mv3_*.yaml"))


def predict(tmp_path, *flags: str, config: Path | None = None) -> dict:
    if config is None:
        config = tmp_path / "tiny.yaml"
        config.write_text(CONFIG)
    out = tmp_path / f"prediction-{len(list(tmp_path.glob('prediction-*')))}.json"
    assert main(["capacity", "--predict", "--config", str(config), *flags, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_device_memory_in_mib_equals_the_same_memory_in_gib(tmp_path):
    in_mib = predict(tmp_path, "--device-memory-mib", "32510", "--world-size", "8")
    in_gib = predict(tmp_path, "--device-memory-gib", str(32510 / 1024), "--world-size", "8")
    assert in_mib == in_gib
    assert in_mib["setting"]["device_memory_bytes"] == 32510 * 2**20


def test_device_memory_is_required_once(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["capacity", "--predict", "--config", "c.yaml"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["capacity", "--predict", "--config", "c.yaml", "--device-memory-mib", "1",
                                   "--device-memory-gib", "1"])


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_help_states_the_overhead_the_model_uses_by_default(tmp_path, capsys, device):
    with pytest.raises(SystemExit):
        main(["capacity", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    stated = float(re.search(rf"default: .*?(\d+) on {device}", text).group(1))
    setting = predict(tmp_path, "--device-memory-gib", "4", "--device", device)["setting"]
    assert setting["fixed_overhead_bytes"] == stated * 2**20


@pytest.mark.cpu_slow(reason="a capacity prediction for every published config (~30 s)")
def test_every_published_config_predicts_without_plsc_data_root(tmp_path, monkeypatch):
    """The published configs name their data under ${PLSC_DATA_ROOT}; a prediction opens none of it, so it
    needs no variable and predicts what it predicts with the variable set."""
    assert len(PUBLISHED) == 18
    flags = ("--device-memory-mib", "32510", "--world-size", "8")
    for path in PUBLISHED:
        monkeypatch.delenv("PLSC_DATA_ROOT", raising=False)
        without = predict(tmp_path, *flags, config=path)
        monkeypatch.setenv("PLSC_DATA_ROOT", str(tmp_path / "datasets"))
        assert predict(tmp_path, *flags, config=path) == without, path.name
        assert without["max_classes"] > 0
