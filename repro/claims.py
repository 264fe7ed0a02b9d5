"""PLSC v2.2's published claims (``repro/claims.yaml``), loaded into frozen dataclasses, with the memory
model's predictions for the capacity rows and plsc's own CPU claims.

One loader, :func:`load_claims`, validates the whole file: every mapping must hold exactly the fields of its
dataclass (unknown keys and missing keys are errors naming where they are), values are type-checked, and
claim ids are unique across all groups. :meth:`Tolerance.accepts` and :func:`verdict` turn a published and a
measured value into ``pass`` / ``fail`` (or ``recorded`` when nothing was published to compare with).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CLAIMS_FILE = Path(__file__).resolve().parent / "claims.yaml"

PASS, FAIL, RECORDED = "pass", "fail", "recorded"
DIRECTIONS = ("both", "at_least", "at_most")
TIERS = ("cpu", "cpu_slow", "gpu", "gpu8", "multinode")
_FLOAT_SLACK = 1e-9  # published 0.98200 vs measured 0.98400 with margin 0.002 must pass despite rounding


class ClaimsError(ValueError):
    """claims.yaml does not match the schema below; the message names the offending key."""


@dataclass(frozen=True)
class Tolerance:
    """How far a measured value may be from the published one (see the header of claims.yaml)."""

    value: float
    relative: bool = False
    direction: str = "both"
    note: str = ""

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            allowed = ", ".join(DIRECTIONS)
            raise ClaimsError(f"tolerance direction must be one of {allowed}, not {self.direction!r}")
        if self.value < 0:
            raise ClaimsError(f"tolerance value must be >= 0, not {self.value}")

    def margin(self, published: float) -> float:
        return self.value * abs(published) if self.relative else self.value

    def bounds(self, published: float) -> tuple[float, float]:
        """The accepted interval [low, high] around ``published`` (one side open for at_least / at_most)."""
        margin = self.margin(published)
        low = -math.inf if self.direction == "at_most" else published - margin
        high = math.inf if self.direction == "at_least" else published + margin
        return low, high

    def accepts(self, published: float, measured: float) -> bool:
        low, high = self.bounds(published)
        return math.isfinite(measured) and low - _FLOAT_SLACK <= measured <= high + _FLOAT_SLACK

    def describe(self) -> str:
        amount = f"{self.value:.0%}" if self.relative else f"{self.value:g}"
        prefix = {"both": "±", "at_least": "at least published - ", "at_most": "at most published + "}
        return prefix[self.direction] + amount


@dataclass(frozen=True, kw_only=True)
class Claim:
    """What every claim has: an id (file name of its result, pytest id) and its published values."""

    id: str
    published: dict[str, float | None]


@dataclass(frozen=True, kw_only=True)
class AccuracyClaim(Claim):
    mode: str
    dataset: str
    backbone: str
    precision: str
    format: str
    ratio: float
    checkpoint: str  # URL of the published tgz
    config: str  # plsc config reproducing the training run, relative to the project root

    @property
    def archive_name(self) -> str:
        return self.checkpoint.rsplit("/", 1)[-1]

    @property
    def archive_stem(self) -> str:
        return self.archive_name.removesuffix(".tgz")


@dataclass(frozen=True, kw_only=True)
class CapacityClaim(Claim):
    framework: str
    mode: str
    precision: str
    backbone: str
    pool_mib: int  # the pre-allocated pool the README prints beside the class count
    reference: bool = False  # another framework's figure: shown, never measured


@dataclass(frozen=True, kw_only=True)
class NhwcClaim(Claim):
    quantity: str
    precision: str
    tolerance: Tolerance


@dataclass(frozen=True, kw_only=True)
class ThroughputClaim(Claim):
    mode: str
    backbone: str
    precision: str
    format: str


@dataclass(frozen=True, kw_only=True)
class ModelCapacityClaim(Claim):
    """plsc's memory model's prediction for a published capacity row (``published`` repeats the row's)."""

    predicts: str  # id of the capacity claim
    config: str  # the published configuration the prediction is made for


@dataclass(frozen=True, kw_only=True)
class CpuCapacityClaim(Claim):
    config: str  # the capacity trials' plsc config, relative to the project root
    memory_cap_mib: int  # the cap on every trial's peak resident memory (repro.capacity.trials)


@dataclass(frozen=True, kw_only=True)
class CpuThroughputClaim(Claim):
    config: str
    mode: str
    tier: str | None = None  # overrides the group's tier for this row

    def __post_init__(self):
        if self.tier is not None and self.tier not in TIERS:
            raise ClaimsError(f"{self.id}: tier must be one of {', '.join(TIERS)}, not {self.tier!r}")


@dataclass(frozen=True, kw_only=True)
class OwnAccuracyClaim(Claim):
    config: str
    data: str  # data folder, relative to ../shared
    bin: str  # verification file inside it


@dataclass(frozen=True, kw_only=True)
class ClaimGroup:
    """One published table or statement; ``tier`` is the pytest marker its cases carry."""

    section: str
    hardware: str
    tier: str
    tolerance: Tolerance | None = None
    note: str = ""

    def __post_init__(self):
        if self.tier not in TIERS:
            raise ClaimsError(f"{self.section}: tier must be one of {', '.join(TIERS)}, not {self.tier!r}")

    def tolerance_for(self, claim: Claim) -> Tolerance | None:
        return getattr(claim, "tolerance", None) or self.tolerance

    def tier_for(self, claim: Claim) -> str:
        return getattr(claim, "tier", None) or self.tier


@dataclass(frozen=True, kw_only=True)
class AccuracyGroup(ClaimGroup):
    batch: str
    bins: dict[str, str]  # published key -> verification file name in --data-dir
    rows: tuple[AccuracyClaim, ...]


@dataclass(frozen=True, kw_only=True)
class CapacityGroup(ClaimGroup):
    batch: str
    ratio: float
    rows: tuple[CapacityClaim, ...]


@dataclass(frozen=True, kw_only=True)
class NhwcGroup(ClaimGroup):
    text: str
    rows: tuple[NhwcClaim, ...]


@dataclass(frozen=True, kw_only=True)
class ThroughputGroup(ClaimGroup):
    batch: str
    ratio: float
    rows: tuple[ThroughputClaim, ...]


@dataclass(frozen=True, kw_only=True)
class ModelCapacityGroup(ClaimGroup):
    device_memory_mib: int
    world_size: int
    batch_per_rank: int
    ratio: float
    rows: tuple[ModelCapacityClaim, ...]


@dataclass(frozen=True, kw_only=True)
class CpuCapacityGroup(ClaimGroup):
    rows: tuple[CpuCapacityClaim, ...]


@dataclass(frozen=True, kw_only=True)
class CpuThroughputGroup(ClaimGroup):
    rows: tuple[CpuThroughputClaim, ...]


@dataclass(frozen=True, kw_only=True)
class OwnAccuracyGroup(ClaimGroup):
    rows: tuple[OwnAccuracyClaim, ...]


@dataclass(frozen=True)
class Claims:
    source: str
    accuracy: AccuracyGroup
    capacity: CapacityGroup
    nhwc: NhwcGroup
    throughput: ThroughputGroup
    capacity_model: ModelCapacityGroup
    cpu_capacity: CpuCapacityGroup
    cpu_throughput: CpuThroughputGroup
    own_accuracy: OwnAccuracyGroup
    _index: dict[str, tuple[ClaimGroup, Claim]] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        index: dict[str, tuple[ClaimGroup, Claim]] = {}
        for group in self.groups():
            for claim in group.rows:
                if claim.id in index:
                    raise ClaimsError(f"claim id {claim.id!r} appears twice")
                index[claim.id] = (group, claim)
        object.__setattr__(self, "_index", index)
        for prediction in self.capacity_model.rows:
            self._check_prediction(prediction)

    def _check_prediction(self, prediction: ModelCapacityClaim) -> None:
        target = self._index.get(prediction.predicts, (None, None))[1]
        if not isinstance(target, CapacityClaim):
            raise ClaimsError(
                f"{prediction.id}: predicts {prediction.predicts!r}, which is no capacity claim"
            )
        if prediction.published != target.published:
            raise ClaimsError(f"{prediction.id}: published {prediction.published} differs from {target.id}'s")

    def groups(self) -> tuple[ClaimGroup, ...]:
        return (
            self.accuracy,
            self.capacity,
            self.nhwc,
            self.throughput,
            self.capacity_model,
            self.cpu_capacity,
            self.cpu_throughput,
            self.own_accuracy,
        )

    def find(self, claim_id: str) -> tuple[ClaimGroup, Claim]:
        if claim_id not in self._index:
            raise KeyError(f"no claim with id {claim_id!r} in claims.yaml")
        return self._index[claim_id]


def verdict(
    published: dict[str, float | None], measured: dict[str, float], tolerance: Tolerance | None
) -> str:
    """``pass`` when every published number is matched within ``tolerance``, else ``fail``.

    ``recorded`` when nothing was published to compare with (no number, or no tolerance). A published key
    without a measurement is a harness bug, not a failed claim, so it raises.
    """
    compared = {key: value for key, value in published.items() if value is not None}
    if not compared or tolerance is None:
        return RECORDED
    missing = sorted(set(compared) - set(measured))
    if missing:
        raise KeyError(f"no measurement for {', '.join(missing)} (measured: {', '.join(sorted(measured))})")
    accepted = all(tolerance.accepts(value, measured[key]) for key, value in compared.items())
    return PASS if accepted else FAIL


def load_claims(path: str | Path = CLAIMS_FILE) -> Claims:
    """Read and validate claims.yaml; any schema error raises :class:`ClaimsError` naming the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ClaimsError(f"cannot read {path}: {exc}") from None
    return _build(Claims, raw, path.name)


def _build(cls, raw, where: str):
    if not isinstance(raw, dict):
        raise ClaimsError(f"{where}: expected a mapping, found {type(raw).__name__}")
    fields = {spec.name: spec for spec in dataclasses.fields(cls) if spec.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ClaimsError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, spec in fields.items():
        if name in raw:
            values[name] = _coerce(raw[name], hints[name], f"{where}.{name}")
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ClaimsError(f"{where}: missing key '{name}'")
    return cls(**values)


def _coerce(value, annotation, where: str):
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(arg for arg in args if arg is not type(None)), where)
    if origin is tuple:
        items = enumerate(_list(value, where))
        return tuple(_coerce(item, args[0], f"{where}[{index}]") for index, item in items)
    if origin is dict:
        items = _mapping(value, where).items()
        return {_coerce(key, args[0], where): _coerce(item, args[1], f"{where}.{key}") for key, item in items}
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, where)
    return _scalar(value, annotation, where)


def _list(value, where: str) -> list:
    if not isinstance(value, list):
        raise ClaimsError(f"{where}: expected a list, found {type(value).__name__}")
    return value


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise ClaimsError(f"{where}: expected a mapping, found {type(value).__name__}")
    return value


def _scalar(value, annotation, where: str):
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, str, bool) and type(value) is annotation:
        return value
    raise ClaimsError(f"{where}: expected {annotation.__name__}, found {type(value).__name__} {value!r}")
