"""Built-in schedulers. This module stays light: it names classes, the scheduler modules hold them."""

from diffloom import hookimpl

SCHEDULERS = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "pndm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "HeunDiscreteScheduler": "heun",
    "LMSDiscreteScheduler": "lms",
    "DPMSolverMultistepScheduler": "dpmsolver_multistep",
    "UniPCMultistepScheduler": "unipc_multistep",
    "DEISMultistepScheduler": "deis_multistep",
    "LCMScheduler": "lcm",
    "KDPM2DiscreteScheduler": "k_dpm_2",
    "KDPM2AncestralDiscreteScheduler": "k_dpm_2_ancestral",
    "DPMSolverSinglestepScheduler": "dpmsolver_singlestep",
    "TCDScheduler": "tcd",
    "EDMEulerScheduler": "edm_euler",
    "DDIMInverseScheduler": "ddim_inverse",
}


@hookimpl
def register_schedulers(register):
    for name, module in SCHEDULERS.items():
        register(name, f"{__name__}.{module}:{name}")
