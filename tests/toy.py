"""Tiny components defined here, for testing the core without the model plugins."""

import torch

from diffloom import DiffusionPipeline, ModelMixin, SchedulerMixin, hookimpl, register_to_config


class ToyModel(ModelMixin):
    @register_to_config
    def __init__(self, dim=4, hidden=6):
        super().__init__()
        self.inp = torch.nn.Linear(dim, hidden)
        self.out = torch.nn.Linear(hidden, dim)

    def forward(self, x, t):
        return self.out(torch.tanh(self.inp(x))) * 0.1


class ToyScheduler(SchedulerMixin):
    @register_to_config
    def __init__(self, num_train_timesteps=10, step_size=1.0):
        self.timesteps = None

    def set_timesteps(self, num_inference_steps, device=None):
        self.timesteps = torch.arange(num_inference_steps).flip(0)

    def scale_model_input(self, sample, timestep):
        return sample

    def step(self, model_output, timestep, sample, return_dict=True):
        return (sample - self.config.step_size * model_output,)


class ToyPipeline(DiffusionPipeline):
    _optional_components = ["extra"]
    _callback_tensor_inputs = ["latents", "cond"]

    def __init__(self, model, scheduler, extra=None, flavour="plain"):
        super().__init__()
        self.register_modules(model=model, scheduler=scheduler, extra=extra)
        self.register_to_config(flavour=flavour)

    def run_denoiser(self, call, step):
        return self.model(step.model_input + call.tensors["cond"], step.model_timestep)

    @torch.no_grad()
    def __call__(self, steps=3, x=None, hooks=(), callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=None):
        with self.start_call(hooks=hooks, callback_on_step_end=callback_on_step_end,
                             callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs) as call:
            call.hook.on_call_start(pipe=self, call=call)
            self.scheduler.set_timesteps(steps)
            call.tensors["cond"] = torch.zeros(1, self.model.config.dim)
            x = torch.ones(1, self.model.config.dim) if x is None else x
            out = self.denoise(call, x, self.scheduler.timesteps)
            out = call.fire_after_decode(out)
            call.hook.on_call_end(pipe=self, call=call, output=out)
            return out


class ToyPlugin:
    @hookimpl
    def register_pipelines(self, register):
        register("ToyPipeline", ToyPipeline)

    @hookimpl
    def register_models(self, register):
        register("ToyModel", ToyModel)

    @hookimpl
    def register_schedulers(self, register):
        register("ToyScheduler", ToyScheduler)
