"""``ifp-train``: train the learned sparsity predictor of a model folder (frozen LLM), or with
``--stage 1|2`` adapt the LLM and the predictor together into a new model folder."""

import argparse
from pathlib import Path

from ..errors import IFPError
from .common import cli_errors


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="ifp-train", description=__doc__)
    p.add_argument("--model", help="ifp-mlx model folder to train for (default: bundled SmolLM2)")
    p.add_argument("--preset", default="cpu", help="quick | cpu (≈50 min, SmolLM2) | full")
    p.add_argument("--keep", type=float)
    p.add_argument("--keep-max", type=float, help="train over keeps sampled in [keep, keep-max]")
    p.add_argument("--stage", type=int, default=0,
                   help="0: predictor only, frozen LLM (default); 1: joint on plain text; "
                   "2: joint on instructions (needs a predictor in --model)")  # fmt: skip
    p.add_argument("--out", help="stages 1 and 2: the new model folder to write")
    for flag, typ in (("steps", int), ("batch", int), ("lr", float), ("tau", float),
                      ("distill", float), ("encoder-layers", int), ("n-train", int),
                      ("n-val", int), ("val-every", int), ("seed", int), ("dense-frac", float),
                      ("init-scale", float), ("oracle", float), ("lora-rank", int),
                      ("lora-lr", float), ("prefix", int)):  # fmt: skip
        p.add_argument(f"--{flag}", type=typ)
    p.add_argument("--checkpoint", help="checkpoint folder (default: MODEL/.ifp-train)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    args = p.parse_args(argv)
    with cli_errors("ifp-train"):
        run(args)


def run(args) -> None:
    from .. import load
    from ..bundled import model_path
    from ..convert.writer import check_output
    from ..joint import JointConfig, JointTrainer
    from ..train import TrainConfig, Trainer

    joint = args.stage != 0
    names = ["keep", "keep_max", "steps", "batch", "lr", "tau", "distill", "encoder_layers",
             "n_train", "n_val", "val_every", "seed", "init_scale", "oracle"]  # fmt: skip
    if joint:
        names += ["dense_frac", "lora_rank", "lora_lr", "prefix"]
        if args.stage not in (1, 2):
            raise IFPError(f"--stage must be 0, 1 or 2, not {args.stage}")
        if not args.out:
            raise IFPError(f"--stage {args.stage} writes a new model folder: pass --out DIR")
        check_output(Path(args.out), force=False)
    elif args.out or any(
        getattr(args, k) is not None for k in ("dense_frac", "lora_rank", "lora_lr", "prefix")
    ):
        raise IFPError("--out, --dense-frac, --lora-rank, --lora-lr, --prefix need --stage 1 or 2")
    kw = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if joint:
        cfg = JointConfig.preset(args.preset, stage=args.stage, **kw)
    else:
        cfg = TrainConfig.preset(args.preset, **kw)
    folder = model_path(args.model)
    default_ckpt = f".ifp-train-stage{args.stage}" if joint else ".ifp-train"
    checkpoint = Path(args.checkpoint) if args.checkpoint else folder / default_ckpt
    if args.resume and not (checkpoint / "meta.json").is_file():
        raise IFPError(f"nothing to resume: {checkpoint} has no checkpoint")
    model, tokenizer = load(folder)
    make = JointTrainer if joint else Trainer
    trainer = make(model, tokenizer, cfg, folder)
    if args.resume:
        trainer.resume(checkpoint)
    trainer.prepare()
    report = trainer.run(checkpoint)
    first, last = report["history"][0], report["history"][-1]
    print(
        f"val loss at keep {cfg.keep}: {first['val_loss']:.4f} (step {first['step']}) → "
        f"{last['val_loss']:.4f} (step {last['step']}); mask diversity {last['diversity']:.3f}; "
        f"{report['seconds']:.0f} s"
    )
    if joint:
        print(f"val loss dense: {first['val_loss_dense']:.4f} → {last['val_loss_dense']:.4f}")
        trainer.write(Path(args.out))
        print(f"wrote the jointly trained model folder {args.out}")
    else:
        entry = trainer.write()
        print(
            f"wrote {folder / entry['file']} and the 'ifp.predictor' entry of {folder}/config.json"
        )


if __name__ == "__main__":
    main()
