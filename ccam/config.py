"""Settings: pydantic-validated sections, loaded from YAML and ``--set section.key=value``.

Precedence (low to high): built-in defaults (= ``configs/default.yaml``), the resolved config
already saved in the work directory, ``--config FILE``, ``--set`` overrides. The result is saved
back as ``W/config.yaml``. Each stage hashes only the sections it reads, so changing
``seg.epochs`` never invalidates ``train-pcam``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ccam.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RuntimeConfig(Section):
    seed: int = 0
    device: str = "auto"  # auto = cuda when present, else cpu
    num_threads: int = 0  # 0 = torch's default
    num_workers: int = 0  # DataLoader workers; 0 is the most portable


class DataConfig(Section):
    slice_size: int = Field(256, ge=16, le=2048)  # S: every slice resampled in-plane to S x S
    ct_window: tuple[float, float] = (-160.0, 240.0)  # HU window for CT (abdomen soft tissue)
    mr_percentiles: tuple[float, float] = (0.5, 99.5)  # MR: clip to these percentiles, scale to [0, 1]
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)  # validation cases taken from train when none given
    min_train_for_val: int = 5  # below this many training cases no validation split is made
    chunk_slices: int = Field(32, ge=1)  # slices resampled at once (bounds memory)


class PCAMConfig(Section):
    backbone: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    output_stride: Literal[8, 16] = 16
    pretrained: Optional[str] = None  # local weights file; nothing is ever downloaded
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.1
    head_lr_mult: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    flip: Literal["auto", "on", "off"] = "auto"  # auto: off when classes have a left/right pair
    aug_scale: tuple[float, float] = (0.9, 1.1)
    aug_rotate_deg: float = 10.0
    aug_intensity: float = 0.1


class CAMConfig(Section):
    method: Literal["cam", "gradcam", "gradcampp", "layercam"] = "cam"
    scales: list[float] = Field(default_factory=lambda: [1.0, 0.5, 1.5, 2.0])
    tau: float = Field(0.25, gt=0.0, lt=1.0)
    flip_tta: Literal["auto", "on", "off"] = "auto"
    batch_size: int = Field(32, ge=1)


class AnatomyConfig(Section):
    enabled: bool = True
    eps: float = Field(0.0, ge=0.0, lt=1.0)  # M_s = M_GC > eps (paper: 0)


class CCAMConfig(Section):
    enabled: bool = True
    coarse_encoding: Literal["auto", "index", "onehot"] = "auto"
    train_on: Literal["positives", "all"] = "positives"
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9


class RefineConfig(Section):
    enabled: bool = False
    alpha_low: float = 4.0
    alpha_high: float = 32.0
    radius: int = 5
    beta: float = 8.0
    t: int = 8
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = 0.1


class SegConfig(Section):
    network: Literal["unet", "basicunet"] = "unet"
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = 5e-4


class PredictConfig(Section):
    batch_size: int = Field(16, ge=1)


class EvaluateConfig(Section):
    tau_sweep: list[float] = Field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 20)])


class Config(Section):
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    pcam: PCAMConfig = Field(default_factory=PCAMConfig)
    cam: CAMConfig = Field(default_factory=CAMConfig)
    anatomy: AnatomyConfig = Field(default_factory=AnatomyConfig)
    ccam: CCAMConfig = Field(default_factory=CCAMConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)
    seg: SegConfig = Field(default_factory=SegConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    def section_hash(self, *names: str) -> str:
        """sha256 of the named sections, stable across runs (sorted JSON)."""
        payload = {n: getattr(self, n).model_dump(mode="json") for n in sorted(names)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise UserError("config file not found", path=str(path), fix="check the --config path")
    except yaml.YAMLError as e:
        raise UserError(f"config is not valid YAML ({str(e).splitlines()[0]})", path=str(path), fix="fix the YAML syntax")
    if not isinstance(data, dict):
        raise UserError("config must be a mapping of sections", path=str(path), fix="see configs/default.yaml")
    return data


def parse_set(items: list[str] | tuple[str, ...]) -> dict:
    """``["pcam.epochs=3", "cam.scales=[1.0,0.5]"]`` -> nested dict; values parsed as YAML."""
    out: dict = {}
    for item in items or ():
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UserError(f"--set {item!r} must look like section.key=value", fix="e.g. --set pcam.epochs=3")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def validate(data: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            kind = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            msgs.append(f"{loc}: {kind}")
        raise UserError(f"invalid settings: {'; '.join(msgs)}", path=source, fix="see configs/default.yaml for the valid keys")


def resolve(workdir: Path | None = None, config_file: str | Path | None = None, sets=()) -> Config:
    """Build the effective config (see module docstring) without writing anything."""
    data: dict = {}
    if workdir is not None and (Path(workdir) / "config.yaml").exists():
        data = _read_yaml(Path(workdir) / "config.yaml")
    if config_file is not None:
        data = _deep_merge(data, _read_yaml(Path(config_file)))
    data = _deep_merge(data, parse_set(sets))
    return validate(data, source=str(config_file or "--set"))


def save(cfg: Config, workdir: Path) -> None:
    from ccam.io.atomic import write_text

    write_text(Path(workdir) / "config.yaml", "# resolved ccam config (edit with --config / --set)\n" + cfg.to_yaml())
