"""The speed and memory switches where no GPU is needed: the run_step contract, refusals, the VAE switches.

What needs CUDA (the graphs, compilation, offloading) is tested in test_gpu.py.
"""

import numpy as np
import pytest
import torch

import diffloom
from diffloom_speed.step_graphs import CudaGraphSteps

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of the red cat", height=32, width=48, num_inference_steps=3, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.fixture
def pipe(tiny_sd_path):
    return diffloom.StableDiffusionPipeline.from_pretrained(tiny_sd_path)


def test_run_step_hook_takes_over_the_step_body(pipe):
    class HalfEveryOtherStep:
        denoiser_steps = []

        @diffloom.hookimpl
        def run_step(self, pipe, call, step):
            if step.index % 2 == 0:
                return None  # the pipeline runs the step itself
            return step.latents * 0.5

        @diffloom.hookimpl
        def before_denoiser(self, pipe, call, step):
            self.denoiser_steps.append(step.index)

    class Replay:
        @diffloom.hookimpl
        def on_step_end(self, pipe, call, step):
            if step.index == 1:
                call.tensors["seen"] = step.latents

    taken = HalfEveryOtherStep()
    images = run(pipe, hooks=[taken])
    assert taken.denoiser_steps == [0, 2]
    assert not np.allclose(images, run(pipe))
    assert run(pipe, hooks=[Replay()]).shape == images.shape


def test_graph_steps_decline_off_the_gpu(pipe):
    graphs = CudaGraphSteps()
    np.testing.assert_array_equal(run(pipe, hooks=[graphs]), run(pipe))
    assert graphs.captures == 0 and graphs.replays == 0


def test_refusals(pipe, tiny_sd_path):
    with pytest.raises(RuntimeError, match=r"CUDA GPU.*pipe.to\('cuda'\)"):
        pipe.enable_fast_path()
    upscaler = diffloom.StableDiffusionLatentUpscalePipeline
    assert upscaler.denoiser_components == () == diffloom.StableDiffusionControlNetPipeline.denoiser_components
    with pytest.raises(ValueError, match="must name an accelerator"):
        pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match="warmup"):
        CudaGraphSteps(warmup=0)


def test_vae_switches_match_diffusers(pipe, tiny_sd_path):
    import diffusers

    expected = run(pipe, num_images_per_prompt=2)
    pipe.enable_vae_slicing()
    assert pipe.vae.use_slicing
    np.testing.assert_allclose(run(pipe, num_images_per_prompt=2), expected, atol=1e-5)
    pipe.disable_vae_slicing()
    # Tiles blend at their seams, so tiled images differ from whole ones: exactly as diffusers' do.
    reference = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    reference.vae.enable_tiling()  # diffusers 0.42 dropped the pipeline-level switch
    pipe.enable_vae_tiling()
    tiled = run(pipe)
    assert pipe.vae.use_tiling and not np.allclose(tiled, expected[:1], atol=1e-3)
    np.testing.assert_allclose(tiled, run(reference), atol=1e-5)
    pipe.disable_vae_tiling()
    assert not pipe.vae.use_slicing and not pipe.vae.use_tiling


def test_recordings_tell_processor_settings_apart(pipe):
    # A recording bakes in an attention processor's Python settings (an IP-Adapter's scale), so they must be
    # part of what tells recordings apart, processors with weights (submodules) included.
    from diffloom_speed.step_graphs import _models_state

    class ScaledProcessor(torch.nn.Module):
        def __init__(self, processor):
            super().__init__()
            self.inner = processor
            self.scale = [1.0]

        def forward(self, attn, hidden_states, **kwargs):
            return self.inner(attn, hidden_states, **kwargs)

    layer = next(m for m in pipe.unet.modules() if type(m).__name__ == "Attention")
    layer.set_processor(ScaledProcessor(layer.processor))
    before = _models_state(pipe)
    layer.processor.scale = [0.0]
    assert _models_state(pipe) != before and hash(before) != hash(_models_state(pipe))
    pipe.unet.conv_in.register_forward_hook(lambda module, args, out: out)
    assert _models_state(pipe) is None, "a torch hook's Python would run only when recording"


# -- compiling in the background ----------------------------------------------------------------------------------


class CountingBackend:
    """A torch.compile backend that counts its compilations and runs the traced graph as it is."""

    def __init__(self, fail: bool = False):
        self.compilations = 0
        self.fail = fail

    def __call__(self, graph_module, example_inputs):
        if self.fail:
            raise ValueError("the compiler broke")
        self.compilations += 1
        return graph_module.forward

    def compile(self, fn):
        return torch.compile(fn, backend=self)


class SmallConvNet(torch.nn.Module):
    # Defined here, not built from torch.nn containers: Dynamo does not trace torch's own modules as the outermost
    # frame, which is how nn.Module.compile() (and the background compiler) enter a model.
    def __init__(self):
        super().__init__()
        self.conv_in, self.conv_out = torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv_out(torch.nn.functional.silu(self.conv_in(x)))


def test_background_compiler_compiles_the_first_calls_inputs_off_the_calling_thread():
    from diffloom_speed.background_compile import MAX_SIGNATURES, BackgroundCompiler

    torch.manual_seed(0)
    model = SmallConvNet()
    x = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
    backend = CountingBackend()
    compiler = BackgroundCompiler([model], backend.compile)
    assert compiler.wait() is False and not compiler.busy, "nothing ran yet, so nothing compiles"
    with torch.no_grad():
        assert torch.equal(model(x), expected) and backend.compilations == 0, "the first call runs eagerly"
        x.mul_(0)  # the worker compiles from its own copy of the first call's inputs
        compiler.start()
        assert compiler.wait(timeout=60) is True and compiler.generation == 1
        assert backend.compilations == 1
        # The calling thread's calls now run the compiled code, and its guards hold: no second compilation.
        y = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
        assert torch.allclose(model(y), model._call_impl(y), atol=1e-6)
        assert backend.compilations == 1
        # Inputs of a new shape run eagerly until the worker has compiled for them too.
        z = torch.randn(1, 4, 6, 6)
        assert torch.equal(model(z), model._call_impl(z)) and backend.compilations == 1 and not compiler.compiled
        compiler.start()
        assert compiler.wait(timeout=60) is True and compiler.generation == 2 and backend.compilations == 2
        model(z), model(y)
    assert backend.compilations == 2
    compiler.start()
    assert compiler.generation == 2 and not compiler.busy, "compiled inputs are not compiled again"
    # Past Dynamo's recompile limit, new kinds of input are not kept (a float argument per step would be many).
    later = model._compiled_call_impl
    for size in range(7, 20):
        model(torch.randn(1, 4, size, size))
    assert len(later.ready) + len(later.pending) == MAX_SIGNATURES
    compiler.detach()
    assert model._compiled_call_impl is None


def test_background_compiler_reports_failure_and_keeps_models_eager():
    from diffloom_speed.background_compile import BackgroundCompiler

    model = SmallConvNet()
    compiler = BackgroundCompiler([model], CountingBackend(fail=True).compile)
    x = torch.randn(1, 4, 4, 4)
    model(x)
    compiler.start()
    with pytest.raises(RuntimeError, match="(?s)compiling in the background failed.*the compiler broke"):
        compiler.wait(timeout=60)
    assert not compiler.compiled and torch.equal(model(x), model._call_impl(x))
    compiler.start()
    assert not compiler.busy, "a failed compiler does not retry on every call"
