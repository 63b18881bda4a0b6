"""``ifp-search``: search per-layer keep ratios with a GBDT accuracy predictor, write the winner
into the model folder (the runtime's default budget from then on; uniform stays available)."""

from pathlib import Path

from ..errors import write_json
from .common import MODEL_HELP, cli_errors, make_parser


def main(argv=None) -> None:
    p = make_parser("ifp-search", __doc__)
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--method", help="static | ifp-activation | ifp-learned (default activation)")
    for flag, typ, meaning in (
        ("keep", float, "average keep the budgets meet exactly, in units (default: 0.5)"),
        ("low", float, "smallest keep of a layer (default: 0.2)"),
        ("high", float, "largest keep of a layer (default: 0.9)"),
        ("samples", int, "random budgets measured to fit the regressor (default: 200)"),
        ("rank", int, "random budgets the regressor ranks (default: 10000)"),
        ("top", int, "best-ranked budgets then measured (default: 5)"),
        ("n-calib", int, "calibration prompts per measurement (default: 16)"),
        ("seed", int, "seed of the random budgets (default: 0)"),
    ):
        p.add_argument(f"--{flag}", type=typ, help=meaning)
    p.add_argument("--cache", help="measurement cache, JSONL (default: MODEL/.ifp-search/)")
    p.add_argument("--out", help="report folder: search.json + plots (default: the cache's)")
    p.add_argument("--dequantize", action="store_true",
                   help="measure on float copies of quantized weights (much faster on CPU)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="report, but leave the folder as is")
    args = p.parse_args(argv)
    with cli_errors("ifp-search"):
        run(args)


def run(args) -> None:
    from .. import load
    from ..bundled import model_path
    from ..errors import set_ifp_entries
    from ..model import dequantize
    from ..search import SearchConfig, budget_entry, check, fractions, plot, search

    kw = {
        k: getattr(args, k)
        for k in ("method", "keep", "low", "high", "samples", "rank", "top", "n_calib", "seed")
        if getattr(args, k) is not None
    }
    cfg = SearchConfig(**kw)
    folder = model_path(args.model)
    model, tokenizer = load(folder)
    check(cfg, model.ffn_units)  # before anything slow
    if args.dequantize:
        dequantize(model)
    tag = f"{cfg.method}-keep{cfg.keep:g}-seed{cfg.seed}"
    cache = Path(args.cache) if args.cache else folder / ".ifp-search" / f"{tag}.jsonl"
    out = Path(args.out) if args.out else cache.parent
    report = search(model, tokenizer, cfg, cache)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "search.json", report)
    plots = plot(report, out)
    reg, base, win = report["regressor"], report["uniform"], report["winner"]
    print(
        f"{report['evaluations']} budgets measured in {report['seconds']:.0f} s; accuracy "
        f"predictor held-out R² {reg['r2']:.3f}, Spearman ρ {reg['spearman']:.3f}"
    )
    print(
        f"calibration answer loss ({cfg.method}, keep {cfg.keep}): uniform {base['loss']:.4f}, "
        f"searched {win['loss']:.4f} ({win['kind']})"
    )
    entry = budget_entry(report)
    if entry is None:
        print("uniform was best: the model folder is unchanged")
    elif args.dry_run:
        print("--dry-run: the model folder is unchanged")
    else:
        budget = fractions(win["units"], report["units"])
        set_ifp_entries(folder, budget=budget, budget_search=entry)
        print(f"wrote the searched budget into {folder / 'config.json'} ('ifp.budget')")
    for path in [out / "search.json"] + plots:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
