"""``diffloom convert SRC DST``: a single file to a diffusers folder, or a folder to a single file."""

from __future__ import annotations

from pathlib import Path

from diffloom.cli import UsageError


def convert_command(parser):
    parser.add_argument("src", help="a .safetensors/.ckpt single file, or a diffusers pipeline folder")
    parser.add_argument("dst", help="the folder to write (from a file), or the .safetensors file (from a folder)")
    parser.add_argument("--config", help="diffusers folder or Hub id of the same model family: supplies the "
                                         "tokenizer, scheduler and model configs (needed for file -> folder)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read a pickled .ckpt (unpickling can run code: only for files you trust)")

    def run(args):
        # Imported here, not at module level, so listing the commands stays free of torch.
        from diffloom import DiffusionPipeline, hub
        from diffloom.modeling import WeightsError
        from diffloom.pipeline import PipelineError
        from diffloom.registry import RegistryError

        from .families import DetectionError
        from .keys import ConversionError
        from .loader import SingleFileError
        from .original_config import OriginalConfigError

        src, dst = Path(args.src), Path(args.dst)
        if not src.exists():
            raise UsageError(f"{src} does not exist")
        if dst.exists():
            raise UsageError(f"{dst} already exists; remove it or choose another destination")
        try:
            if src.is_dir():
                if args.config:
                    raise UsageError("--config is for single file -> folder; a folder already has its configs")
                if dst.suffix != ".safetensors":
                    raise UsageError(f"{dst}: the single file to write needs a .safetensors name")
                DiffusionPipeline.from_pretrained(src).save_single_file(dst)
            else:
                pipe = DiffusionPipeline.from_single_file(src, config=args.config, allow_pickle=args.allow_pickle)
                pipe.save_pretrained(dst)
        except (SingleFileError, DetectionError, ConversionError, OriginalConfigError, WeightsError, hub.LoadError,
                PipelineError, RegistryError) as e:
            raise UsageError(str(e)) from None
        print(f"wrote {dst}")

    return run
