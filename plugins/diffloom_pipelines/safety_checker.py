"""The Stable Diffusion safety checker: a CLIP image embedding compared with fixed concept embeddings.

Each generated image is embedded with a CLIP vision tower and projected; its cosine similarity to each of 17
concept embeddings, minus that concept's threshold, is its score for the concept. Three "special care" concepts
are checked first: when one of them scores above zero, every later concept is judged 0.01 more strictly. An
image with any concept score above zero is flagged and replaced by a black image.

Parameter names and the config (a transformers ``CLIPConfig``) are those of the checkpoints on the Hub, so
their ``safety_checker`` folders load unchanged.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from transformers import CLIPConfig, CLIPVisionModel, PreTrainedModel

logger = logging.getLogger(__name__)

NUM_CONCEPTS = 17
NUM_SPECIAL_CARE = 3
SPECIAL_CARE_ADJUSTMENT = 0.01


def _cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    sim = nn.functional.normalize(a) @ nn.functional.normalize(b).t()
    return sim.cpu().float().numpy()


class StableDiffusionSafetyChecker(PreTrainedModel):
    config_class = CLIPConfig
    main_input_name = "clip_input"
    _no_split_modules = ["CLIPEncoderLayer"]

    def __init__(self, config: CLIPConfig):
        super().__init__(config)
        self.vision_model = CLIPVisionModel(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        # Fixed data, not trained: the concept embeddings and their thresholds.
        self.concept_embeds = nn.Parameter(torch.ones(NUM_CONCEPTS, config.projection_dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(NUM_SPECIAL_CARE, config.projection_dim),
                                                requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.ones(NUM_CONCEPTS), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.ones(NUM_SPECIAL_CARE), requires_grad=False)
        self.post_init()

    def flags(self, clip_input: torch.Tensor) -> list[bool]:
        """Whether each image (as CLIP pixel values) shows a flagged concept."""
        embeds = self.visual_projection(self.vision_model(clip_input)[1])
        special = _cosine(embeds, self.special_care_embeds)
        concepts = _cosine(embeds, self.concept_embeds)
        special_thresholds = self.special_care_embeds_weights.float().cpu().numpy()
        concept_thresholds = self.concept_embeds_weights.float().cpu().numpy()
        flagged = []
        for sims_special, sims in zip(special, concepts):
            # Scores are float32 and compared after rounding to 3 decimals, as the reference checker does.
            adjustment = 0.0
            for sim, threshold in zip(sims_special, special_thresholds):
                if np.round(sim - threshold + adjustment, 3) > 0:
                    adjustment = SPECIAL_CARE_ADJUSTMENT
            scores = np.round(sims - concept_thresholds + np.float32(adjustment), 3)
            flagged.append(bool((scores > 0).any()))
        return flagged

    @torch.no_grad()
    def forward(self, clip_input: torch.Tensor, images):
        """``(images, has_nsfw_concepts)``: flagged images (tensor or numpy batch) are replaced by zeros."""
        flagged = self.flags(clip_input)
        if any(flagged):
            logger.warning("Potential NSFW content was detected in %d of %d images; they are returned black. "
                           "Try another prompt or seed.", sum(flagged), len(flagged))
            if torch.is_tensor(images):
                keep = torch.tensor([not f for f in flagged], device=images.device).view(-1, *[1] * (images.ndim - 1))
                images = torch.where(keep, images, torch.zeros_like(images))
            elif isinstance(images, np.ndarray):
                images = images.copy()
                images[np.array(flagged)] = 0
            else:  # a list of per-image tensors or arrays
                images = [(torch.zeros_like(im) if torch.is_tensor(im) else np.zeros_like(im)) if f else im
                          for im, f in zip(images, flagged)]
        return images, flagged
