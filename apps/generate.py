"""``ifp-generate``: answer one prompt and exit."""

import argparse

from ..errors import cli_errors


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="ifp-generate", description="Answer one prompt.")
    p.add_argument("--model", help="ifp-mlx model folder (default: bundled SmolLM2, 4-bit)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=256)
    args = p.parse_args(argv)
    with cli_errors("ifp-generate"):
        from .. import generate, load

        model, tokenizer = load(args.model)
        generate(model, tokenizer, args.prompt, max_tokens=args.max_tokens, verbose=True)


if __name__ == "__main__":
    main()
