"""``diffloom generate`` and ``diffloom info`` on the shipped model: outputs, options, errors, Ctrl-C.

Most runs call the CLI's ``main`` in this process with few steps; the first-run experience (a fresh process, the
default settings) and Ctrl-C are tested in a subprocess.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffloom.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_first_command_writes_a_png_quickly(tmp_path):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "diffloom", "generate", "a red circle on a white background"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    print(f"`diffloom generate` took {seconds:.1f} s")
    assert result.returncode == 0, result.stderr
    path = tmp_path / result.stdout.strip()
    assert path.suffix == ".png" and path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (128, 128)
        pixels = np.asarray(image.convert("RGB")).astype(int)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    assert (np.median(border, axis=0) > 240).all()  # a white background
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
    assert red.sum() > 500
    assert "seed" in result.stderr  # the seed chosen for us is reported
    assert seconds < 120


def test_output_path_seed_and_steps(capsys, tmp_path):
    out = tmp_path / "sub" / "blue.png"
    code, stdout, _ = run_cli(capsys, "generate", "a blue square", "-o", str(out), "--seed", "5", "--steps", "3")
    assert code == 0 and stdout.strip() == str(out)
    first = np.asarray(Image.open(out))
    run_cli(capsys, "generate", "a blue square", "-o", str(out), "--seed", "5", "--steps", "3")
    assert np.array_equal(first, np.asarray(Image.open(out)))
    code, stdout, _ = run_cli(capsys, "generate", "a blue square", "-o", str(tmp_path), "--seed", "5",
                              "--steps", "3")
    assert code == 0 and stdout.strip() == str(tmp_path / "a-blue-square-5.png")


def test_size_num_images_grid_and_negative(capsys, tmp_path):
    out = tmp_path / "grid.png"
    code, _, _ = run_cli(capsys, "generate", "a green triangle", "-o", str(out), "--seed", "1", "--steps", "2",
                         "--size", "96x64", "--num-images", "2", "--negative", "a red circle", "--guidance", "3")
    assert code == 0
    assert Image.open(out).size == (192, 64)  # two 96x64 images side by side


def test_scheduler_option_builds_from_the_model_config(capsys, tmp_path):
    code, stdout, _ = run_cli(capsys, "generate", "a yellow circle", "-o", str(tmp_path / "e.png"), "--seed", "2",
                              "--steps", "4", "--scheduler", "EulerDiscreteScheduler")
    assert code == 0 and (tmp_path / "e.png").is_file()


def test_preview_dir_gets_one_image_per_step(capsys, tmp_path):
    code, _, _ = run_cli(capsys, "generate", "a purple square", "-o", str(tmp_path / "p.png"), "--seed", "2",
                         "--steps", "3", "--preview-dir", str(tmp_path / "previews"))
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == [
        "step_0000.png", "step_0001.png", "step_0002.png"]


def test_lora_is_applied_with_its_scale(capsys, tmp_path):
    # A random rank-2 LoRA on one cross-attention key projection of the shipped UNet (128 -> 32).
    torch.manual_seed(0)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    save_file({f"{key}.lora_A.weight": torch.randn(2, 128), f"{key}.lora_B.weight": torch.randn(32, 2) * 3},
              tmp_path / "lora.safetensors")
    images = {}
    for name, extra in [("plain", []), ("zero", ["--lora", f"{tmp_path / 'lora.safetensors'}:0"]),
                        ("full", ["--lora", str(tmp_path / "lora.safetensors")])]:
        code, _, err = run_cli(capsys, "generate", "a red square", "-o", str(tmp_path / f"{name}.png"),
                               "--seed", "3", "--steps", "3", *extra)
        assert code == 0, err
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png")).astype(int)
    assert np.array_equal(images["plain"], images["zero"])
    assert np.abs(images["plain"] - images["full"]).mean() > 1


def test_info_lists_components(capsys):
    code, out, _ = run_cli(capsys, "info")
    assert code == 0
    assert "StableDiffusionPipeline" in out
    for name in ("UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel", "CLIPTokenizer",
                 "DPMSolverMultistepScheduler", "float16"):
        assert name in out


@pytest.mark.parametrize("argv, expected", [
    (["--model", "{tmp}/missing"], "no such folder"),
    (["--model", "{tmp}"], "has no model_index.json"),
    (["--scheduler", "Eulr"], "EulerDiscreteScheduler?"),
    (["--scheduler", "dpm"], "DPMSolverMultistepScheduler"),
    (["--size", "100x100"], "multiples of 8 (try 96x96)"),
    (["--size", "big"], "WIDTHxHEIGHT"),
    (["-o", "{tmp}/out.xyz"], "end the name with .png"),
    (["--lora", "{tmp}/missing.safetensors"], "--lora"),
])
def test_usage_errors_are_one_line_with_exit_code_2(capsys, tmp_path, argv, expected):
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, out, err = run_cli(capsys, "generate", "a red circle", "--steps", "1", *argv)
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert line.startswith("diffloom generate: error: ") and expected in line


def test_info_of_a_missing_folder_is_a_usage_error(capsys, tmp_path):
    code, _, err = run_cli(capsys, "info", str(tmp_path / "nothing"))
    assert code == 2 and "no such folder" in one_error_line(err)


def test_ctrl_c_stops_after_the_step_and_writes_the_image(tmp_path):
    previews = tmp_path / "previews"
    process = subprocess.Popen(
        [sys.executable, "-m", "diffloom", "generate", "a green square", "--steps", "400", "--seed", "1",
         "--preview-dir", str(previews), "-o", str(tmp_path / "stopped.png")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (previews / "step_0002.png").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be stopped"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stdout.strip() == str(tmp_path / "stopped.png") and (tmp_path / "stopped.png").is_file()
    assert "interrupted after step" in stderr
    assert len(list(previews.iterdir())) < 400
