"""Built-in models. This module stays light: it names classes, the model modules hold them."""

from diffloom import hookimpl

MODELS = {
    "UNet2DModel": "unet_2d",
    "UNet2DConditionModel": "unet_2d_condition",
    "AutoencoderKL": "autoencoder_kl",
    "ControlNetModel": "controlnet",
}


@hookimpl
def register_models(register):
    for name, module in MODELS.items():
        register(name, f"{__name__}.{module}:{name}")
