"""Loop hooks: every execution point fires in order with the right arguments, changes take effect, and per-call
hooks stay with their call. Runs on the toy pipeline; the pipeline tests check the same on Stable Diffusion."""

import logging
import threading

import pytest
import torch

from diffloom import LatentPreview, StepBudget, hookimpl
from diffloom.loop import CallbackError
from diffloom.registry import registry
from toy import ToyModel, ToyPipeline, ToyScheduler


@pytest.fixture
def pipe():
    torch.manual_seed(0)
    p = ToyPipeline(ToyModel(), ToyScheduler())
    p.set_progress_bar_config(disable=True)
    return p


class Recorder:
    def __init__(self):
        self.events = []

    @hookimpl
    def on_call_start(self, pipe, call):
        self.events.append(("call_start", call.num_timesteps))

    @hookimpl
    def on_step_begin(self, pipe, call, step):
        self.events.append(("step_begin", step.index, int(step.timestep)))

    @hookimpl
    def before_denoiser(self, pipe, call, step):
        assert step.model_input is not None and step.model_output is None
        self.events.append(("before_denoiser", step.index))

    @hookimpl
    def after_denoiser(self, pipe, call, step):
        assert step.model_output is not None and step.noise_pred is None
        self.events.append(("after_denoiser", step.index))

    @hookimpl
    def on_step_end(self, pipe, call, step):
        self.events.append(("step_end", step.index))

    @hookimpl
    def after_decode(self, pipe, call, images):
        self.events.append(("after_decode", tuple(images.shape)))

    @hookimpl
    def on_call_end(self, pipe, call, output):
        self.events.append(("call_end", call.num_timesteps))


def test_every_point_fires_in_order(pipe):
    rec = Recorder()
    pipe(steps=2, hooks=[rec])
    assert rec.events == [
        ("call_start", 0),
        ("step_begin", 0, 1), ("before_denoiser", 0), ("after_denoiser", 0), ("step_end", 0),
        ("step_begin", 1, 0), ("before_denoiser", 1), ("after_denoiser", 1), ("step_end", 1),
        ("after_decode", (1, 4)), ("call_end", 2),
    ]


def test_changes_made_in_hooks_take_effect(pipe):
    base = pipe(steps=2)

    class ZeroInput:
        @hookimpl
        def before_denoiser(self, pipe, call, step):
            step.model_input = torch.zeros_like(step.model_input)

    class DoubleGuidance:
        @hookimpl
        def after_denoiser(self, pipe, call, step):
            step.noise_pred = 2 * step.model_output

    class ShiftLatents:
        @hookimpl
        def on_step_end(self, pipe, call, step):
            step.latents = step.latents + 1

    class Replace:
        @hookimpl
        def after_decode(self, pipe, call, images):
            return images * 0 - 7

    zero_out = pipe.model(torch.zeros(1, 4), 0)
    torch.testing.assert_close(pipe(steps=2, hooks=[ZeroInput()]), torch.ones(1, 4) - 2 * zero_out)
    x = torch.ones(1, 4)
    for _ in range(2):
        x = x - 2 * pipe.model(x, 0)
    torch.testing.assert_close(pipe(steps=2, hooks=[DoubleGuidance()]), x)
    x = torch.ones(1, 4)
    for _ in range(2):
        x = x - pipe.model(x, 0) + 1
    torch.testing.assert_close(pipe(steps=2, hooks=[ShiftLatents()]), x)
    assert torch.equal(pipe(steps=2, hooks=[Replace()]), torch.full((1, 4), -7.0))
    torch.testing.assert_close(pipe(steps=2), base)


def test_tryfirst_and_trylast_order(pipe):
    order = []

    class Late:
        @hookimpl(trylast=True)
        def on_step_begin(self, pipe, call, step):
            order.append("late")

    class Early:
        @hookimpl(tryfirst=True)
        def on_step_begin(self, pipe, call, step):
            order.append("early")

    pipe(steps=1, hooks=[Late(), Early()])
    assert order == ["early", "late"]


def test_diffusers_callback_runs_after_other_step_end_hooks(pipe):
    order = []

    class Hook:
        @hookimpl
        def on_step_end(self, pipe, call, step):
            order.append("hook")

    def callback(p, i, t, kwargs):
        order.append("callback")
        return kwargs

    pipe(steps=1, hooks=[Hook()], callback_on_step_end=callback)
    assert order == ["hook", "callback"]


def test_installed_plugin_hooks_fire_for_every_call(pipe):
    rec = Recorder()
    name = registry.register_plugin(rec, "recorder-plugin")
    try:
        pipe(steps=1)
        pipe(steps=1)
    finally:
        registry.unregister_plugin(name)
    assert [e[0] for e in rec.events].count("call_start") == 2
    pipe(steps=1)
    assert [e[0] for e in rec.events].count("call_start") == 2


def test_per_call_hooks_do_not_reach_other_threads(pipe):
    rec = Recorder()
    barrier = threading.Barrier(2)
    results = {}

    class Wait:
        @hookimpl
        def on_step_begin(self, pipe, call, step):
            if step.index == 0:
                barrier.wait(timeout=10)

    def with_hook():
        results["hooked"] = pipe(steps=3, hooks=[rec, Wait()])

    def without_hook():
        results["plain"] = pipe(steps=5, hooks=[Wait()])

    threads = [threading.Thread(target=with_hook), threading.Thread(target=without_hook)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [e for e in rec.events if e[0] == "step_begin"] == [("step_begin", i, 2 - i) for i in range(3)]


def test_trace_env_logs_every_hook_call(pipe, monkeypatch, caplog):
    monkeypatch.setenv("DIFFLOOM_TRACE_HOOKS", "1")
    with caplog.at_level(logging.WARNING, logger="diffloom.hooks"):
        pipe(steps=1, hooks=[Recorder()])
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("hook on_step_begin") for m in messages)
    assert any(m.startswith("hook on_call_end") for m in messages)


def test_callback_mistakes_name_the_callback_and_step(pipe):
    def returns_none(p, i, t, kwargs):
        return None


    def raises(p, i, t, kwargs):
        if i == 1:
            raise KeyError("oops")
        return kwargs

    with pytest.raises(CallbackError, match="returns_none returned NoneType at step 0"):
        pipe(callback_on_step_end=returns_none)
    with pytest.raises(CallbackError, match="raises raised at step 1: KeyError"):
        pipe(callback_on_step_end=raises)


def test_tensors_a_callback_leaves_out_keep_their_values(pipe):
    # As in diffusers: a callback may return only what it changed.
    def returns_nothing(p, i, t, kwargs):
        return {}

    def returns_cond_only(p, i, t, kwargs):
        return {"cond": kwargs["cond"] + 1}

    plain = pipe(steps=2)
    kept = pipe(steps=2, callback_on_step_end=returns_nothing, callback_on_step_end_tensor_inputs=["latents", "cond"])
    assert torch.equal(plain, kept)
    shifted = pipe(steps=2, callback_on_step_end=returns_cond_only,
                   callback_on_step_end_tensor_inputs=["latents", "cond"])
    assert not torch.equal(plain, shifted), "a returned tensor is used"


def test_callback_edits_latents_and_tensors(pipe):
    def edit(p, i, t, kwargs):
        if i == 0:
            kwargs["latents"] = kwargs["latents"] * 0
            kwargs["cond"] = kwargs["cond"] + 1
        return kwargs

    out = pipe(steps=2, callback_on_step_end=edit, callback_on_step_end_tensor_inputs=["latents", "cond"])
    torch.testing.assert_close(out, -pipe.model(torch.ones(1, 4), 0))


def test_interrupt_skips_remaining_steps(pipe):
    def stop(p, i, t, kwargs):
        if i == 1:
            p._interrupt = True
        return kwargs

    rec = Recorder()
    pipe(steps=5, hooks=[rec], callback_on_step_end=stop)
    assert [e[1] for e in rec.events if e[0] == "step_begin"] == [0, 1]
    assert rec.events[-1] == ("call_end", 5)


def test_step_budget(pipe):
    rec = Recorder()
    pipe(steps=6, hooks=[rec, StepBudget(max_steps=3)])
    assert [e[1] for e in rec.events if e[0] == "step_begin"] == [0, 1, 2]
    rec.events.clear()
    pipe(steps=4, hooks=[rec, StepBudget(max_seconds=0.0)])
    assert [e[1] for e in rec.events if e[0] == "step_begin"] == [0]
    with pytest.raises(ValueError, match="max_steps"):
        StepBudget()


def test_latent_preview_writes_or_hands_over(tmp_path):
    class Latent4(ToyPipeline):
        def run_denoiser(self, call, step):
            return step.model_input * 0.1

    pipe = Latent4(ToyModel(dim=4), ToyScheduler())
    pipe.set_progress_bar_config(disable=True)
    got = []
    x = torch.randn(1, 4, 6, 10, generator=torch.Generator().manual_seed(0))

    def run(hook):
        with pipe.start_call(hooks=[hook]) as call:
            pipe.scheduler.set_timesteps(3)
            call.tensors["cond"] = torch.zeros(())
            pipe.denoise(call, x, pipe.scheduler.timesteps)

    run(LatentPreview(lambda i, img: got.append((i, img.size)), every=2))
    assert got == [(0, (10, 6)), (2, (10, 6))]
    run(LatentPreview(tmp_path / "previews"))
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == [f"step_000{i}.png" for i in range(3)]
    with pytest.raises(ValueError, match="family"):
        LatentPreview(tmp_path, family="sd3")
