"""CLIP's zero-shot classifier as a trainable head (method.head_init zeroshot / linear_probe).

The head sits on CLIP's own image embedding: the pooled, post-layernorm class token, projected and L2-normalised.
Its weight is the logit scale times the normalised, template-averaged text embeddings of the class prompts, its bias
zero, so before training its logits are CLIP's image-text similarity logits. The text tower is used once, to build
the head, and is not part of the model that trains or is exported.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
from transformers.modeling_outputs import ImageClassifierOutput

from fulltune.config import Config, ConfigError
from fulltune.files.safestate import require_safetensors
from fulltune.model.bundle import ModelBundle, image_spec_for, load_tokenizer

CLIP_TYPES = ("clip", "clip_vision_model")


EMBEDDING_CLASSIFIER_TYPE = "clip_vision_model"
"""model_type of an exported embedding classifier (CLIPForImageClassification exports are 'clip')."""


class CLIPEmbeddingClassifier(CLIPVisionModelWithProjection):
    """CLIPVisionModelWithProjection plus a linear classifier on the normalised image embedding.

    Parameter names are CLIPModel's for the vision side (vision_model.*, visual_projection.weight), plus
    classifier.{weight,bias}: plain transformers loads the tower and projection of an export with
    CLIPVisionModelWithProjection, and the classifier is two tensors of the same safetensors file.
    """

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__(config)
        self.classifier = nn.Linear(config.projection_dim, config.num_labels)
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs: Any
    ) -> ImageClassifierOutput:
        out = super().forward(pixel_values=pixel_values, **kwargs)
        embeds = out.image_embeds  # (batch, projection_dim)
        logits = self.classifier(embeds / embeds.norm(dim=-1, keepdim=True))  # (batch, num_labels)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )


def is_embedding_classifier(folder: str | Path) -> bool:
    """Whether an exported folder holds a CLIPEmbeddingClassifier (by its config's model_type)."""
    path = Path(folder) / "config.json"
    return path.is_file() and json.loads(path.read_text()).get("model_type") == EMBEDDING_CLASSIFIER_TYPE


def class_names(cfg: Config, labels: list[str]) -> list[str]:
    """Names for the prompts, in label order: data.class_names (a {label: name} map or a list), else the label
    with underscores as spaces."""
    given = cfg.data.class_names
    if isinstance(given, list):
        if len(given) != len(labels):
            raise ConfigError(
                f"data.class_names has {len(given)} names but the data has {len(labels)} classes "
                f"({', '.join(labels[:10])}{', ...' if len(labels) > 10 else ''})"
            )
        return list(given)
    given = given or {}
    unknown = sorted(set(given) - set(labels))
    if unknown:
        raise ConfigError(
            f"data.class_names: {', '.join(unknown[:5])} not among the classes ({', '.join(labels[:10])})"
        )
    return [given.get(label, label.replace("_", " ")) for label in labels]


@torch.no_grad()
def text_head(clip: nn.Module, tokenizer: Any, names: list[str], templates: list[str]) -> torch.Tensor:
    """(num_classes, projection_dim): logit scale x the renormalised mean of each class's normalised prompt
    embeddings (the CLIP paper's prompt ensemble, in embedding space)."""
    clip.eval()
    text_cfg = clip.config.text_config
    rows = []
    for name in names:
        tok = tokenizer(
            [t.format(name) for t in templates],
            padding=True,
            truncation=True,
            max_length=text_cfg.max_position_embeddings,
            return_tensors="pt",
        )
        if int(tok["input_ids"].max()) >= text_cfg.vocab_size:
            raise ConfigError(
                f"the tokenizer gives token ids up to {int(tok['input_ids'].max())} but the CLIP text "
                f"tower has a vocabulary of {text_cfg.vocab_size}: model.tokenizer does not fit the model"
            )
        out = clip.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        embeds = out if torch.is_tensor(out) else out.pooler_output  # (templates, projection_dim)
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        mean = embeds.mean(0)
        rows.append(mean / mean.norm())
    return torch.stack(rows) * clip.logit_scale.exp()


def _vision_config(clip_config: Any, labels: list[str]) -> CLIPVisionConfig:
    vision = copy.deepcopy(clip_config.vision_config)
    vision.projection_dim = clip_config.projection_dim
    vision.num_labels = len(labels)
    vision.id2label = dict(enumerate(labels))
    vision.label2id = {name: i for i, name in enumerate(labels)}
    vision.architectures = [CLIPEmbeddingClassifier.__name__]
    return vision


def _load_clip(cfg: Config, path: str | None, config: Any) -> nn.Module:
    """The full CLIP model (text and vision towers) as configured: random for tiny_config, else from `path`."""
    import transformers as tf

    if path is None:
        return tf.CLIPModel(config)
    stored = tf.AutoConfig.from_pretrained(path, revision=cfg.model.revision).model_type  # before build_model's wrap
    if stored != "clip":
        raise ConfigError(
            f"model.name_or_path '{cfg.model.name_or_path}' is a {stored} (vision tower only): the "
            "zero-shot head needs a CLIP model with its text tower"
        )
    tf.logging.set_verbosity_error()
    try:
        require_safetensors(path, "model.name_or_path")
        clip, info = tf.CLIPModel.from_pretrained(
            path, config=config, revision=cfg.model.revision, output_loading_info=True, use_safetensors=True
        )
    finally:
        tf.logging.set_verbosity_warning()
    # A vision-only folder loads too, with a random text tower: that would be a zero-shot head of noise.
    missing = [k for k in info["missing_keys"] if k.startswith(("text_model.", "text_projection.", "logit_scale"))]
    if missing:
        raise ConfigError(
            f"model.name_or_path '{cfg.model.name_or_path}' has no CLIP text tower weights (missing "
            f"{', '.join(missing[:3])}, ...): the zero-shot head needs them"
        )
    return clip


def _tokenizer(cfg: Config, path: str | None) -> Any:
    if path is None and cfg.model.tokenizer is None:
        raise ConfigError("method.head_init needs the CLIP tokenizer: model.tiny_config models need model.tokenizer")
    try:
        return load_tokenizer(cfg, path)
    except ConfigError:
        raise
    except ValueError as err:  # transformers' "Couldn't instantiate the backend tokenizer" for a folder without one
        raise ConfigError(
            f"method.head_init needs the CLIP tokenizer; none in '{cfg.model.tokenizer or path}' "
            f"({str(err).splitlines()[0]})"
        ) from None


def build_embedding_classifier(cfg: Config, path: str | None, config: Any, labels: list[str]) -> ModelBundle:
    """CLIP's image tower, projection and a zero-shot head for `labels`; the text tower is dropped afterwards."""
    if config.model_type != "clip" or getattr(config, "text_config", None) is None:
        raise ConfigError(
            f"method.head_init={cfg.method.head_init}: the zero-shot head needs a CLIP model with its text "
            f"tower; model '{cfg.model.name_or_path}' is a {config.model_type}"
        )
    clip = _load_clip(cfg, path, config).float()
    tokenizer = _tokenizer(cfg, path)
    names = class_names(cfg, labels)
    head = text_head(clip, tokenizer, names, cfg.method.prompt_templates)
    model = CLIPEmbeddingClassifier(_vision_config(clip.config, labels)).float()
    model.vision_model.load_state_dict(clip.vision_model.state_dict())
    model.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    with torch.no_grad():
        model.classifier.weight.copy_(head)
        model.classifier.bias.zero_()
    scale = float(clip.logit_scale.detach().exp())
    del clip
    print(
        f"head_init {cfg.method.head_init}: zero-shot head from {len(cfg.method.prompt_templates)} prompts x "
        f"{len(names)} classes ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}), logit scale {scale:.4g}; "
        "the text tower is dropped"
    )
    bundle = ModelBundle(
        model=model,
        task="image_classification",
        source=path or "tiny_config",
        extra={"class_names": names, "logit_scale": scale},
    )
    bundle.image_spec = image_spec_for(model.config, path, cfg.data.image_size)
    return bundle


def build_for_head_init(
    cfg: Config, task: str, path: str | None, config: Any, labels: list[str] | None
) -> ModelBundle | None:
    """The model for method.head_init, or None where build_model's ordinary head is the one to use.

    zeroshot needs a CLIP with its text tower and tokenizer. linear_probe on such a CLIP probes from the zero-shot
    head on CLIP's embedding; on any other model (or a CLIP without a tokenizer) it probes the ordinary random head.
    """
    head_init = cfg.method.head_init
    if head_init == "random":
        return None
    is_clip = task == "image_classification" and config.model_type in CLIP_TYPES and bool(labels)
    if head_init == "zeroshot":
        if not is_clip:
            raise ConfigError(
                f"method.head_init=zeroshot needs a CLIP image classifier; this run is {task} with a "
                f"{config.model_type} model (use head_init random or linear_probe)"
            )
        return build_embedding_classifier(cfg, path, config, labels)
    if is_clip and config.model_type == "clip" and (path is not None or cfg.model.tokenizer is not None):
        try:
            return build_embedding_classifier(cfg, path, config, labels)
        except ConfigError as err:
            print(f"head_init linear_probe: no zero-shot head ({err}); probing the model's random head")
    return None
