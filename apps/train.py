"""``ifp-train``: train the learned sparsity predictor of a model folder (frozen LLM), or with
``--stage 1|2`` adapt the LLM and the predictor together into a new model folder."""

from pathlib import Path

from ..errors import IFPError
from .common import cli_errors, make_parser

TUNABLES = (  # flag, type, meaning; the defaults are the preset's (ifp_mlx.train / .joint)
    ("steps", int, "optimizer steps (cpu preset: 300; stages: 200)"),
    ("batch", int, "examples per step (4)"),
    ("lr", float, "learning rate of the predictor head (1e-3)"),
    ("tau", float, "SoftTopK temperature on z-scored unit scores (0.5)"),
    ("distill", float, "weight of KL(dense || pruned) on the answer (0)"),
    ("encoder-layers", int, "model layers that read the prompt for the head (2)"),
    ("n-train", int, "training prompts from ShareGPT's train split (1200)"),
    ("n-val", int, "validation prompts (24)"),
    ("val-every", int, "steps between validations and checkpoints (50)"),
    ("seed", int, "seed of data order and initialization (0)"),
    ("dense-frac", float, "stages: share of steps run dense (0.2)"),
    ("init-scale", float, "size of the head's prompt-dependent part at step 0 (0.1)"),
    ("oracle", float, "weight of fitting each example's oracle unit importances (cpu: 1.0)"),
    ("lora-rank", int, "stages: rank of the LLM's LoRA adapters (8)"),
    ("lora-lr", float, "stages: learning rate of the adapters (1e-4)"),
    ("prefix", int, "stage 1: tokens of each text the mask is predicted from (64)"),
)


def main(argv=None) -> None:
    p = make_parser("ifp-train", __doc__)
    p.add_argument("--model", help="ifp-mlx model folder to train for (default: bundled SmolLM2)")
    p.add_argument("--preset", default="cpu", help="quick | cpu (≈50 min, SmolLM2) | full")
    p.add_argument("--keep", type=float,
                   help="keep fraction trained for (default: 0.5; stages 1-2: 0.33)")  # fmt: skip
    p.add_argument(
        "--keep-max",
        type=float,
        help="train over keeps sampled in [keep, keep-max] (default: keep only; stages: 0.75)",
    )
    p.add_argument("--stage", type=int, default=0,
                   help="0: predictor only, frozen LLM (default); 1: joint on plain text; "
                   "2: joint on instructions (needs a predictor in --model)")  # fmt: skip
    p.add_argument(
        "--out", help="stages 1 and 2: the new model folder to write (no default: required there)"
    )
    for flag, typ, meaning in TUNABLES:
        p.add_argument(f"--{flag}", type=typ, help=f"{meaning} (default: the preset's)")
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
