"""`vwe` subcommands. Thin: parse arguments, load the config, call one function."""
# The parser's help texts are for users; this module's docstring is not shown.
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vwe.formats.config import Config, load_config
from vwe.runtime.errors import DataError, VweError


DESCRIPTION = """\
vwe trains the visual-word CAM network for weakly-supervised semantic segmentation (VWE, IJCAI 2021;
VWL-L/VWL-M, IJCV 2022), infers multi-scale CAMs and scores them, on one machine or a SLURM cluster.

Quick start: `vwe demo` runs the whole pipeline on synthetic data.
Settings: every subcommand with --config takes key.sub=value overrides; `vwe config keys` lists them,
`vwe config show --config FILE [key=value ...]` prints the resolved config with each key explained."""

SETTINGS_EPILOG = ("Overrides are key.sub=value (e.g. train.lr=0.02 'data.long_side=[64,96]'). "
                   "List every setting with `vwe config keys [SECTION]`; print the resolved config with "
                   "`vwe config show --config FILE [overrides]`.")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiment YAML file (e.g. configs/voc.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def cmd_synth(args: argparse.Namespace) -> int:
    from vwe.data.synthetic import write_dataset
    write_dataset(Path(args.out), n_train=args.train, n_val=args.val, seed=args.seed,
                  size=args.size, sbd=args.sbd, workers=args.workers)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give the folder for the shards")
    if (args.voc is None) == (args.labels_from is None):
        raise DataError("vwe prepare: give --voc (VOC2012 -> shards) or --labels-from with --split "
                        "(a segmentation split from label PNGs), not both")
    if args.labels_from is not None:
        from vwe.data.targets import prepare_targets
        if not args.split:
            raise DataError("--labels-from needs --split NAME, the new split's name (e.g. train_aug_pseudo)")
        prepare_targets(out, args.from_split, args.split, Path(args.labels_from), shard_size=args.shard_size,
                        source_root=args.data)
        return 0
    from vwe.data.prepare import prepare
    prepare(Path(args.voc), Path(args.sbd) if args.sbd else None, out, shard_size=args.shard_size,
            labels=args.labels)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from vwe.training.trainer import train
    return train(cfg) or 0


def cmd_infer(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from vwe.stages.infer import infer
    return infer(cfg) or 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from vwe.stages.evaluate import evaluate
    return evaluate(cfg, sweep=args.sweep) or 0


def cmd_refine(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from vwe.stages.refine import refine
    return refine(cfg) or 0


def cmd_segment(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from vwe.stages.segment import segment
    return segment(cfg) or 0


def cmd_segment_eval(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from vwe.stages.segment_eval import segment_eval
    return segment_eval(cfg) or 0


def cmd_irn_labels(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from vwe.stages.irn import irn_labels
    return irn_labels(cfg) or 0


def cmd_irn_train(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from vwe.stages.irn import irn_train
    return irn_train(cfg) or 0


def cmd_random_walk(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from vwe.stages.randomwalk import random_walk
    return random_walk(cfg) or 0


def cmd_import_weights(args: argparse.Namespace) -> int:
    from vwe.tools.import_weights import import_weights
    import_weights(args.source, Path(args.file), Path(args.out),
                   codebook=Path(args.codebook) if args.codebook else None)
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from vwe.stages.pipeline import run_pipeline
    return run_pipeline(cfg, until=args.until) or 0


def cmd_visualize(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from vwe.report.visualize import visualize
    visualize(cfg, ids=args.ids, out=Path(args.out))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vwe.tools.demo import run_demo
    return run_demo(Path(args.workdir), processes=args.processes) or 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from vwe.tools.doctor import doctor
    return doctor(timeout_s=args.timeout, hold_s=args.hold) or 0


def cmd_config(args: argparse.Namespace) -> int:
    from vwe.formats.configdoc import keys_table, render_config
    if args.action == "show":
        if not args.config:
            raise VweError("vwe config show needs --config FILE")
        sys.stdout.write(render_config(_config(args)))
    else:
        if args.overrides[1:]:
            raise VweError("vwe config keys takes at most one section name")
        sys.stdout.write(keys_table(args.overrides[0] if args.overrides else None))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib
    cfg = _config(args)
    mod = importlib.import_module(f"vwe.bench.{args.what}")
    return mod.run(cfg, args) or 0


def build_parser() -> argparse.ArgumentParser:
    from vwe import __version__
    parser = argparse.ArgumentParser(prog="vwe", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"vwe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("synth", help="write a synthetic VOCdevkit-style data set")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=64, help="images in the train split")
    p.add_argument("--val", type=int, default=16, help="images in the val split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128, help="long side of the images in pixels")
    p.add_argument("--sbd", action="store_true", help="also write an SBD-style benchmark_RELEASE folder")
    p.add_argument("--workers", type=int, default=0,
                   help="processes making the images (0: one per core); the files do not depend on it")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="convert VOCdevkit (+SBD) into webdataset shards, or pair a split with "
                                       "label PNGs (a segmentation split)")
    p.add_argument("--voc", default=None, help="VOC2012 folder (with JPEGImages, SegmentationClass, ...)")
    p.add_argument("--sbd", default=None, help="SBD benchmark_RELEASE folder (for train_aug)")
    p.add_argument("--out", required=True)
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--labels", choices=["xml", "mask"], default="xml",
                   help="image labels from the XML annotations (default, as the published code) or from "
                        "the masks; each falls back to the other where its file is missing")
    p.add_argument("--labels-from", default=None, metavar="DIR",
                   help="a folder of label PNGs (<id>.png: vwe refine's output, random-walk labels, an outside "
                        "tool's, or ground truth): write a segmentation split pairing them with --from-split")
    p.add_argument("--split", default=None, help="(--labels-from) the new split's name, e.g. train_aug_pseudo")
    p.add_argument("--from-split", default="train_aug",
                   help="(--labels-from) the split whose images the labels belong to")
    p.add_argument("--data", default=None, metavar="ROOT",
                   help="(--labels-from) the data root holding --from-split (default: --out)")
    p.set_defaults(func=cmd_prepare)

    for name, func, text in [("train", cmd_train, "train the CAM network"),
                             ("infer", cmd_infer, "multi-scale CAM inference, sharded over ranks"),
                             ("segment", cmd_segment, "train DeepLabV2 on a label split (the seg section)"),
                             ("segment-eval", cmd_segment_eval,
                              "segmentation predictions (multi-scale, CRF) and their mIoU, sharded over ranks"),
                             ("irn-labels", cmd_irn_labels,
                              "IRNet's relation labels from CAMs (confident regions, DenseCRF), sharded over ranks, "
                              "and their label split"),
                             ("irn-train", cmd_irn_train, "train IRNet's relation network on the relation labels "
                                                          "(the irn section)"),
                             ("random-walk", cmd_random_walk,
                              "IRNet's random-walk pseudo labels from CAMs and the relation network, with their "
                              "mIoU, sharded over ranks")]:
        p = sub.add_parser(name, help=text, description=text, epilog=SETTINGS_EPILOG)
        _add_config_args(p)
        p.set_defaults(func=func)

    text = "the chain in one launch: train, infer, evaluate (and with --until: refine, label split, DeepLab)"
    p = sub.add_parser("pipeline", help=text, description=text, epilog=SETTINGS_EPILOG)
    _add_config_args(p)
    p.add_argument("--until", default="evaluate", choices=["evaluate", "refine", "segment", "irn"],
                   help="last stage: evaluate (CAM mIoU), refine (+ CRF pseudo labels), segment (+ label split, "
                        "DeepLab training and its val mIoU; on the random-walk labels with seg.labels=irn), irn "
                        "(+ relation labels, relation network, random-walk labels); each stage skips what is done")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("evaluate", help="CAM mIoU against the ground-truth masks", epilog=SETTINGS_EPILOG)
    _add_config_args(p)
    p.add_argument("--sweep", action="store_true", help="also sweep the background threshold")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("refine", help="pseudo-label PNGs from CAMs (DenseCRF or threshold), with their mIoU")
    _add_config_args(p)
    p.set_defaults(func=cmd_refine)

    p = sub.add_parser("import-weights", help="convert the authors' released weights into a vwe weights file")
    p.add_argument("--from", dest="source", required=True, choices=["vwe-2021", "vwl-l", "vwl-m"],
                   help="which published network the file holds")
    p.add_argument("file", help="the authors' state dict (.pth)")
    p.add_argument("--out", required=True, help="vwe weights file to write (.safetensors)")
    p.add_argument("--codebook", default=None,
                   help="(vwl-m) the memory-bank codebook .npy saved beside the weights, (K, D) or (K, D, 1, 1)")
    p.set_defaults(func=cmd_import_weights)

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

    p = sub.add_parser("config", help="show the resolved config, or list every setting",
                       description="`show --config FILE [key=value ...]`: the resolved config as YAML, each key "
                                   "with its doc. `keys [SECTION]`: every setting with type, default and "
                                   "allowed values.")
    p.add_argument("action", choices=["show", "keys"])
    p.add_argument("--config", default=None, help="experiment YAML file (for show)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value | SECTION",
                   help="show: config overrides; keys: a section name (data, model, train, ...)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("bench", help="throughput, memory and MFU figures")
    p.add_argument("what", choices=["data", "train", "infer", "eval", "seg", "suite"],
                   help="suite: every benchmark, written to --out as benchmarks.json and benchmarks.md")
    _add_config_args(p)
    p.add_argument("--workers", type=int, default=None, help="loader workers (data bench)")
    p.add_argument("--steps", type=int, default=None, help="timed steps or batches")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--compare", default=None,
                   choices=["checkpointing", "channels_last", "recipe", "cudnn_benchmark", "compile", "sizes"],
                   help="(train) measure both settings of this option, each in a fresh process; "
                        "(infer) compile: the CAM network eager against torch.compile with weight freezing; "
                        "sizes: one repeated image size against sizes met for the first time, then again")
    p.add_argument("--out", default=None, help="(suite) folder for the results and any synthetic data")
    p.add_argument("--quick", action="store_true", help="(suite) leave out the checkpointing comparison")
    p.add_argument("--update-doc", default=None, metavar="FILE.md",
                   help="(suite) replace the generated section for this machine kind in FILE.md")
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
    if args.command in ("train", "pipeline", "segment", "irn-train"):
        from vwe.runtime.preempt import catch_early
        catch_early()  # SIGUSR1/SIGTERM during start-up: kept for the Trainer (exit 75), not fatal
    from vwe.runtime.logfile import quiet_third_party, run_log
    quiet_third_party()
    with run_log(_run_dir(args) if args.command in LOGGED_COMMANDS else None, args.command):
        try:
            return int(args.func(args) or 0)
        except VweError as e:
            print(f"vwe {args.command}: error: {e}", file=sys.stderr)
            return 2
        finally:
            _leave_process_group()


def _leave_process_group() -> None:
    """Tear the process group down before exit: left to interpreter shutdown, its threads can abort the
    process ("terminate called without an active exception"; vwe/runtime/dist.py, import_before_group)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# Commands whose output is kept as <run_dir>/<command>.log (docs/training.md, "Seeing it run").
LOGGED_COMMANDS = ("train", "infer", "evaluate", "pipeline", "refine", "segment", "segment-eval", "irn-labels",
                   "irn-train", "random-walk")


def _run_dir(args: argparse.Namespace) -> str | None:
    try:
        return _config(args).output.run_dir
    except VweError:
        return None  # the command itself reports the config error


if __name__ == "__main__":
    sys.exit(main())
