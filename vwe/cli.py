"""`vwe` subcommands. Thin: parse arguments, load the config, call one function."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vwe.config import Config, load_config
from vwe.errors import VweError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiment YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def cmd_synth(args: argparse.Namespace) -> int:
    from vwe.data.synthetic import write_dataset
    write_dataset(Path(args.out), n_train=args.train, n_val=args.val, seed=args.seed,
                  size=args.size, sbd=args.sbd)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from vwe.data.shards import prepare
    prepare(Path(args.voc), Path(args.sbd) if args.sbd else None, Path(args.out),
            shard_size=args.shard_size, labels=args.labels)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from vwe.train import train
    return train(cfg) or 0


def cmd_infer(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from vwe.infer import infer
    return infer(cfg) or 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from vwe.evaluate import evaluate
    return evaluate(cfg, sweep=args.sweep) or 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from vwe.pipeline import run_pipeline
    return run_pipeline(cfg) or 0


def cmd_visualize(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from vwe.visualize import visualize
    visualize(cfg, ids=args.ids, out=Path(args.out))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vwe.demo import run_demo
    return run_demo(Path(args.workdir), processes=args.processes) or 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from vwe.doctor import doctor
    return doctor(timeout_s=args.timeout, hold_s=args.hold) or 0


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib
    cfg = _config(args)
    mod = importlib.import_module(f"vwe.bench.{args.what}")
    return mod.run(cfg, args) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vwe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic VOCdevkit-style data set")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=64, help="images in the train split")
    p.add_argument("--val", type=int, default=16, help="images in the val split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128, help="long side of the images in pixels")
    p.add_argument("--sbd", action="store_true", help="also write an SBD-style benchmark_RELEASE folder")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="convert VOCdevkit (+SBD) into webdataset shards")
    p.add_argument("--voc", required=True, help="VOC2012 folder (with JPEGImages, SegmentationClass, ...)")
    p.add_argument("--sbd", default=None, help="SBD benchmark_RELEASE folder (for train_aug)")
    p.add_argument("--out", required=True)
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--labels", choices=["xml", "mask"], default="xml",
                   help="image labels from the XML annotations (default, as the published code) or from "
                        "the masks; each falls back to the other where its file is missing")
    p.set_defaults(func=cmd_prepare)

    for name, func, text in [("train", cmd_train, "train the CAM network"),
                             ("infer", cmd_infer, "multi-scale CAM inference, sharded over ranks"),
                             ("pipeline", cmd_pipeline, "train, infer and evaluate in one launch")]:
        p = sub.add_parser(name, help=text)
        _add_config_args(p)
        p.set_defaults(func=func)

    p = sub.add_parser("evaluate", help="CAM mIoU against the ground-truth masks")
    _add_config_args(p)
    p.add_argument("--sweep", action="store_true", help="also sweep the background threshold")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("visualize", help="picture grid: image, ground truth, CAMs, prediction")
    _add_config_args(p)
    p.add_argument("--ids", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser("demo", help="synth -> prepare -> train -> infer -> evaluate on synthetic data")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--processes", type=int, default=0, help="0: one per GPU, or per CPU core")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("doctor", help="check the distributed setup: every rank joins and all-reduces")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the other ranks")
    p.add_argument("--hold", type=float, default=0.0, metavar="SECONDS",
                   help="after the check, keep the ranks alive this long; SIGUSR1/SIGTERM then makes them "
                        "exit with the preemption code 75 (rehearses preemption and requeue on a cluster)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("bench", help="throughput, memory and MFU figures")
    p.add_argument("what", choices=["data", "train", "infer", "eval"])
    _add_config_args(p)
    p.add_argument("--workers", type=int, default=None, help="loader workers (data bench)")
    p.add_argument("--steps", type=int, default=None, help="timed steps or batches")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--compare", default=None, choices=["checkpointing", "channels_last", "recipe"],
                   help="(train) measure both settings of this option, each in a fresh process")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may come before or after options (`--workers 2 data.root=x`, `data.root=x --workers 2`)
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return int(args.func(args) or 0)
    except VweError as e:
        print(f"vwe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
