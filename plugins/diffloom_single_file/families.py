"""Which model a single file holds, told from its keys and shapes, and the configs of the known families.

The configs are those of the public diffusers repos of each family (SD 1.5, SD 2.1 768-v, SDXL 1.0 base and
refiner), shipped here so that a file loads without network. Tokenizers are the one thing a file and these
tables cannot supply: their vocabularies are data files, so they come from ``config=`` or ``tokenizer=``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CONTROLNET_PREFIX = "control_model."

# Buffers of the LDM training wrapper (the DDPM schedule, the loss's log-variance), EMA copies (read only with
# extract_ema=True), the VAE's training loss (LPIPS, discriminator), SGM's denoiser sigmas and the textual-inversion
# trainer's embedding manager: saved in many checkpoints, used by no pipeline.
IGNORED_KEYS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights"}
IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.", "denoiser.", "embedding_manager.")
EMA_PREFIX = "model_ema."


class DetectionError(ValueError):
    """A file whose keys match no family diffloom knows."""


@dataclass(frozen=True)
class Family:
    name: str  # "sd1", "sd2", "sdxl-base" or "sdxl-refiner"
    in_channels: int = 4
    # pipeline component -> (key prefix in the file, "clip" (OpenAI CLIP, transformers names) or "openclip")
    text_encoders: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def inpainting(self) -> bool:
        return self.in_channels == 9

    @property
    def pipeline(self) -> str:
        if self.in_channels in _OTHER_TASKS:
            task, pipeline = _OTHER_TASKS[self.in_channels]
            raise DetectionError(
                f"this file's UNet reads {self.in_channels} input channels, as {task} models do: load it with "
                f"{pipeline}.from_single_file and config= (a diffusers folder of the same model), or load the "
                f"UNet alone with UNet2DConditionModel.from_single_file")
        if self.in_channels not in (4, 9):
            raise DetectionError(f"this file's UNet reads {self.in_channels} input channels, which no Stable "
                                 f"Diffusion pipeline takes; pass config= with the pipeline's diffusers folder")
        if self.name == "sdxl-refiner":
            return "StableDiffusionXLImg2ImgPipeline"
        stem = "StableDiffusionXL" if self.name == "sdxl-base" else "StableDiffusion"
        return f"{stem}{'Inpaint' if self.inpainting else ''}Pipeline"

    @property
    def image_size(self) -> int:
        """The resolution the family was trained at (as diffusers' loader assumes it): SD 2's inpainting model and
        x4 upscaler were trained at 512, not 768."""
        if self.name.startswith("sdxl"):
            return 1024
        return 768 if self.name == "sd2" and self.in_channels in (4, 5) else 512

    @property
    def prediction_type(self) -> str:
        # SD 2's 768 models predict v; its 512-base model predicts noise, which weights cannot tell apart:
        # that one needs config= or a scheduler= of its own. SD 2's inpainting model predicts noise.
        return "v_prediction" if self.name == "sd2" and self.in_channels == 4 else "epsilon"


TEXT_ENCODERS = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", "clip")},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "openclip")},
    "sdxl-base": {"text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
                  "text_encoder_2": ("conditioner.embedders.1.model.", "openclip")},
    "sdxl-refiner": {"text_encoder_2": ("conditioner.embedders.0.model.", "openclip")},
}
# UNets whose inputs are the latents plus a task's conditioning, which the generic pipelines cannot drive.
_OTHER_TASKS = {8: ("instruct-pix2pix", "StableDiffusionInstructPix2PixPipeline"),
                5: ("depth-to-image", "StableDiffusionDepth2ImgPipeline"),
                7: ("x4 upscaler", "StableDiffusionUpscalePipeline")}
# The cross-attention width of each family's UNet: what its text encoder(s) produce.
_CONTEXT_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl-base", 1280: "sdxl-refiner"}


def detect(shapes: dict) -> Family:
    """The family of a checkpoint from ``{key: shape}`` (tensors work too: only ``.shape`` is read)."""
    keys = list(shapes)

    def shape(key):
        value = shapes[key]
        return tuple(getattr(value, "shape", value))

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if has("conditioner.embedders.1.model."):
        name = "sdxl-base"
    elif has("conditioner.embedders.0.model."):
        name = "sdxl-refiner"
    elif has("cond_stage_model.model."):
        name = "sd2"
    elif has("cond_stage_model.transformer."):
        name = "sd1"
    else:
        # A file without text encoder (a UNet or ControlNet alone): the cross-attention width tells.
        width = next((shape(k)[1] for k in keys if re.search(r"attn2\.to_k\.weight$", k)), None)
        if width not in _CONTEXT_DIM:
            raise DetectionError(
                f"cannot tell which model this file holds: it has no known text encoder keys "
                f"(cond_stage_model.*, conditioner.embedders.*) and "
                f"{'no cross-attention layers' if width is None else f'a {width}-wide cross-attention'}; "
                f"pass config= (a diffusers folder or Hub id of the same model)")
        name = _CONTEXT_DIM[width]
    return Family(name, in_channels(shapes), TEXT_ENCODERS[name])


def in_channels(shapes: dict) -> int:
    """The UNet's input channels: its first conv, under the pipeline prefix or (a UNet alone) at the top level, in
    either layout; 4 when the file holds no UNet."""
    for key in (f"{UNET_PREFIX}input_blocks.0.0.weight", "input_blocks.0.0.weight", "conv_in.weight"):
        if key in shapes:
            return tuple(getattr(shapes[key], "shape", shapes[key]))[1]
    return 4


# -- configs of the known families --------------------------------------------------------------------------

_SD1_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8)
UNET = {
    "sd1": _SD1_UNET,
    "sd2": {**_SD1_UNET, "sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
            "use_linear_projection": True},
    "sdxl-base": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                      block_out_channels=(320, 640, 1280),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                      cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                      addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
    "sdxl-refiner": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                         block_out_channels=(384, 768, 1536, 1536),
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                           "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                         transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24),
                         cross_attention_dim=1280, use_linear_projection=True, addition_embed_type="text_time",
                         addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560),
}

_SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
               block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215)
_SDXL_VAE = {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
VAE = {"sd1": _SD_VAE, "sd2": {**_SD_VAE, "sample_size": 768}, "sdxl-base": _SDXL_VAE, "sdxl-refiner": _SDXL_VAE}

# CLIP text towers: OpenAI ViT-L/14, OpenCLIP ViT-H/14 (SD 2 keeps 23 of its 24 layers), OpenCLIP ViT-bigG/14.
_CLIP_IDS = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
_CLIP_L = dict(_CLIP_IDS, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               hidden_act="quick_gelu", projection_dim=768)
_CLIP_H = dict(_CLIP_IDS, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
               hidden_act="gelu", projection_dim=512)
_CLIP_BIGG = dict(_CLIP_IDS, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, hidden_act="gelu", projection_dim=1280)
# component -> (transformers class, config) per family
TEXT = {
    "sd1": {"text_encoder": ("CLIPTextModel", _CLIP_L)},
    "sd2": {"text_encoder": ("CLIPTextModel", _CLIP_H)},
    "sdxl-base": {"text_encoder": ("CLIPTextModel", _CLIP_L),
                  "text_encoder_2": ("CLIPTextModelWithProjection", _CLIP_BIGG)},
    "sdxl-refiner": {"text_encoder_2": ("CLIPTextModelWithProjection", _CLIP_BIGG)},
}

_SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1, clip_sample=False, set_alpha_to_one=False)
# scheduler class and config per family
SCHEDULER = {
    "sd1": ("PNDMScheduler", dict(_SD_BETAS, skip_prk_steps=True)),
    "sd2": ("DDIMScheduler", dict(_SD_BETAS, prediction_type="v_prediction")),
    "sdxl-base": ("EulerDiscreteScheduler", dict(_SD_BETAS, interpolation_type="linear",
                                                 timestep_spacing="leading", use_karras_sigmas=False)),
}
SCHEDULER["sdxl-refiner"] = SCHEDULER["sdxl-base"]
# The scheduler settings from_single_file starts from when prediction_type= or scheduler_type= is given: Stable
# Diffusion's training schedule with the usual sampling settings, whatever config= holds.
SCHEDULER_TRAINING = dict(_SD_BETAS, skip_prk_steps=True, timestep_spacing="leading", interpolation_type="linear",
                          sample_max_value=1.0, prediction_type="epsilon")
# from_single_file's scheduler_type= names (the original conversion script's) -> scheduler class
SCHEDULER_TYPES = {"pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler", "heun": "HeunDiscreteScheduler",
                   "euler": "EulerDiscreteScheduler", "euler-ancestral": "EulerAncestralDiscreteScheduler",
                   "dpm": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler"}

# Pipeline settings that differ by family (as the public repos' model_index.json files set them).
SETTINGS = {"sdxl-refiner": {"requires_aesthetics_score": True, "force_zeros_for_empty_prompt": False}}


def unet_config(family: Family) -> dict:
    return {**UNET[family.name], "in_channels": family.in_channels}
