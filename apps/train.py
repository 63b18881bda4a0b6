"""``ifp-train``: train the learned sparsity predictor of a model folder (frozen LLM)."""

import argparse
from pathlib import Path

from ..errors import IFPError, cli_errors


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="ifp-train", description=__doc__)
    p.add_argument("--model", help="ifp-mlx model folder to train for (default: bundled SmolLM2)")
    p.add_argument("--preset", default="cpu", help="quick | cpu (≈30 min, SmolLM2) | full")
    p.add_argument("--keep", type=float)
    p.add_argument("--keep-max", type=float, help="train over keeps sampled in [keep, keep-max]")
    for flag, typ in (("steps", int), ("batch", int), ("lr", float), ("tau", float),
                      ("distill", float), ("encoder-layers", int), ("n-train", int),
                      ("n-val", int), ("val-every", int), ("seed", int)):  # fmt: skip
        p.add_argument(f"--{flag}", type=typ)
    p.add_argument("--checkpoint", help="checkpoint folder (default: MODEL/.ifp-train)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    args = p.parse_args(argv)
    with cli_errors("ifp-train"):
        run(args)


def run(args) -> None:
    from .. import load
    from ..bundled import default_model
    from ..train import TrainConfig, Trainer

    kw = {
        k: getattr(args, k)
        for k in ("keep", "keep_max", "steps", "batch", "lr", "tau", "distill", "encoder_layers",
                  "n_train", "n_val", "val_every", "seed")  # fmt: skip
        if getattr(args, k) is not None
    }
    cfg = TrainConfig.preset(args.preset, **kw)
    folder = Path(args.model) if args.model else default_model()
    checkpoint = Path(args.checkpoint) if args.checkpoint else folder / ".ifp-train"
    if args.resume and not (checkpoint / "meta.json").is_file():
        raise IFPError(f"nothing to resume: {checkpoint} has no checkpoint")
    model, tokenizer = load(folder)
    trainer = Trainer(model, tokenizer, cfg, folder)
    if args.resume:
        trainer.resume(checkpoint)
    trainer.prepare()
    report = trainer.run(checkpoint)
    entry = trainer.write()
    first, last = report["history"][0], report["history"][-1]
    print(
        f"val answer loss at keep {cfg.keep}: {first['val_loss']:.4f} (step {first['step']}) → "
        f"{last['val_loss']:.4f} (step {last['step']}); mask diversity {last['diversity']:.3f}; "
        f"{report['seconds']:.0f} s"
    )
    print(f"wrote {folder / entry['file']} and the 'ifp.predictor' entry of {folder}/config.json")


if __name__ == "__main__":
    main()
