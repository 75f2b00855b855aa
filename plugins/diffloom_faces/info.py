"""``diffloom info [MODEL]``: what a pipeline is made of.

One line per component: its class, and for models the number of parameters, the dtype the weights are stored in
(read from the safetensors headers of a local folder) and the dtype they load as by default. Then the
scheduler's main settings, the tokenizer's vocabulary, and the model's stored sampling defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

from .models import load_pipeline, model_source, sampling_defaults


def info_command(parser):
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="pipeline folder or Hub repo id (default: the shipped shapes-128)")
    return run


def run(args) -> int:
    import torch

    source = model_source(args.model, label="MODEL")
    pipe = load_pipeline(source)
    root = Path(source) if Path(source).is_dir() else None
    print(f"{type(pipe).__name__}  ({source})")
    rows = []
    total = 0
    for name, component in sorted(pipe.components.items()):
        if component is None or isinstance(component, (bool, int, float, str)):
            continue
        row = [name, type(component).__name__, "", "", ""]
        if isinstance(component, torch.nn.Module):
            count = sum(p.numel() for p in component.parameters())
            total += count
            loaded = sorted({str(p.dtype).removeprefix("torch.") for p in component.parameters()})
            row[2] = f"{count / 1e6:.2f}M"
            row[3] = stored_dtypes(root / name) if root is not None else "?"
            row[4] = ",".join(loaded)
        rows.append(row)
    header = ["component", "class", "params", "stored", "loads as"]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    print(f"  total parameters: {total / 1e6:.2f}M")

    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is not None:
        keys = ("num_train_timesteps", "beta_schedule", "prediction_type", "timestep_spacing")
        settings = ", ".join(f"{k}={scheduler.config[k]}" for k in keys if k in scheduler.config)
        print(f"scheduler: {type(scheduler).__name__} ({settings})")
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is not None:
        print(f"tokenizer: {type(tokenizer).__name__}, {len(tokenizer)} tokens, at most "
              f"{tokenizer.model_max_length} per prompt")
    defaults = sampling_defaults(source)
    if defaults:
        print(f"sampling defaults: {json.dumps(defaults)}")
    return 0


def stored_dtypes(folder: Path) -> str:
    """The dtypes in the safetensors files of a component folder ("?" when it has none)."""
    from safetensors import safe_open

    dtypes = set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            dtypes.update(str(f.get_slice(key).get_dtype()) for key in f.keys())
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
    return ",".join(sorted(names.get(d, d) for d in dtypes)) or "?"
