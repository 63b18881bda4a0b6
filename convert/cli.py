"""``ifp-convert``: command-line front end of :func:`ifp_mlx.convert.convert`."""

import argparse
import sys

from ..apps.common import cli_errors, make_parser
from ..errors import IFPError
from .core import Q_BITS, Q_GROUP_SIZES


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("ifp-convert",
                    "Convert a torch/safetensors/GGUF checkpoint into an ifp-mlx model folder.")  # fmt: skip
    p.add_argument(
        "source", help="HF or ifp-mlx folder, .gguf, .safetensors/.bin/.pt file, or hub repo id"
    )
    p.add_argument("output", nargs="?", help="output folder (written atomically)")
    p.add_argument("--to-mlx-lm", metavar="OUT",
                   help="instead: write the ifp-mlx folder SOURCE as a plain mlx-lm folder OUT "
                   "(dense; mlx_lm.load and mlx_lm.generate run it; default: off)")  # fmt: skip
    p.add_argument("--config", help="config.json for a bare state dict (default: the source's)")
    p.add_argument("--tokenizer", help="folder with tokenizer files (default: the source's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the weights (with -q: of those left unquantized)")  # fmt: skip
    p.add_argument("-q", "--quantize", action="store_true", help="quantize weights")
    p.add_argument("--q-bits", type=int, default=4, choices=Q_BITS, help="bits per weight with -q")
    p.add_argument("--q-group-size", type=int, default=64, choices=Q_GROUP_SIZES,
                   help="weights per quantization group with -q")  # fmt: skip
    p.add_argument("--q-down-bits", type=int, choices=Q_BITS,
                   help="bits of the FFN down projections (default: --q-bits)")  # fmt: skip
    p.add_argument(
        "--permute-units",
        metavar="TEXT_FILE",
        help="reorder FFN units by co-activation on this calibration text (default: off)",
    )
    p.add_argument(
        "--predictor", help="import a torch-trained predictor (state dict file; default: none)"
    )
    p.add_argument(
        "--predictor-config",
        help="the predictor's JSON config (encoder_layers, hidden); needed with --predictor (no default)",
    )
    p.add_argument("--revision", help="hub revision of a repo id (default: main)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    with cli_errors("ifp-convert"):
        from .core import convert

        if (args.output is None) == (args.to_mlx_lm is None):
            raise IFPError("give an OUTPUT folder, or --to-mlx-lm OUT to export SOURCE (not both)")
        if args.to_mlx_lm is not None:
            from .export import to_mlx_lm

            print(f"wrote {to_mlx_lm(args.source, args.to_mlx_lm, args.force)} (mlx-lm, dense)")
            return

        summary = convert(
            args.source,
            args.output,
            config=args.config,
            tokenizer=args.tokenizer,
            dtype=args.dtype,
            quantize=args.quantize,
            q_bits=args.q_bits,
            q_group_size=args.q_group_size,
            q_down_bits=args.q_down_bits,
            permute_units_text=args.permute_units,
            force=args.force,
            revision=args.revision,
            progress=not args.no_progress,
            predictor=args.predictor,
            predictor_config=args.predictor_config,
        )
        print(summary.line())


if __name__ == "__main__":
    main(sys.argv[1:])
