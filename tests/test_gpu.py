"""float16 on a CUDA GPU: diffloom's SD and SDXL pipelines against diffusers', on tiny folders diffusers wrote.

Both libraries load the same folder in float16, run on the GPU from the same seed (a CUDA generator), and must
give the same images within float16 rounding. Skipped where CUDA is absent.
"""

import diffusers
import numpy as np
import pytest
import torch

import diffloom
import tiny

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Images are in [0, 1]; float16 keeps about 3 decimal digits, and kernels may order sums differently.
TOL = 5e-3


def run(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"height": tiny.IMAGE_HEIGHT, "width": tiny.IMAGE_WIDTH, **kwargs}
    out = pipe(prompt=["a photo of the red cat", "the dog"], num_inference_steps=4, output_type="np",
               generator=torch.Generator("cuda").manual_seed(0), **kwargs)
    return np.asarray(out.images, dtype=np.float32)


@pytest.fixture(scope="module")
def tiny_sdxl_path(tmp_path_factory):
    return tiny.save_sdxl_folder(tmp_path_factory.mktemp("tiny-sdxl") / "pipe")


@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
def test_sd_float16_matches_diffusers(tiny_sd_path, guidance_scale):
    ours = diffloom.StableDiffusionPipeline.from_pretrained(tiny_sd_path, torch_dtype=torch.float16).to("cuda")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_path, torch_dtype=torch.float16).to("cuda")
    assert ours.unet.dtype == torch.float16 and ours.device.type == "cuda"
    a, b = run(ours, guidance_scale=guidance_scale), run(ref, guidance_scale=guidance_scale)
    assert np.isfinite(a).all() and a.std() > 0, "the images are not finite or are flat"
    assert np.abs(a - b).max() <= TOL, f"max abs difference {np.abs(a - b).max()}"


def test_sdxl_float16_matches_diffusers(tiny_sdxl_path):
    ours = diffloom.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, torch_dtype=torch.float16).to("cuda")
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, torch_dtype=torch.float16).to("cuda")
    a, b = run(ours), run(ref)
    assert np.isfinite(a).all() and a.std() > 0, "the images are not finite or are flat"
    assert np.abs(a - b).max() <= TOL, f"max abs difference {np.abs(a - b).max()}"


# -- the fast path and the memory options -------------------------------------------------------------------------


def psnr(a, b) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def sd_pipe(path):
    pipe = diffloom.StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("compile", [False, True], ids=["quick", "compiled"])
def test_fast_path_matches_eager_and_records_once(tiny_sd_path, compile):
    pipe = sd_pipe(tiny_sd_path)
    eager = run(pipe)
    eager_cfg3 = run(pipe, guidance_scale=3.0)
    pipe.enable_fast_path(compile=compile)
    graphs = pipe.hooks[-1]
    # The first call replays graphs of the eager kernels; compilation (if asked) runs in the background after it,
    # and the calls after it record once more, over the compiled kernels.
    first = run(pipe)
    assert pipe.wait_for_fast_path() is compile
    compilations = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    second, third = run(pipe), run(pipe)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compilations, "a caller waited for a compile"
    steps = pipe.num_timesteps  # PNDM runs one model call more than num_inference_steps
    captures = 1 + compile
    assert graphs.captures == captures and graphs.replays == 3 * steps, (graphs.captures, graphs.replays, steps)
    assert np.array_equal(second, third), "two replays of the same call differ"
    for images in (first, second):
        assert psnr(images, eager) >= 35 and np.abs(images - eager).max() <= 2e-2, \
            (psnr(images, eager), np.abs(images - eager).max())
    # A new guidance scale is baked into a new recording, not read from the old one.
    assert psnr(run(pipe, guidance_scale=3.0), eager_cfg3) >= 35 and graphs.captures == captures + 1
    pipe.disable_fast_path()
    assert pipe.hooks == [] and np.abs(run(pipe) - eager).max() <= TOL


def test_fast_path_compiles_new_sizes_in_the_background(tiny_sd_path):
    pipe = sd_pipe(tiny_sd_path)
    pipe.enable_fast_path()
    run(pipe)
    assert pipe.wait_for_fast_path()
    compilations = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    wide = dict(height=tiny.IMAGE_HEIGHT, width=2 * tiny.IMAGE_WIDTH)
    eager_wide = run(pipe, **wide)  # a new size: graphs of eager kernels, while the worker compiles for it
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compilations
    assert pipe.wait_for_fast_path() and torch._dynamo.utils.counters["stats"]["unique_graphs"] > compilations
    assert psnr(run(pipe, **wide), eager_wide) >= 35


def test_fast_path_keeps_callbacks_and_falls_back_where_it_must(tiny_sd_path):
    pipe = sd_pipe(tiny_sd_path)
    seen = []

    def halve_latents_at_step_1(p, i, t, kwargs):
        seen.append(kwargs["latents"].clone())
        if i == 1:
            kwargs["latents"] = kwargs["latents"] * 0.5
        return kwargs

    def stop_after_2(p, i, t, kwargs):
        if i == 1:
            p._interrupt = True
        return kwargs

    eager = run(pipe, callback_on_step_end=halve_latents_at_step_1)
    eager_seen, seen[:] = list(seen), []
    eager_stopped = run(pipe, callback_on_step_end=stop_after_2)
    pipe.enable_fast_path(compile=False)
    fast = run(pipe, callback_on_step_end=halve_latents_at_step_1)
    assert psnr(fast, eager) >= 35, psnr(fast, eager)
    assert len(seen) == len(eager_seen)
    largest = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(seen, eager_seen))
    assert largest < 2e-2, largest
    stopped = run(pipe, callback_on_step_end=stop_after_2)
    assert psnr(stopped, eager_stopped) >= 35, psnr(stopped, eager_stopped)
    # A before_denoiser hook must see every step: the graphs step aside.
    graphs = pipe.hooks[-1]
    replays = graphs.replays

    class CountDenoiserCalls:
        calls = 0

        @diffloom.hookimpl
        def before_denoiser(self, pipe, call, step):
            CountDenoiserCalls.calls += 1

    counted, plain = run(pipe, hooks=[CountDenoiserCalls()]), run(pipe)
    assert psnr(counted, plain) >= 35, psnr(counted, plain)
    steps = pipe.num_timesteps
    assert CountDenoiserCalls.calls == steps and graphs.replays == replays + steps


def test_fast_path_steps_aside_for_unfused_lora(tiny_sd_path):
    pipe = sd_pipe(tiny_sd_path)
    pipe.enable_fast_path(compile=False)
    graphs = pipe.hooks[-1]
    # A forward hook stands for what an unfused LoRA adds: Python that a recording would run only once.
    handle = pipe.unet.conv_in.register_forward_hook(lambda module, args, out: out * 2)
    hooked = run(pipe)
    assert graphs.replays == 0
    handle.remove()
    assert psnr(run(pipe), hooked) < 35 and graphs.replays == pipe.num_timesteps


def test_sdxl_fast_path_matches_eager(tiny_sdxl_path):
    pipe = diffloom.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, torch_dtype=torch.float16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    eager = run(pipe)
    pipe.enable_fast_path(compile=False)
    fast = run(pipe)
    assert pipe.hooks[-1].replays == pipe.num_timesteps and psnr(fast, eager) >= 35


def test_model_cpu_offload_matches_and_keeps_models_off_the_gpu(tiny_sd_path):
    pipe = sd_pipe(tiny_sd_path)
    expected = run(pipe)
    pipe.enable_model_cpu_offload()
    assert pipe.device.type == "cuda" and pipe.unet.device.type == "cpu"
    images = run(pipe)
    assert np.abs(images - expected).max() <= TOL, np.abs(images - expected).max()
    # Only the last model used (the VAE) is left on the GPU; the others wait in pinned memory.
    assert pipe.vae.device.type == "cuda" and pipe.unet.device.type == "cpu"
    assert pipe.text_encoder.device.type == "cpu" and pipe.unet.conv_in.weight.is_pinned()
    # A weight changed on the GPU (as by fusing a LoRA) goes back with the model, not lost.
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias.add_(0.1)
    changed = run(pipe)
    assert np.abs(run(pipe) - changed).max() == 0 and np.abs(changed - expected).max() > 0.05
    with pytest.raises(RuntimeError, match="offloads its models"):
        pipe.enable_fast_path()
    pipe.remove_all_hooks()
    pipe.to("cuda")
    assert np.abs(run(pipe) - changed).max() <= TOL


def test_fast_path_follows_processor_settings(tiny_sd_path):
    # An IP-Adapter-like processor (a module with a Python scale): changing the scale between calls must give
    # a new recording, not replay the old scale.
    class ScaledProcessor(torch.nn.Module):
        def __init__(self, processor):
            super().__init__()
            self.inner = processor
            self.scale = [1.0]

        def forward(self, attn, hidden_states, **kwargs):
            return self.inner(attn, hidden_states, **kwargs) * self.scale[0]

    pipe = sd_pipe(tiny_sd_path)
    layer = next(m for m in pipe.unet.modules() if type(m).__name__ == "Attention")
    layer.set_processor(ScaledProcessor(layer.processor))
    layer.processor.scale = [0.5]
    eager_half = run(pipe)
    layer.processor.scale = [1.0]
    pipe.enable_fast_path(compile=False)
    full = run(pipe)
    layer.processor.scale = [0.5]
    half = run(pipe)
    assert pipe.hooks[-1].captures == 2
    assert psnr(half, eager_half) >= 35 and psnr(half, full) < psnr(half, eager_half)


def test_fast_path_serves_threads_at_once(tiny_sd_path):
    # Two threads share one pipeline and its recordings: each call checks a recording out for its step, so
    # concurrent calls never replay into each other's buffers.
    from concurrent.futures import ThreadPoolExecutor

    pipe = sd_pipe(tiny_sd_path)
    pipe.enable_fast_path(compile=False)

    def call(seed):
        out = pipe(prompt=["a photo of the red cat", "the dog"][seed % 2], height=tiny.IMAGE_HEIGHT,
                   width=tiny.IMAGE_WIDTH, num_inference_steps=4, output_type="np",
                   generator=torch.Generator("cuda").manual_seed(seed))
        return np.asarray(out.images, dtype=np.float32)

    alone = [call(seed) for seed in range(6)]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(call, range(6)))
    for a, b in zip(alone, together):
        assert np.array_equal(a, b)


def test_sdxl_float16_vae_first_upcasts_only_on_overflow(tiny_sdxl_path):
    pipe = diffloom.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, torch_dtype=torch.float16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.force_upcast
    upcast = run(pipe)
    pipe.vae_float16_first = True
    assert psnr(run(pipe), upcast) >= 35
    # A decoder that overflows in float16 (but not in float32) falls back to the float32 decode, exactly.
    with torch.no_grad():
        pipe.vae.decoder.conv_in.weight.mul_(1e5)
    pipe.vae_float16_first = False
    overflowing = run(pipe)
    pipe.vae_float16_first = True
    assert np.array_equal(run(pipe), overflowing)
