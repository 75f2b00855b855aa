"""Built-in pipelines. This module stays light: it names classes, the pipeline modules hold them.

Pipelines that the AutoPipeline classes may pick register ``family`` (the model family, as diffusers' auto
mappings name it: "stable-diffusion", "stable-diffusion-xl"...) and ``task`` ("text2image", "image2image" or
"inpaint"); a pipeline that also drives a ControlNet adds ``variant="controlnet"``. Another plugin joins the
AutoPipelines the same way, by registering its pipelines with those keys.
"""

from diffloom import hookimpl

# name -> (module, registration meta)
PIPELINES = {
    "DDPMPipeline": ("ddpm", {}),
    "DDIMPipeline": ("ddim", {}),
    "StableDiffusionPipeline": ("stable_diffusion", {"family": "stable-diffusion", "task": "text2image"}),
    "StableDiffusionImg2ImgPipeline": ("img2img", {"family": "stable-diffusion", "task": "image2image"}),
    "StableDiffusionInpaintPipeline": ("inpaint", {"family": "stable-diffusion", "task": "inpaint"}),
    "StableDiffusionXLPipeline": ("sdxl", {"family": "stable-diffusion-xl", "task": "text2image"}),
    "StableDiffusionXLImg2ImgPipeline": ("sdxl", {"family": "stable-diffusion-xl", "task": "image2image"}),
    "StableDiffusionControlNetPipeline": ("controlnet", {"family": "stable-diffusion", "task": "text2image",
                                                         "variant": "controlnet"}),
    "StableDiffusionControlNetImg2ImgPipeline": ("controlnet_img2img", {"family": "stable-diffusion",
                                                                        "task": "image2image",
                                                                        "variant": "controlnet"}),
    "StableDiffusionControlNetInpaintPipeline": ("controlnet_inpaint", {"family": "stable-diffusion",
                                                                        "task": "inpaint", "variant": "controlnet"}),
    "StableDiffusionXLInpaintPipeline": ("sdxl_inpaint", {"family": "stable-diffusion-xl", "task": "inpaint"}),
    "StableDiffusionXLControlNetPipeline": ("controlnet", {"family": "stable-diffusion-xl", "task": "text2image",
                                                           "variant": "controlnet"}),
    "StableDiffusionUpscalePipeline": ("upscale", {}),
    "StableDiffusionLatentUpscalePipeline": ("upscale", {}),
    "StableDiffusionDepth2ImgPipeline": ("depth2img", {}),
    "AutoPipelineForText2Image": ("auto", {}),
    "AutoPipelineForImage2Image": ("auto", {}),
    "AutoPipelineForInpainting": ("auto", {}),
}


@hookimpl
def register_pipelines(register):
    for name, (module, meta) in PIPELINES.items():
        register(name, f"{__name__}.{module}:{name}", **meta)


@hookimpl
def register_models(register):
    # diffusers files the safety checker under its pipeline module, and model_index.json says so.
    register("StableDiffusionSafetyChecker", f"{__name__}.safety_checker:StableDiffusionSafetyChecker",
             library="stable_diffusion")
    register("MultiControlNetModel", f"{__name__}.controlnet:MultiControlNetModel")
