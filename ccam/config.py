"""Settings: pydantic-validated sections, loaded from YAML and ``--set section.key=value``.

Precedence (low to high): built-in defaults (= ``configs/default.yaml``), the resolved config
already saved in the work directory, ``--config FILE``, ``--set`` overrides. The result is saved
back as ``W/config.yaml``. Each stage hashes only the sections it reads, so changing
``seg.epochs`` never invalidates ``train-pcam``.
"""

from __future__ import annotations

import hashlib
import re
import json
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ccam.errors import UserError


_SWITCH_FIELDS = {"laterality", "flip", "flip_tta"}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _yaml_switches(cls, data):
        # YAML 1.1 (and so `--set pcam.flip=off`) reads on/off as booleans: map them back to the words
        if isinstance(data, dict):
            data = {k: ("on" if v else "off") if k in _SWITCH_FIELDS and isinstance(v, bool) else v for k, v in data.items()}
        return data


class RuntimeConfig(Section):
    seed: int = 0
    device: str = "auto"  # auto = cuda when present (pinned memory, non-blocking copies), else cpu
    # torch's compute threads; 0 = the cores this process may use (CPU affinity, cgroup quota).
    # Fixed for the run, not adapted to the load: the thread count changes float rounding
    num_threads: int = 0
    # DataLoader worker processes. auto = matched to the threads: on CPU the cores the compute
    # threads leave free (0 at the default thread count: workers there only slow training,
    # benchmarks/workers.py), on CUDA min(4, cores - 1); 0 = load in the main process
    num_workers: Union[int, Literal["auto"]] = "auto"
    # fp32, or bf16 autocast for the inference of CAM extraction (sample, pseudo-masks) and predict
    precision: Literal["fp32", "bf16"] = "fp32"


class DataConfig(Section):
    slice_size: int = Field(256, ge=16, le=2048)  # S: every slice resampled in-plane to S x S
    ct_window: tuple[float, float] = (-160.0, 240.0)  # HU window for CT (abdomen soft tissue)
    mr_percentiles: tuple[float, float] = (0.5, 99.5)  # MR: clip to these percentiles, scale to [0, 1]
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)  # validation cases taken from train when none given
    min_train_for_val: int = 5  # below this many training cases no validation split is made
    chunk_slices: int = Field(32, ge=1)  # slices resampled at once (bounds memory)


class PCAMConfig(Section):
    # MONAI ResNet (the paper's family; 18 trains in minutes on a CPU) or `local`: a 6-layer FCN with
    # a 19-pixel receptive field whose CAMs land on the organs when trained from scratch (issue 13)
    backbone: Literal["resnet10", "resnet18", "resnet34", "resnet50", "local"] = "local"
    # ResNets: 16 (paper; last stage dilated) or 8 (doubles CAM resolution at ~2.5x cost); local: 2 or 4
    # (4: receptive field 27 px, 2.5x faster than 2 and as good on the demo); null: 4 for local, 16 for ResNets
    output_stride: Optional[Literal[2, 4, 8, 16]] = None
    # gap: global average pooling (paper). topk: mean of the top `topk_fraction` of each class score
    # map (a size prior: a class must fill a region, as in top-k MIL pooling of WILDCAT, Durand et
    # al., CVPR 2017), so neither one landmark spot nor the whole body can carry the decision;
    # exclusive_topk: the same on per-pixel class probabilities (softmax over background and the
    # classes: organs do not overlap, so co-occurring twins cannot share one region)
    pooling: Literal["gap", "topk", "exclusive_topk"] = "exclusive_topk"
    topk_fraction: float = Field(0.01, gt=0.0, le=1.0)  # ~ the smallest organ's share of the slice (a kidney: ~1 % at a 34 cm field of view)
    positional: bool = True  # append x, y, x^2, y^2, xy maps to the features: each class learns where it tends to lie
    # auto: a left/right twin (left_kidney / right_kidney) may only lie on its own side of the
    # slice's centre column, in training and in its CAMs (twins look alike: only the side tells
    # them apart, and the class names say which side); off: no such prior (paper)
    laterality: Literal["auto", "off"] = "auto"
    laterality_margin: float = Field(0.1, ge=0.0, le=1.0)  # share of the half-width a twin may cross the centre (patients lie off centre)
    width: float = Field(0.25, gt=0.0, le=4.0)  # channels: ResNet widen_factor (1 = standard, 0.5 ~ 1/4 FLOPs); local: 64 x width base channels
    pretrained: Optional[str] = None  # local weights file; nothing is ever downloaded
    epochs: int = Field(10, ge=1)  # 10 passes over all training slices: enough for organ tags on a few thousand slices
    batch_size: int = Field(16, ge=2)  # >= 2 for batch norm; 16 fits a 256 x 256 ResNet-18 batch in 2 GB
    optimizer: Literal["sgd", "adam"] = "adam"  # paper: SGD (configs/paper.yaml); from scratch SGD at lr 0.1 diverges, Adam converges
    lr: float = Field(0.002, gt=0.0)  # Adam from scratch (paper, SGD: 0.1)
    head_lr_mult: float = Field(1.0, gt=0.0)  # paper: 10 for a fresh head on a pretrained backbone; from scratch both are fresh
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # SGD momentum of the paper's IRN-style recipe
    weight_decay: float = Field(1e-4, ge=0.0)  # standard ResNet weight decay
    poly_power: float = Field(0.9, ge=0.0)  # poly decay lr * (1 - step/total)^0.9, as in the paper
    flip: Literal["auto", "on", "off"] = "auto"  # auto: off when classes have a left/right pair (a flip swaps them)
    aug_scale: tuple[float, float] = (0.9, 1.1)  # +-10 % zoom: patient size varies about that much at a fixed field of view
    aug_rotate_deg: float = Field(10.0, ge=0.0, le=180.0)  # small: patients lie supine, big rotations break the anatomy prior
    aug_translate: float = Field(0.0, ge=0.0, le=0.5)  # shift (share of the slice); 0: prepare already centres the field of view
    aug_intensity: float = Field(0.1, ge=0.0, le=1.0)  # +-10 % contrast/brightness/gamma: scanner and coil variation after normalisation

    @property
    def stride(self) -> int:
        """The output stride in effect (``output_stride``, or the backbone's default when null)."""
        return self.output_stride or (4 if self.backbone == "local" else 16)

    @model_validator(mode="after")
    def _stride_fits_backbone(self):
        allowed = (2, 4) if self.backbone == "local" else (8, 16)
        if self.output_stride is not None and self.output_stride not in allowed:
            raise ValueError(f"output_stride {self.output_stride} does not fit backbone {self.backbone} (use {' or '.join(map(str, allowed))})")
        return self


class CAMConfig(Section):
    method: Literal["cam", "gradcam", "gradcampp", "layercam"] = "cam"  # cam: one forward pass for all classes (paper); others are baselines
    # the multi-scale set of IRN/C-CAM inference; each scale 0.25-4 (a smaller one leaves a few pixels of a slice)
    scales: list[Annotated[float, Field(ge=0.25, le=4.0)]] = Field(default_factory=lambda: [1.0, 0.5, 1.5, 2.0], min_length=1)
    # Background score of argmax([tau, CAM_1..CAM_K]) on CAMs normalised to a peak of 1. 0.25 is a
    # fixed prior, not fitted to any mask: multi-scale CAMs concentrate on the most discriminative
    # part of an organ and fall off smoothly, so the organ's extent lies well below the half
    # maximum; IRN/AffinityNet-style pipelines that the paper builds on keep background thresholds
    # in 0.15-0.3 for max-normalised CAMs; and on the demo cohort the median CAM value over the
    # pixels of tagged slices where the CAM is non-zero is ~0.2-0.3 (benchmarks/pcam_quality.py
    # prints this no-ground-truth statistic), i.e. tau keeps the upper half of the activated area.
    tau: float = Field(0.25, gt=0.0, lt=1.0)
    flip_tta: Literal["auto", "on", "off"] = "auto"  # auto: flip averaging only when no class has a left/right twin
    batch_size: int = Field(32, ge=1)  # slices per forward pass; memory ~ batch x largest scale^2


class AnatomyConfig(Section):
    enabled: bool = True  # the anatomy-causality chain (CAM_ac = M_s * CAM) is the paper's method; off = ablation rows without AC
    # M_s = M_GC > eps. Paper: 0, i.e. wherever any training coarse mask ever put the class; a small
    # eps (0.01-0.05) ignores classes seen at a pixel in fewer than that share of training slices
    eps: float = Field(0.0, ge=0.0, lt=1.0)


class CCAMConfig(Section):
    enabled: bool = True  # pseudo-masks from C-CAM's fused head (paper); off = P-CAM's CAMs (ablation rows without CC)
    # auto = one-hot when K > 1: a label map read by a linear Phi makes class ids magnitudes
    # (class 4 = 4 x class 1); one-hot gives each class its own weights; for K = 1 both are equal
    coarse_encoding: Literal["auto", "index", "onehot"] = "auto"
    train_on: Literal["positives", "all"] = "positives"  # paper: positive slices; "all" adds the untagged ones
    epochs: int = Field(5, ge=1)  # fine-tuning from P-CAM: a few epochs move the new M_c weight, the rest is P-CAM
    batch_size: int = Field(16, ge=2)  # >= 2: batch norm needs more than one slice per batch
    lr: float = Field(1e-3, gt=0.0)  # paper: SGD lr 1e-3 (100x below P-CAM, the backbone is already trained)
    head_lr_mult: float = Field(10.0, gt=0.0)  # new parts (M_c weight, Phi, Theta) learn 10x faster, as P-CAM's head
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # standard SGD momentum, as P-CAM
    weight_decay: float = Field(1e-4, ge=0.0)  # as P-CAM
    poly_power: float = Field(0.9, ge=0.0)  # poly decay per iteration, as P-CAM (DeepLab recipe)
    augment: bool = True  # random scale/rotation of the image and of M_c together; never flips (left/right organs)
    aug_scale: tuple[float, float] = (0.9, 1.1)  # mild, as P-CAM: every case is already shown in one canonical view
    aug_rotate_deg: float = Field(10.0, ge=0.0)  # patient positioning varies by a few degrees


class RefineConfig(Section):
    # off: on the demo cohort it lowers pseudo-mask Dice (benchmarks/refine_dice.py). The walk itself
    # works (ground-truth affinities raise Dice), but affinities learned from CAM seeds leak across
    # organ borders, and at S = 96 the stride-8 grid is 12 x 12, so a kidney is about one cell
    enabled: bool = False
    # seeds (AffinityNet recipe): background score (1 - max_k CAM_k)^alpha
    alpha_low: float = Field(4.0, gt=0.0)  # strong background: only confident foreground survives (recipe: 4)
    alpha_high: float = Field(32.0, gt=0.0)  # weak background: only confident background survives (recipe: 32)
    crf_iters: int = Field(10, ge=1)  # mean-field iterations of the dense CRF (recipe: 10)
    # CRF kernel widths in pixels of a 512 x 512 slice, scaled with S: the recipe's 3 and 80 px
    # were set on ~500 px photographs
    crf_gaussian_sxy: float = Field(3.0, gt=0.0)
    crf_bilateral_sxy: float = Field(80.0, gt=0.0)
    crf_bilateral_srgb: float = Field(13.0, gt=0.0)  # intensity width on a 0..255 scale (recipe: 13)
    # AffinityNet
    # MONAI ResNet at output stride 8: its last stages run on a 4x larger grid than P-CAM's, so
    # the default is the shallowest (resnet10) at half width, which trains in minutes on a CPU
    backbone: Literal["resnet10", "resnet18", "resnet34", "resnet50"] = "resnet10"
    width: float = Field(0.5, gt=0.0, le=2.0)  # MONAI widen_factor of the trunk's channels
    radius: int = Field(5, ge=2, le=12)  # pairs within this radius on the stride-8 grid (recipe: 5)
    epochs: int = Field(3, ge=1)  # fits the demo's 2-min budget; 8 epochs halved the loss but barely moved Dice
    batch_size: int = Field(8, ge=2)  # >= 2: the trunk has batch norm
    lr: float = Field(0.1, gt=0.0)  # recipe: SGD 0.1 with poly decay
    head_lr_mult: float = Field(10.0, gt=0.0)  # the new 1x1 layers learn 10x faster (recipe)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # standard SGD momentum
    weight_decay: float = Field(5e-4, ge=0.0)  # recipe: 5e-4
    poly_power: float = Field(0.9, ge=0.0)  # poly decay per iteration (recipe)
    # random walk T = D^-1 A^beta, 2^t steps
    beta: float = Field(8.0, gt=0.0)  # A^beta sharpens affinities so weak links stop carrying score (recipe: 8)
    t: int = Field(8, ge=0, le=12)  # 2^t = 256 steps (recipe); each step is cheap on the stride-8 grid
    # background channel of the walk: "tau" = the constant cam.tau the unrefined pseudo-masks use
    # (so refinement is the walk alone); "power" = (1 - max_k CAM_k)^bg_alpha, the recipe's
    background: Literal["tau", "power"] = "tau"
    bg_alpha: float = Field(16.0, gt=0.0)  # only for background="power"


class SegConfig(Section):
    network: Literal["unet", "basicunet"] = "unet"  # MONAI UNet (residual units); basicunet = MONAI BasicUNet
    # feature maps per level; five levels reach S/16, a receptive field that covers a 256 slice
    # (basicunet takes exactly six: five encoder levels and the last decoder level)
    channels: list[int] = Field(default_factory=lambda: [16, 32, 64, 128, 256], min_length=2)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # pseudo-masks are noisy labels already; no extra dropout
    epochs: int = Field(20, ge=1)  # enough for the U-Net to converge on a few thousand slices
    batch_size: int = Field(16, ge=1)  # slices per Adam step (instance norm: any size works)
    lr: float = Field(5e-4, gt=0.0)  # Adam, as in the paper
    weight_decay: float = Field(0.0, ge=0.0)  # the paper uses plain Adam
    slices_per_epoch: int = Field(0, ge=0)  # 0 = every training slice each epoch; else a random subset (big cohorts)
    augment: bool = True  # random scale/rotation (slice and mask together) and intensity; never flips (left/right organs)
    aug_scale: tuple[float, float] = (0.9, 1.1)  # mild: every case is already shown in one canonical view
    aug_rotate_deg: float = Field(10.0, ge=0.0)  # patient positioning varies by a few degrees
    # intensity scale/shift (+-aug_intensity) and gamma: scanners and sequences differ in contrast
    aug_intensity: float = Field(0.1, ge=0.0, lt=0.3)


class PredictConfig(Section):
    batch_size: int = Field(16, ge=1)  # slices per forward pass: bounds memory, not the result


class EvaluateConfig(Section):
    # background scores tau for the oracle sweep on the CAM stacks (ground truth picks the best one,
    # so that row is reported as "oracle" and never fed back into the pipeline)
    tau_sweep: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 20)],
                                                                    min_length=1)
    surface_distances: bool = True  # HD95 and ASSD; switch off to evaluate big cohorts faster (Dice only)
    # CAM localisation per class against ground truth (peak in the organ, CAM mass inside, occlusion
    # drop of P-CAM, contact sheets): tells a CAM that looks elsewhere from one with the wrong extent
    localisation: bool = True


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

    def keys_hash(self, keys, ignore=()) -> str:
        """sha256 of the values of ``keys`` (``section`` or ``section.key``) without ``ignore``, stable across runs."""
        data = self.model_dump(mode="json")
        payload = {}
        for key in sorted(keys):
            node = data
            for part in key.split("."):
                node = node[part]
            payload[key] = node
        for key in ignore:
            section, _, name = key.partition(".")
            if isinstance(payload.get(section), dict):
                payload[section] = {k: v for k, v in payload[section].items() if k != name}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def changed_keys(self, keys) -> dict:
        """``{name: value}`` of those ``section.key`` in ``keys`` whose value is not the default (name: the
        part after the dot): a setting that enters a stage key only when switched on."""
        out = {}
        for key in keys:
            section, name = key.split(".")
            sec = getattr(self, section)
            value = getattr(sec, name)
            if value != type(sec).model_fields[name].get_default(call_default_factory=True):
                out[name] = sec.model_dump(mode="json")[name]
        return out

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
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UserError("config file not found", path=str(path), fix="check the --config path")
    except IsADirectoryError:
        raise UserError("config is a folder, not a file", path=str(path), fix="pass a YAML file to --config")
    except UnicodeDecodeError:
        raise UserError("config is not a UTF-8 text file", path=str(path), fix="pass a YAML settings file (see configs/default.yaml)")
    except OSError as e:
        raise UserError(f"cannot read the config ({e.strerror})", path=str(path), fix="check the file's permissions")
    except (yaml.YAMLError, RecursionError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"config is not valid YAML ({first})", path=str(path), fix="fix the YAML syntax")
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
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: the value is not valid YAML", fix="quote it, e.g. --set 'cam.scales=[1.0,0.5]'")
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _check_runtime(cfg: "Config", source: str) -> None:
    """Settings pydantic cannot judge alone: the device must exist on this machine, workers >= 0."""
    rt = cfg.runtime
    if not DEVICE.match(str(rt.device)):
        raise UserError(f"runtime.device: '{rt.device}' is not a device", path=source, fix="use auto, cpu, cuda or cuda:N")
    if str(rt.device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"runtime.device={rt.device} but this machine has no usable CUDA GPU", path=source,
                            fix="use --set runtime.device=auto (or cpu)")
        idx = int(str(rt.device).split(":")[1]) if ":" in str(rt.device) else 0
        if idx >= torch.cuda.device_count():
            raise UserError(f"runtime.device={rt.device} but only {torch.cuda.device_count()} GPU(s) are visible", path=source,
                            fix="use cuda:0 .. cuda:N-1, or auto")
    if rt.num_workers != "auto" and rt.num_workers < 0:
        raise UserError(f"runtime.num_workers: {rt.num_workers} is negative", path=source,
                        fix="use auto (matched to the threads), 0 (load in the main process) or more")
    if rt.num_threads < 0:
        raise UserError(f"runtime.num_threads: {rt.num_threads} is negative", path=source, fix="use 0 (automatic) or more")


def validate(data: dict, source: str = "config") -> Config:
    try:
        cfg = Config.model_validate(data)
        _check_runtime(cfg, source)
        return cfg
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


def load_settings(workdir, config_file=None, sets=(), save_to_workdir: bool = True) -> Config:
    """The effective config of a command: ``W/config.yaml`` < ``--config`` < ``--set``; saved to W
    (``save_to_workdir``) and torch's thread count applied."""
    cfg = resolve(Path(workdir), config_file, sets)
    if save_to_workdir:
        save(cfg, Path(workdir))
    apply_threads(cfg)
    return cfg


def apply_threads(cfg: Config) -> dict:
    """Set torch's threads from ``runtime.num_threads`` (0 = the cores this process may use) and log
    the choice (`ccam.threads.apply`); returns it."""
    from ccam import threads

    device = str(cfg.runtime.device)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return threads.apply(cfg.runtime.num_threads, cfg.runtime.num_workers, device)


def save(cfg: Config, workdir: Path) -> None:
    from ccam.io.atomic import write_text

    write_text(Path(workdir) / "config.yaml", "# resolved ccam config (edit with --config / --set)\n" + cfg.to_yaml())
