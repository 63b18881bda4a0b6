"""``ifp-calibrate``: measure a model folder's keep → quality curve and store it in the folder,
so ``--keep auto --max-kl T`` (and the default) can pick the keep for a quality target."""

from ..budget import check_keep
from ..errors import IFPError
from .common import MODEL_HELP, cli_errors, make_parser, model_name
from .eval import _floats


def main(argv=None) -> None:
    p = make_parser("ifp-calibrate", __doc__)
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--predictor", help="activation | learned (default: the folder's default)")
    p.add_argument("--keeps", type=_floats, help="comma list (default 0.2, 0.25, ..., 1)")
    p.add_argument("--n-prompts", type=int, help="calibration prompts (default 32)")
    p.add_argument("--tokens", type=int, help="dense answer tokens per prompt (default 48)")
    p.add_argument("--protect", metavar="FIRST,LAST",
                   help="keep the first/last FFN layers whole (a keep is then the mean keep); "
                   "stored in the folder, calibrated with it. 0,0 removes it (default: the folder's)")  # fmt: skip
    p.add_argument("--answers", type=_floats, metavar="KEEPS",
                   help="also measure free-running answers (right, ends, loops, length vs dense) "
                   "at these keeps on the calib half of the short-answer set (default: none)")  # fmt: skip
    p.add_argument("--n-answers", type=int, default=48, help="questions for --answers (default 48)")
    p.add_argument("--default-max-kl", type=float,
                   help="also make this KL target the folder's default (keep=None)")  # fmt: skip
    args = p.parse_args(argv)
    with cli_errors("ifp-calibrate"):
        run(args)


def run(args) -> None:
    from .. import load
    from ..budget import check_max_kl, check_protect, curves
    from ..bundled import model_path
    from ..calibrate import CalibrationConfig, calibrate
    from ..errors import set_ifp_entries
    from ..predictors import get_predictor

    kw = {
        k: getattr(args, k)
        for k in ("keeps", "n_prompts", "tokens")
        if getattr(args, k) is not None
    }
    cfg = CalibrationConfig(**kw)
    cfg.check()  # before the slow model load
    if args.n_answers < 1:
        raise IFPError("--n-answers must be ≥ 1")
    for k in args.answers or []:
        check_keep(k)
    if args.predictor is not None:
        get_predictor(args.predictor)
    if args.default_max_kl is not None:
        check_max_kl(args.default_max_kl)
    protect = None
    if args.protect is not None:
        protect = list(check_protect(args.protect.split(","), 10**9))
    folder = model_path(args.model)
    model, tokenizer = load(folder)
    entries = {}
    if protect is not None:
        check_protect(protect, len(model.ffn_units))
        if protect != model._ifp_config.get("protect", [0, 0]):  # a new shape: old curves go
            model._ifp_config.pop("calibration", None)
            entries["calibration"] = None
        model._ifp_config["protect"] = entries["protect"] = protect if any(protect) else None
    predictor = args.predictor or model.default_predictor
    curve = calibrate(model, tokenizer, predictor, cfg)
    if args.answers:
        from ..calibrate import calib_answers

        curve.answers = calib_answers(model, tokenizer, predictor, args.answers, args.n_answers)
    entries["calibration"] = {**curves(model._ifp_config), predictor: curve.to_dict()}
    entries["shipped_settings"] = None  # the folder's settings are now the user's own
    if args.default_max_kl is not None:
        entries["default_max_kl"] = args.default_max_kl
    set_ifp_entries(folder, **entries)
    print(f"{model_name(args.model)}, predictor {predictor}: {curve.prompts} calibration prompts")
    print(f"{'keep':>5} {'KL':>6} {'agree':>6}")
    for k, kl, a in zip(curve.keeps, curve.kl, curve.agree):
        print(f"{k:5.2f} {kl:6.3f} {a:6.1%}")
    a = curve.answers
    if a:
        print(f"free-running answers, {a['questions']} calib questions vs dense:")
        print(f"{'keep':>5} {'right':>6} {'ends':>6} {'loops':>6} {'length':>7}")
        for row in zip(a["keeps"], a["right"], a["ends"], a["loops"], a["length"]):
            print("{:5.2f} {:6.1%} {:6.1%} {:6.1%} {:6.2f}x".format(*row))
    for target in (0.25, 0.5, 1.0):
        print(f"--max-kl {target:g}: keep {curve.keep_for(target):.3f}")
    print(f"stored the curve in the folder's config.json (ifp.calibration.{predictor})")


if __name__ == "__main__":
    main()
