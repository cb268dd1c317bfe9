"""`vwe bench suite --out DIR`: every benchmark in one command, on whatever machine it runs.

Runs, each in its own process: the data loader; training in fp32 and in `auto` precision; gradient
checkpointing off/on; CAM inference in fp32 and in `auto` precision (with MFU); evaluation; and real
`vwe train` runs with 1 and 2 processes at the same global batch (the cost of distribution). Writes
`benchmarks.json` and `benchmarks.md`: a table headed by the machine (CPU model, cores, native bf16,
GPUs, torch/CUDA versions). `--update-doc docs/benchmarks.md` replaces the generated section there.
Without shards at data.root it makes a small synthetic VOC-sized data set in DIR first.
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vwe.formats.config import Config, save_config
from vwe.runtime.device import native_bf16, resolve_precision
from vwe.runtime.errors import VweError
from vwe.runtime.files import atomic_write

REPO = Path(__file__).resolve().parents[2]


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    import accelerate
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu_native_bf16": native_bf16(torch.device("cpu")), "gpus": gpus,
            "torch": torch.__version__, "cuda": torch.version.cuda if gpus else None,
            "accelerate": accelerate.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}


def _vwe(args: list[str], log: Path, timeout: float) -> None:
    with open(log, "a") as f:
        f.write(f"$ vwe {' '.join(args)}\n")
        f.flush()
        proc = subprocess.run([sys.executable, "-m", "vwe", *args], stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise VweError(f"benchmark step `vwe {' '.join(args[:2])}` failed (exit {proc.returncode}); see {log}")


def _launch(processes: int, args: list[str], log: Path, timeout: float) -> None:
    cuda = torch.cuda.is_available()
    cmd = [sys.executable, "-m", "vwe", *args] if processes == 1 else \
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(REPO / "launch" / ("multi_gpu.yaml" if cuda else "cpu.yaml")), "--num_processes", str(processes),
         "--main_process_port", "0", "-m", "vwe", *args]
    env = {**os.environ}
    if not cuda:  # the same cores, split between the processes
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise VweError(f"benchmark training run with {processes} process(es) failed; see {log}")


def _data(cfg: Config, out: Path, log: Path, steps: int) -> str:
    """The shards to measure on: data.root's, or a synthetic VOC-sized set made here, large enough that
    the timed training steps fall in one epoch (each epoch starts its loader workers anew)."""
    if (Path(cfg.data.root) / f"{cfg.data.train_split}.json").is_file():
        return cfg.data.root
    synth, shards = out / "synthetic", out / "shards"
    if not (shards / "train.json").is_file():
        n = max(64, cfg.train.batch_size * (steps + 4))
        _vwe(["synth", "--out", str(synth), "--train", str(n), "--val", "16", "--size", "500"], log, 1800)
        _vwe(["prepare", "--voc", str(synth), "--out", str(shards), "--shard-size", "16"], log, 1800)
    return str(shards)


def run_suite(cfg: Config, out: Path, steps: int, quick: bool = False) -> dict:
    """Run every benchmark; returns what benchmarks.json holds."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "suite.log"
    log.write_text("")
    root = _data(cfg, out, log, steps)
    split = cfg.data.train_split if root == cfg.data.root else "train"
    with tempfile.TemporaryDirectory(prefix="vwe-suite-") as tmp:
        cfg_path = Path(tmp) / "config.yaml"
        save_config(cfg, cfg_path)
        base = ["--config", str(cfg_path), f"data.root={root}", f"data.train_split={split}",
                f"data.infer_split={split}"]
        results: dict = {"machine": machine(), "config": cfg.to_dict(), "steps": steps}

        def bench(name: str, what: str, *extra: str, n: int = steps) -> None:
            path = out / f"{name}.json"
            print(f"bench suite: {name} ...", file=sys.stderr, flush=True)
            _vwe(["bench", what, *base, "--steps", str(n), "--json", str(path), *extra], log, 3600)
            results[name] = json.loads(path.read_text())

        bench("data", "data", n=max(steps, 4) if quick else max(steps, 24))  # loader batches: cheap, noisy
        bench("train_fp32", "train", "train.mixed_precision=no")
        bench("train_auto", "train", "train.mixed_precision=auto")
        if not quick:
            bench("train_checkpointing", "train", "--compare", "checkpointing")
        bench("infer_fp32", "infer", "infer.mixed_precision=no")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        auto = resolve_precision("auto", device)
        bench("infer_auto", "infer", f"infer.mixed_precision={auto}")
        results["infer_auto"]["precision_setting"] = "auto"
        bench("eval", "eval")
        bench("seg", "seg")
        results["distribution"] = _distribution(cfg_path, root, split, steps, out, log)
    atomic_write(out / "benchmarks.json", json.dumps(results, indent=2), "benchmark results")
    atomic_write(out / "benchmarks.md", render(results), "benchmark table")
    return results


def _distribution(cfg_path: Path, root: str, split: str, steps: int, out: Path, log: Path) -> dict:
    """img/s of real training runs with 1 and 2 processes at the same global batch."""
    rates = {}
    for n in (1, 2):
        if torch.cuda.is_available() and n > torch.cuda.device_count():
            continue
        run = out / f"dist{n}"
        _launch(n, ["train", "--config", str(cfg_path), f"data.root={root}", f"data.train_split={split}",
                    f"output.run_dir={run}", f"train.max_steps={steps + 2}", "train.checkpoint_every=0",
                    "train.resume=none", "output.tensorboard=false", "train.log_every=1",
                    "train.lr=0"], log, 3600)  # timing only: random weights need not learn (or diverge)
        # per-step rates after the first step (start-up and warm-up left out), median
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]
        per_step = sorted(rec["images_per_s"] for rec in records)
        rates[n] = per_step[len(per_step) // 2]
    result = {"img_s": {str(k): v for k, v in rates.items()}}
    if len(rates) == 2:
        result["scaling"] = round(rates[2] / rates[1], 3)  # 2.0 would be perfect on twice the devices
    return result


def render(r: dict) -> str:
    """The markdown table of a suite run, headed by the machine."""
    m = r["machine"]
    gpu = ", ".join(m["gpus"]) if m["gpus"] else "none"
    lines = [f"Measured {m['date']} by `vwe bench suite` on: **{m['cpu']}**, {m['cores']} cores "
             f"(native bf16: {'yes' if m['cpu_native_bf16'] else 'no'}); GPU: {gpu}; torch {m['torch']}"
             f"{', CUDA ' + m['cuda'] if m['cuda'] else ''}; accelerate {m['accelerate']}. "
             f"Model {r['config']['model']['backbone']}, crop {r['config']['data']['crop_size']}, "
             f"batch {r['config']['train']['batch_size']}, {r['steps']} timed steps.", "",
             "| benchmark | setting | figure |", "|---|---|---:|"]
    d = r["data"]
    for key, value in d.items():
        if key.endswith("img_s") or key.endswith("_per_s"):
            lines.append(f"| data loader | {key} | {value} |")
    for name in ("train_fp32", "train_auto"):
        for v in r[name]["variants"]:
            lines.append(f"| training ({name.split('_')[1]}) | {v['mixed_precision']}, "
                         f"{'checkpointing' if v['grad_checkpointing'] else 'no checkpointing'} | "
                         f"{v['img_per_s']:.2f} img/s, MFU {100 * v['mfu']:.1f}%, peak {v['peak_mem_mib']:.0f} MiB |")
    if "train_checkpointing" in r:
        off, on = r["train_checkpointing"]["variants"]
        lines.append(f"| gradient checkpointing | off -> on | step memory "
                     f"{r['train_checkpointing']['comparison']['step_mem_change_pct']:+.1f}%, step time "
                     f"{r['train_checkpointing']['comparison']['step_time_change_pct']:+.1f}% |")
    for name in ("infer_fp32", "infer_auto"):
        f = r[name]
        lines.append(f"| CAM inference ({name.split('_')[1]}) | {f['mixed_precision']}, "
                     f"{f['scales']} + flips | {f['vwe_img_s']} img/s (published code {f['straightforward_img_s']}), "
                     f"MFU {100 * (f['vwe_mfu'] or 0):.1f}% |")
    e = r["eval"]
    lines.append(f"| evaluation | {e.get('images', '?')} images | "
                 + ", ".join(f"{k} {v}" for k, v in e.items() if k.endswith("_seconds")) + " |")
    if "seg" in r:
        t, p = r["seg"]["training"], r["seg"]["prediction"]
        lines.append(f"| segmentation training | {t['backbone']}, batch {t['batch_size']} x {t['crop_size']}px, "
                     f"MSC {t['msc_scales']}, {t['mixed_precision']} | {t['img_per_s']} img/s, MFU {100 * t['mfu']:.1f}%, "
                     f"peak {t['peak_mem_mib']:.0f} MiB |")
        lines.append(f"| segmentation prediction | scales {p['test_scales']}{' + flip' if p['test_flip'] else ''}, "
                     f"{p['mixed_precision']} | {p['img_per_s']} img/s, MFU {100 * p['mfu']:.1f}% |")
    dist = r["distribution"]
    img = dist["img_s"]
    lines.append(f"| training, 1 vs 2 processes (same global batch) | {' / '.join(img)} processes | "
                 f"{' / '.join(str(v) for v in img.values())} img/s"
                 f"{', scaling ' + str(dist['scaling']) if 'scaling' in dist else ''} |")
    return "\n".join(lines) + "\n"


def update_doc(doc: Path, table: str, results: dict) -> None:
    """Replace the generated section for this machine kind (cpu or gpu) in a markdown file."""
    kind = "gpu" if results["machine"]["gpus"] else "cpu"
    start, end = f"<!-- bench suite: {kind} -->", f"<!-- end bench suite: {kind} -->"
    text = doc.read_text() if doc.is_file() else ""
    block = f"{start}\n{table}{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    atomic_write(doc, text, "benchmark document")


def run(cfg: Config, args) -> int:
    """Entry point of `vwe bench suite`."""
    if not args.out:
        raise VweError("vwe bench suite needs --out DIR")
    results = run_suite(cfg, Path(args.out), args.steps or 3, quick=args.quick)
    table = render(results)
    print(table)
    if args.update_doc:
        update_doc(Path(args.update_doc), table, results)
    if args.json:
        atomic_write(args.json, json.dumps(results, indent=2), "benchmark results")
    return 0
