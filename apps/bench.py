"""``ifp-bench``: benchmarks that print side-by-side numbers and write JSON."""

import argparse
import json
from pathlib import Path

from ..errors import cli_errors


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="ifp-bench", description="ifp-mlx benchmarks")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quant", help="unit-major quantization vs mlx-lm's, held-out text loss")
    q.add_argument("--source", required=True, help="HF folder (config.json + weights)")
    q.add_argument("--text", required=True, help="held-out plain-text file")
    q.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    q.add_argument("--group-size", type=int, default=64)
    q.add_argument("--max-tokens", type=int, default=8192)
    q.add_argument("--json", default="results/bench-quant.json")
    args = p.parse_args(argv)
    with cli_errors("ifp-bench"):
        from ..bench import quant_quality

        rows = []
        print(f"{'bits':>4} {'g':>4} {'fp32':>8} {'ifp-mlx':>8} {'mlx-lm':>8} {'ifp/mlx-lm':>11}")
        for bits in args.bits:
            r = quant_quality(Path(args.source), Path(args.text), bits, args.group_size, args.max_tokens)
            rows.append(r)
            print(f"{bits:>4} {args.group_size:>4} {r['loss_fp32']:8.4f} {r['loss_ifp']:8.4f} "
                  f"{r['loss_mlx_lm']:8.4f} {100 * r['relative_diff']:+10.2f}%")
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
