"""Run configurations (pydantic) and the Label2label paper's presets.

Two configs live here:

* :class:`PatchConfig`: how ``l2l-scale patches`` samples, augments, normalises and splits patches;
* :class:`TrainConfig`: the network, loss, optimiser schedule and distribution of ``l2l-scale train``; it can be
  written as YAML (``--config train.yaml``). Unknown keys are rejected with a one-line error.

Values are resolved in this order, later wins: built-in defaults (CSBDeep's), the preset (``--preset``), the
YAML file, command-line flags.

Presets (Kölln et al. 2022, Table 2 and "Data augmentation and pre-processing")
-------------------------------------------------------------------------------
==========  ============================  ============  =============================  =========  ================
preset      input -> target               percentiles   zooms                          lr         batch/steps/epochs
==========  ============================  ============  =============================  =========  ================
actin       AC-15 -> phalloidin           1 / 99.9      0.5, 0.75, 1.25, 1.5           2e-4       32 / 100 / 400
tubulin     DM1A -> YOL1/34               1 / 99.9      0.5, 0.75, 1.25, 1.5           2e-4       32 / 100 / 500
caveolae    D1P6W -> 4H312 (+ Poisson)    2 / 99.5      0.8, 0.9, 1.1, 1.2             1e-5       16 / 500 / 100
pxn         5H11 -> Y113                  1 / 99.9      0.5, 0.75, 1.25, 1.5           2e-4       32 / 100 / 500
separation  superposed -> SYTOX, CD44     2 / 99.8      0.5, 0.75, 1.25, 1.5           2e-5       32 / 1000 / 250
==========  ============================  ============  =============================  =========  ================

A preset turns augmentation on (the paper augmented every dataset; ``--no-augment`` turns it off). The channel
names are the paper's antibody names (and :mod:`l2l_scale.synthetic`'s). The paper's Table 2 does
not list a loss per dataset, so presets keep CARE's L1; its Discussion found ``ms-ssim3`` best for actin, tubulin
and caveolae and L1 for PXN (pass ``--loss ms-ssim3`` to follow that).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from l2l_scale.errors import ChannelError, ConfigError

__all__ = [
    "DEFAULT_ZOOMS",
    "PRESETS",
    "PatchConfig",
    "Preset",
    "TrainConfig",
    "check_mode_channels",
    "get_preset",
    "load_yaml",
    "patch_config",
    "train_config",
]

DEFAULT_ZOOMS = (0.5, 0.75, 1.25, 1.5)
CAVEOLAE_ZOOMS = (0.8, 0.9, 1.1, 1.2)
MODES = ("l2l", "n2n", "separate")
PresetName = Literal["actin", "tubulin", "caveolae", "pxn", "separation"]


@dataclass(frozen=True)
class Preset:
    """One dataset of the paper: channels, patch generation and training schedule."""

    name: str
    description: str
    mode: str
    input_channels: tuple[str, ...]
    target_channels: tuple[str, ...]
    percentiles: tuple[float, float]
    zooms: tuple[float, ...]
    poisson: bool
    learning_rate: float
    batch_size: int
    steps_per_epoch: int
    epochs: int

    def patch_values(self) -> dict:
        """The :class:`PatchConfig` fields this preset sets."""
        return {"mode": self.mode, "input_channels": list(self.input_channels),
                "target_channels": list(self.target_channels), "percentiles": self.percentiles,
                "augment": True, "zooms": self.zooms, "poisson": self.poisson}

    def train_values(self) -> dict:
        """The :class:`TrainConfig` fields this preset sets."""
        return {"learning_rate": self.learning_rate, "batch_size": self.batch_size,
                "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs}


PRESETS: dict[str, Preset] = {
    "actin": Preset("actin", "HeLa actin, AC-15 -> phalloidin (confocal)", "l2l", ("AC-15",), ("phalloidin",),
                    (1.0, 99.9), DEFAULT_ZOOMS, False, 2e-4, 32, 100, 400),
    "tubulin": Preset("tubulin", "MeT5A microtubules, DM1A -> YOL1/34 (confocal)", "l2l", ("DM1A",), ("YOL1/34",),
                      (1.0, 99.9), DEFAULT_ZOOMS, False, 2e-4, 32, 100, 500),
    "caveolae": Preset("caveolae", "MeT5A caveolae, D1P6W -> 4H312 (STED, Poisson noise added)", "l2l",
                       ("D1P6W",), ("4H312",), (2.0, 99.5), CAVEOLAE_ZOOMS, True, 1e-5, 16, 500, 100),
    "pxn": Preset("pxn", "MeT5A paxillin, 5H11 -> Y113 (confocal)", "l2l", ("5H11",), ("Y113",), (1.0, 99.9),
                  DEFAULT_ZOOMS, False, 2e-4, 32, 100, 500),
    "separation": Preset("separation", "superposed SYTOX + CD44 -> SYTOX, CD44 (confocal)", "separate",
                         ("superposed",), ("SYTOX", "CD44"), (2.0, 99.8), DEFAULT_ZOOMS, False, 2e-5, 32, 1000, 250),
}


def get_preset(name: str | None) -> Preset | None:
    """The preset called ``name`` (case-insensitive), ``None`` for ``None``.

    Raises
    ------
    ConfigError
        Unknown preset name.
    """
    if name is None:
        return None
    key = str(name).lower().strip()
    if key == "paxillin":
        key = "pxn"
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
    return PRESETS[key]


def _first_error(exc: ValidationError, source: str = "") -> str:
    """One line for the first pydantic error, naming the key; unknown keys list the valid ones."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    where = f"{source}: " if source else ""
    if err.get("type") == "extra_forbidden":
        model = exc.title
        valid = ", ".join(sorted(_MODELS[model].model_fields)) if model in _MODELS else ""
        return f"{where}unknown key {loc!r}" + (f"; valid keys are: {valid}" if valid else "")
    msg = str(err.get("msg", "invalid value")).rstrip(".")
    msg = msg.removeprefix("Value error, ")
    return f"{where}{loc}: {msg} (got {err.get('input')!r})" if loc else f"{where}{msg}"


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------------- patches


class PatchConfig(_Base):
    """How ``l2l-scale patches`` builds a patch store (see :func:`l2l_scale.patches.create_patches`).

    Attributes
    ----------
    mode : {"l2l", "n2n", "separate"}
        ``l2l``: input label -> target label; ``n2n``: first -> second noise realisation of one label;
        ``separate``: one superposed channel -> two or more target channels.
    input_channels, target_channels : list of str
        Channel names (or indices as strings).
    patch_size : int
        Patch side in pixels (128 in the paper).
    patches_per_image : int
        Patches per source image; with ``augment`` half are raw and half augmented.
    augment : bool
        Zoom (``zooms``) then rotate by a random multiple of 90 degrees, as in the paper.
    zooms : tuple of float
        Zoom factors of the augmented images.
    rotate : bool
        Random 0/90/180/270 degree rotation of each augmented (zoomed) image.
    poisson : bool
        Replace raw intensities by Poisson samples before normalising (the paper's caveolae STED data).
    percentiles : (float, float)
        Normalisation percentiles (CSBDeep's default 2/99.8; the presets set the paper's).
    sample_percentiles : bool
        Draw each patch's low/high percentile uniformly from 1-3 and 99.5-99.9 (CSBDeep's ``create_patches``
        default, ``sample_percentiles()``: an intensity augmentation; input and target of a patch share the
        draw) instead of the fixed ``percentiles`` (the paper's recipe, the default).
    norm_stats : str, optional
        JSON from ``l2l-scale stats`` with the percentile values; computed exactly otherwise.
    norm_scope : {"image", "dataset"}
        One normalisation per image (CSBDeep) or one per dataset.
    split_by : {"pair", "patch"}
        Validation split by image pair (no pair on both sides) or by patch (CSBDeep's 90/10 way).
    validation_fraction : float
        Fraction of pairs (or patches) used for validation.
    seed : int
        Sampling seed; each image's patches depend only on (seed, image key).
    threshold, filter_percentile : float
        CSBDeep ``no_background_patches(threshold, percentile)``.
    foreground : {"csbdeep", "any"}
        Which target channels decide a patch's foreground when there are several (one target: the same rule).
        ``csbdeep`` (default): CSBDeep's ``create_patches`` on a (C, Y, X) target, which the paper used for its
        separation model: the middle target channel (index C // 2; for 4 or more, the C // 2 channels around it)
        above ``threshold`` x the ``filter_percentile`` of all target channels pooled. ``any``: any target
        channel above ``threshold`` x its own percentile, which gives a sparse target (nuclei) more patches.
    chunk_patches : int, optional
        Patches per zarr chunk of X and Y (default: about 16 MB per chunk).
    preset : str, optional
        The preset these values came from (recorded).
    """

    mode: Literal["l2l", "n2n", "separate"] = "l2l"
    input_channels: list[str] = Field(default_factory=list)
    target_channels: list[str] = Field(default_factory=list)
    patch_size: int = Field(128, ge=16, le=4096)
    patches_per_image: int = Field(512, ge=1)
    augment: bool = False
    zooms: tuple[float, ...] = DEFAULT_ZOOMS
    rotate: bool = True
    poisson: bool = False
    percentiles: tuple[float, float] = (2.0, 99.8)
    sample_percentiles: bool = False
    norm_stats: str | None = None
    norm_scope: Literal["image", "dataset"] = "image"
    split_by: Literal["pair", "patch"] = "pair"
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = Field(0, ge=0)
    threshold: float = Field(0.4, ge=0.0, le=1.0)
    filter_percentile: float = Field(99.9, gt=0.0, le=100.0)
    foreground: Literal["csbdeep", "any"] = "csbdeep"
    chunk_patches: int | None = Field(None, ge=1)
    preset: str | None = None

    @field_validator("zooms")
    @classmethod
    def _check_zooms(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not (0.1 <= z <= 10.0) for z in v):
            raise ValueError("zoom factors must be numbers between 0.1 and 10, e.g. 0.5,0.75,1.25,1.5")
        return tuple(float(z) for z in v)

    @field_validator("percentiles")
    @classmethod
    def _check_percentiles(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError("percentiles must be low,high with 0 <= low < high <= 100, e.g. 1,99.9")
        return (float(lo), float(hi))


def check_mode_channels(mode: str, inputs: list[str], targets: list[str]) -> None:
    """Check that the channel counts fit the mode.

    Raises
    ------
    ChannelError
        ``l2l``/``n2n`` need as many input as target channels (n2n: different channels); ``separate`` needs
        one input channel and at least two target channels.
    """
    if not inputs or not targets:
        raise ChannelError("no input or target channel given; pass --input-channel NAME and --target-channel NAME "
                           "(or a --preset)")
    if mode == "separate":
        if len(inputs) != 1 or len(targets) < 2:
            raise ChannelError(f"mode 'separate' needs one input channel and at least two target channels, got "
                               f"{len(inputs)} -> {len(targets)} ({','.join(inputs)} -> {','.join(targets)}); pass "
                               "e.g. --input-channel superposed --target-channel SYTOX,CD44")
        return
    if len(inputs) != len(targets):
        raise ChannelError(f"mode {mode!r} needs as many target as input channels, got {len(inputs)} -> "
                           f"{len(targets)} ({','.join(inputs)} -> {','.join(targets)}); give one target per input "
                           "channel, or use --mode separate")
    if mode == "n2n" and set(inputs) & set(targets):
        raise ChannelError(f"mode 'n2n' needs a second noise realisation as target, but {sorted(set(inputs) & set(targets))} "
                           "is both input and target; pass e.g. --target-channel AC-15-repeat")


def patch_config(preset: str | None = None, **values: Any) -> PatchConfig:
    """Build a :class:`PatchConfig` from a preset and explicit values (``None`` values are ignored).

    ``mode="n2n"`` without target channels uses ``<input>-repeat`` (the simulator's naming of the second
    acquisition). The channel counts are checked against the mode.

    Raises
    ------
    ConfigError
        Unknown preset or key, or an invalid value.
    ChannelError
        Channel counts that do not fit the mode.
    """
    p = get_preset(preset)
    merged: dict[str, Any] = p.patch_values() if p else {}
    given = {k: v for k, v in values.items() if v is not None}
    if p and "mode" in given and given["mode"] != p.mode and "target_channels" not in given:
        merged.pop("target_channels", None)  # e.g. --preset actin --mode n2n: AC-15 -> AC-15-repeat
    merged.update(given)
    if p:
        merged["preset"] = p.name
    if merged.get("mode") == "n2n" and merged.get("input_channels") and not merged.get("target_channels"):
        merged["target_channels"] = [f"{c}-repeat" for c in merged["input_channels"]]
    try:
        cfg = PatchConfig(**merged)
    except ValidationError as exc:
        raise ConfigError(f"invalid patch option: {_first_error(exc)}") from None
    check_mode_channels(cfg.mode, cfg.input_channels, cfg.target_channels)
    return cfg


# ----------------------------------------------------------------------------------------------------- train


class TrainConfig(_Base):
    """How ``l2l-scale train`` trains a CARE U-Net on a patch store (see :func:`l2l_scale.train.train`).

    Attributes
    ----------
    preset : str, optional
        Paper preset (sets learning rate, batch size, steps per epoch, epochs).
    unet_n_depth, unet_kern_size, unet_n_first : int
        U-Net depth, convolution kernel size, filters of the first level (CSBDeep defaults 2, 5, 32).
    unet_residual : bool, optional
        Add the input to the output; default: when input and output channel counts match (CSBDeep's default).
    unet_last_activation : {"linear", "relu"}
    loss : str
        ``l1`` (default), ``l2``, ``ssim``, ``ms-ssim3``, ``ms-ssim5`` or ``ms-ssim`` (custom weights).
    ssim_weights, ssim_filter_size, ssim_filter_sigma, ssim_max_val
        MS-SSIM parameters (see :mod:`l2l_scale.model.losses`).
    learning_rate : float
        Adam learning rate.
    batch_size : int
        Global batch size (per-replica batch x replicas).
    steps_per_epoch, epochs : int
    reduce_lr : bool
        ReduceLROnPlateau on the validation loss, as in CARE.
    reduce_lr_factor, reduce_lr_patience, reduce_lr_min_delta
        Its factor (0.5), patience (10 epochs) and min_delta (0).
    early_stopping : int, optional
        Stop after this many epochs without a validation-loss improvement.
    strategy : {"auto", "mirrored", "multiworker", "none"}
        ``auto``: MirroredStrategy over all visible GPUs, no strategy without a GPU.
    precision : {"fp32", "bf16", "fp16"}
        Compute precision (Keras mixed policy; fp16 with dynamic loss scaling). Weights stay float32.
    seed : int
        Seed of weight initialisation and data shuffling.
    shuffle_buffer : int, optional
        Patches in the shuffle buffer (default: 4 chunks of the patch store).
    validation_batches : int, optional
        Validation batches per epoch (default: every validation patch once, in whole global batches).
    tensorboard : bool
        Write TensorBoard logs when tensorboard is installed.
    """

    preset: PresetName | None = None
    unet_n_depth: int = Field(2, ge=1, le=6)
    unet_kern_size: int = Field(5, ge=1, le=15)
    unet_n_first: int = Field(32, ge=1, le=1024)
    unet_residual: bool | None = None
    unet_last_activation: Literal["linear", "relu"] = "linear"
    loss: Literal["l1", "l2", "ssim", "ms-ssim3", "ms-ssim5", "ms-ssim"] = "l1"
    ssim_weights: list[float] | None = None
    ssim_filter_size: int | None = Field(None, ge=1)
    ssim_filter_sigma: float = Field(1.5, gt=0)
    ssim_max_val: float = Field(1.0, gt=0)
    learning_rate: float = Field(4e-4, gt=0, le=1.0)
    batch_size: int = Field(16, ge=1)
    steps_per_epoch: int = Field(400, ge=1)
    epochs: int = Field(100, ge=1)
    reduce_lr: bool = True
    reduce_lr_factor: float = Field(0.5, gt=0, lt=1)
    reduce_lr_patience: int = Field(10, ge=0)
    reduce_lr_min_delta: float = Field(0.0, ge=0)
    early_stopping: int | None = Field(None, ge=1)
    strategy: Literal["auto", "mirrored", "multiworker", "none"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = Field(0, ge=0)
    shuffle_buffer: int | None = Field(None, ge=1)
    validation_batches: int | None = Field(None, ge=1)
    tensorboard: bool = True

    @field_validator("unet_kern_size")
    @classmethod
    def _odd_kernel(cls, v: int) -> int:
        if v % 2 != 1:
            raise ValueError("the kernel size must be odd, e.g. 3 or 5")
        return v

    @model_validator(mode="after")
    def _check_loss(self) -> "TrainConfig":
        from l2l_scale.model.losses import loss_spec

        try:
            loss_spec(self.loss, weights=self.ssim_weights, filter_size=self.ssim_filter_size,
                      filter_sigma=self.ssim_filter_sigma, max_val=self.ssim_max_val)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def loss_spec(self):
        """The validated :class:`~l2l_scale.model.losses.LossSpec`."""
        from l2l_scale.model.losses import loss_spec

        return loss_spec(self.loss, weights=self.ssim_weights, filter_size=self.ssim_filter_size,
                         filter_sigma=self.ssim_filter_sigma, max_val=self.ssim_max_val)


_MODELS = {"PatchConfig": PatchConfig, "TrainConfig": TrainConfig}


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with one-line errors.

    Raises
    ------
    ConfigError
        Missing file, invalid YAML, or not a mapping.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; check the path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path} ({exc}); check the file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values, e.g. 'epochs: 100'")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def train_config(config: str | Path | Mapping[str, Any] | None = None, *, preset: str | None = None,
                 **overrides: Any) -> TrainConfig:
    """Resolve a :class:`TrainConfig`: defaults < preset < config file < ``overrides`` (``None`` ignored).

    Parameters
    ----------
    config : path or mapping, optional
        YAML file (``--config train.yaml``) or a mapping of :class:`TrainConfig` keys.
    preset : str, optional
        Preset name; overrides a ``preset`` key of the file.
    **overrides
        Explicit values, e.g. from command-line flags.

    Raises
    ------
    ConfigError
        Unknown key (the message lists the valid keys), invalid value, or unknown preset.
    """
    source = ""
    if isinstance(config, (str, Path)):
        source = str(config)
        file_values = load_yaml(config)
    else:
        file_values = dict(config or {})
    name = preset if preset is not None else file_values.get("preset")
    p = get_preset(name) if name is not None else None
    merged: dict[str, Any] = p.train_values() if p else {}
    merged.update(file_values)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    if p:
        merged["preset"] = p.name
    try:
        return TrainConfig(**merged)
    except ValidationError as exc:
        raise ConfigError(_first_error(exc, source or "train config")) from None
