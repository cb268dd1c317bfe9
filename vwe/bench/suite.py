"""`vwe bench suite --out DIR`: every benchmark in one command, on whatever machine it runs.

Runs, each in its own process: the data loader; training in fp32 and in `auto` precision; gradient
checkpointing off/on; CAM inference in fp32 and in `auto` precision (with MFU); evaluation; and real
`vwe train` runs with 1 and 2 processes at the same global batch (the cost of distribution); then the
commands a user runs (train, infer, evaluate, refine, segment, segment-eval), each in a fresh process,
with their wall time, start-up and rate beside the component that times the same work. Writes
`benchmarks.json` and `benchmarks.md`: tables headed by the machine (CPU model, cores, native bf16,
GPUs, torch/CUDA versions). `--update-doc docs/benchmarks.md` replaces the generated section there.
Without shards at data.root it makes a small synthetic VOC-sized data set in DIR first.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from vwe.formats.config import Config, save_config
from vwe.runtime.device import native_bf16, resolve_precision
from vwe.runtime.errors import VweError
from vwe.runtime.files import atomic_write
from vwe.runtime.parallel import usable_cores

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
    return {"cpu": cpu, "cores": usable_cores(),
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
            load = _load()
            _vwe(["bench", what, *base, "--steps", str(n), "--json", str(path), *extra], log, 3600)
            results[name] = {**json.loads(path.read_text()), "load_avg": _load(load)}

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
        print("bench suite: the commands (train, infer, evaluate, refine, segment, segment-eval) ...",
              file=sys.stderr, flush=True)
        results["commands"] = command_rows(_commands(cfg_path, root, split, steps, out, log), results,
                                           _image_pixels(cfg, root, _small_split(root, split)))
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


# The chain the suite runs as a user would, each command a fresh `python -m vwe` process on the suite's data.
# Weights stay random (lr 0: timing only); refine thresholds the CAMs (no CRF) and segment-eval runs
# without its CRF, so that each command does what its component benchmark times.
COMMANDS = ("train", "infer", "evaluate", "refine", "segment", "segment-eval")


def _small_split(root: str, split: str) -> str:
    """The split the per-image commands run on: val where the data has it (a few images), else `split`."""
    return "val" if (Path(root) / "val.json").is_file() else split


def _commands(cfg_path: Path, root: str, split: str, steps: int, out: Path, log: Path) -> dict:
    """Run every command of COMMANDS once in a fresh run folder; each one's wall seconds and the records it
    wrote (stage_records)."""
    run = out / "commands"
    shutil.rmtree(run, ignore_errors=True)
    common = ["--config", str(cfg_path), f"data.root={root}", f"data.train_split={split}",
              f"data.infer_split={_small_split(root, split)}", f"output.run_dir={run}", "output.tensorboard=false",
              f"train.max_steps={steps + 2}", "train.checkpoint_every=0", "train.resume=none", "train.log_every=1",
              "train.lr=0", f"seg.max_steps={steps + 2}", "seg.checkpoint_every=0", "seg.lr=0", "seg.crf=false",
              "refine.method=threshold", "refine.color=false"]
    wall, load = {}, {}
    for command in COMMANDS:
        t0, before = time.perf_counter(), _load()
        _vwe([command, *common], log, 3600)
        wall[command], load[command] = round(time.perf_counter() - t0, 2), _load(before)
    records = stage_records(run)
    return {name: {"wall_s": wall[name], "load_avg": load[name], **records.get(name, {})} for name in COMMANDS}


def _load(before: float | None = None) -> float:
    """The 1-minute load average now, or its mean with `before` (other work on the machine while measuring)."""
    now = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return round(now if before is None else (before + now) / 2, 2)


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _steady(metrics: Path, key: str) -> float | None:
    """Median of `key` over a training run's metrics records after the first (start-up and warm-up left out)."""
    if not metrics.is_file():
        return None
    values = sorted(json.loads(line)[key] for line in metrics.read_text().splitlines()[1:] if line.strip())
    return values[len(values) // 2] if values else None


def epoch_starts(metrics: Path) -> dict | None:
    """Median img/s of the records that open an epoch (after the run's first) and of the others after the
    first record: with train.log_every=1, the first step of an epoch against the rest (a loader that
    restarted its workers at epoch ends shows here). None when the run crossed no epoch end."""
    if not metrics.is_file():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    starts, rest = [], []
    for before, r in zip(records, records[1:]):
        (starts if r["epoch"] != before["epoch"] else rest).append(r["images_per_s"])
    if not starts or not rest:
        return None
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {"epoch_starts": len(starts), "epoch_start_img_s": median(starts), "other_steps_img_s": median(rest)}


def _training_record(folder: Path) -> dict | None:
    summary = _json(folder / "summary.json")
    if summary is None:
        return None
    metrics = folder / "metrics.jsonl"
    return {"images": summary["samples_seen"], "work_s": summary["seconds_this_run"],
            "steps": summary["steps_this_run"], "steady_img_s": _steady(metrics, "images_per_s"),
            "data_wait": _steady(metrics, "data_wait_fraction"), "mixed_precision": summary["mixed_precision"],
            "data_cpu_ms_per_image": summary.get("data_cpu_ms_per_image"), **(epoch_starts(metrics) or {})}


def _pass_record(manifests: list[Path], report: Path | None = None) -> dict | None:
    """A per-image pass: images handled and seconds of the slowest rank (manifests), or a report's."""
    found = [json.loads(p.read_text()) for p in manifests]
    if found:
        return {"images": sum(m["written"] + m["already_done"] for m in found),
                "work_s": max(m["seconds"] for m in found), "mixed_precision": found[0].get("mixed_precision")}
    r = _json(report) if report else None
    return {"images": r["num_images"], "work_s": r["seconds"]} if r else None


def stage_records(run_dir: Path) -> dict[str, dict]:
    """What each finished stage of a run recorded about its own work, from the default folders of
    `run_dir`: images, seconds of the work (start-up left out: imports, model, process group) and, for
    training, the steady rate. The stages that have not run are absent."""
    run_dir = Path(run_dir)
    seg = run_dir / "seg"
    found = {
        "train": _training_record(run_dir),
        "infer": _pass_record(sorted((run_dir / "cams").glob("manifest-rank*.json"))),
        "evaluate": _pass_record([], run_dir / "eval" / "report.json"),
        "refine": _pass_record([], run_dir / "pseudo_labels" / "report.json"),
        "segment": _training_record(seg),
        "segment-eval": next((_pass_record(sorted(d.glob("manifest-rank*.json")))
                              for d in sorted((seg / "eval").glob("*")) if d.is_dir()), None),
    }
    return {k: v for k, v in found.items() if v}


def _image_pixels(cfg: Config, root: str, split: str) -> float:
    """Mean pixels per image of a split (JPEG headers only)."""
    from vwe.data.loader import infer_samples
    data = dataclasses.replace(cfg.data, root=root)
    infer = dataclasses.replace(cfg.infer, num_workers=0)
    hw = [s["size"] for s in infer_samples(data, infer, 0, 1, split=split, with_scales=False, with_image=False)]
    return sum(h * w for h, w in hw) / max(1, len(hw))


class Component(NamedTuple):
    """The component benchmark that times what a command does: img/s, pixels per image (None for training
    crops), what it is, its key in the results, and its MFU (FLOPs counted once, torch.utils.flop_counter)."""
    img_s: float | None
    pixels: float | None
    what: str
    key: str = ""
    mfu: float | None = None


def _component(name: str, results: dict, precision: str | None) -> Component:
    """The component of command `name`, in the command's precision where there is a choice."""
    if name == "train":
        for key in ("train_fp32", "train_auto"):
            v = results[key]["variants"][0]
            if v["mixed_precision"] == precision:
                return Component(v["img_per_s"], None, f"bench train ({precision})", key, v.get("mfu"))
        return Component(None, None, f"no training benchmark in {precision}")
    if name == "infer":
        for key in ("infer_fp32", "infer_auto"):
            f = results[key]
            if f["mixed_precision"] == precision:
                h, w = f["image_size"]
                return Component(f["vwe_img_s"], h * w, f"bench infer ({precision})", key, f.get("vwe_mfu"))
        return Component(None, None, f"no inference benchmark in {precision}")
    if name == "evaluate":
        e = results["eval"]
        return Component(round(e["images"] / e["single_seconds"], 2), e.get("pixels_per_image"), "bench eval", "eval")
    if name in ("segment", "segment-eval") and "seg" in results:
        from vwe.bench.seg import VOC_SIZES
        if name == "segment":
            t = results["seg"]["training"]
            return Component(t["img_per_s"], None, "bench seg (training)", "seg", t.get("mfu"))
        p = results["seg"]["prediction"]
        pixels = sum(h * w for h, w in VOC_SIZES) / len(VOC_SIZES)
        return Component(p["img_per_s"], pixels, "bench seg (prediction)", "seg", p.get("mfu"))
    return Component(None, None, "no component benchmark")


def command_rows(commands: dict, results: dict, pixels: float) -> dict:
    """Each command beside its component: start-up (wall - work), rates, and their ratio; in pixels/s for
    the per-image commands (`pixels` per image; the component's images may differ in size), in img/s for
    training (equal crops)."""
    rows = {}
    for name, c in commands.items():
        if "work_s" not in c:
            rows[name] = {**c, "note": "no record of its work found"}
            continue
        training = name in ("train", "segment")
        work_rate = c["steady_img_s"] if training and c.get("steady_img_s") else c["images"] / max(c["work_s"], 1e-9)
        comp = _component(name, results, c.get("mixed_precision"))
        row = {**c, "startup_s": round(c["wall_s"] - c["work_s"], 2), "wall_img_s": round(c["images"] / c["wall_s"], 3),
               "work_img_s": round(work_rate, 3), "component": comp.what,
               "component_img_s": None if comp.img_s is None else round(comp.img_s, 3),
               "pixels_per_image": None if training else round(pixels), "component_pixels": comp.pixels,
               "component_load_avg": results.get(comp.key, {}).get("load_avg")}
        if comp.img_s:
            scale = pixels / comp.pixels if comp.pixels and not training else 1.0
            row["ratio"] = round(work_rate * scale / comp.img_s, 3)
            # the same network, precision and work per pixel (or per crop) as the component: its FLOPs at
            # the command's rate
            row["mfu"] = None if comp.mfu is None else round(comp.mfu * row["ratio"], 5)
        row["note"] = _why(name, row, results)
        rows[name] = row
    return rows


def _why(name: str, row: dict, results: dict) -> str:
    """The measured facts that explain a ratio outside 0.9..1.1 (empty inside it)."""
    ratio = row.get("ratio")
    if ratio is None:
        return row["component"] if row["component"].startswith("no ") else ""
    if 0.9 <= ratio <= 1.1:
        return ""
    slower, notes = ratio < 0.9, []
    loads = row.get("load_avg"), row.get("component_load_avg")
    if None not in loads and abs(loads[0] - loads[1]) > 0.5:
        notes.append(f"load average {loads[1]} during the component, {loads[0]} during the command "
                     f"({results['machine']['cores']} cores): other work shared the machine")
    if name in ("train", "segment"):
        batch = row["images"] / max(row["steps"], 1)
        extra_ms = 1000 * batch * (1 / row["work_img_s"] - 1 / row["component_img_s"])
        if slower:
            notes.append(f"the run's step takes {extra_ms:.0f} ms more than the component's "
                         f"{1000 * batch / row['component_img_s']:.0f} ms: the loop's own work per step (logging, "
                         f"its checks' all-reduce, the schedule) and data wait ({100 * (row.get('data_wait') or 0):.0f}%"
                         f" of a step{'; the component has no loader' if name == 'segment' else ''})")
            if row.get("data_cpu_ms_per_image"):
                notes.append(f"the loader's workers used {row['data_cpu_ms_per_image'] * batch:.0f} ms of CPU per "
                             f"step, on the {results['machine']['cores']} cores the step runs on")
        else:
            notes.append(f"the run's median of {row['steps'] - 1} steps against the component's "
                         f"{results['steps']} timed step(s)")
        return "; ".join(notes)
    if slower and row["images"] < 32:
        notes.append(f"{row['images']} images: the command's work includes its first batch (warm-up), the "
                     f"component's does not")
    if row.get("component_pixels") and row.get("pixels_per_image"):
        size = row["pixels_per_image"] / row["component_pixels"]
        if not 0.5 <= size <= 2:
            notes.append(f"images of {row['pixels_per_image'] / 1e6:.3f} MP against the component's "
                         f"{row['component_pixels'] / 1e6:.3f} MP: per-image costs do not scale with pixels")
    if name == "infer" and slower and results["infer_fp32"]["batch_size"] > 1:
        notes.append("the component batches equal-size images; the command those of one size within "
                     "infer.group_window")
    return "; ".join(notes) or "unexplained"


def render_commands(rows: dict) -> list[str]:
    """The markdown table of the commands beside their components."""
    head = ("| command | images | wall s | start-up s | img/s (wall) | img/s (work) | MFU (work) | component "
            "| component img/s | ratio | why they differ |")
    lines = ["", head, "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for name, r in rows.items():
        if "work_s" not in r:
            lines.append(f"| `vwe {name}` | - | {r['wall_s']} | - | - | - | - | - | - | - | {r['note']} |")
            continue
        mfu = f"{100 * r['mfu']:.2f}%" if r.get("mfu") is not None else "-"
        lines.append(f"| `vwe {name}` | {r['images']} | {r['wall_s']} | {r['startup_s']} | {r['wall_img_s']} | "
                     f"{r['work_img_s']} | {mfu} | {r['component']} | {r['component_img_s'] or '-'} | "
                     f"{r.get('ratio', '-')} | {r['note']} |")
    return lines


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
    if "commands" in r:
        lines += ["", ("The commands as a user runs them (one process each, on the suite's data): wall time, "
                       "start-up (wall minus the work the command timed itself), rate over the wall time and over "
                       "the work (training: the median step after the first), and the ratio of the work rate to "
                       "the component's (per pixel for the per-image commands; outside 0.9-1.1 the last column "
                       "says why).")]
        lines += render_commands(r["commands"])
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


def stage_table(run_dir: Path, wall_s: float | None = None) -> str:
    """Per-stage seconds of a run (a `vwe pipeline`'s, say) from its records: images, work seconds and rate;
    with the whole command's wall time, the rest (start-up, model loading, writing the label split)."""
    records = stage_records(run_dir)
    lines = ["| stage | images | seconds | img/s |", "|---|---:|---:|---:|"]
    for name, r in records.items():
        lines.append(f"| {name} | {r['images']} | {r['work_s']:.2f} | {r['images'] / max(r['work_s'], 1e-9):.2f} |")
    work = sum(r["work_s"] for r in records.values())
    lines.append(f"| all stages | | {work:.2f} | |")
    if wall_s is not None:
        lines.append(f"| the rest (start-up, loading, label split) | | {wall_s - work:.2f} | |")
        lines.append(f"| wall | | {wall_s:.2f} | |")
    for name, r in records.items():
        if "epoch_starts" in r:
            lines.append(f"\n{name}: the first step of an epoch at {r['epoch_start_img_s']} img/s "
                         f"(median of {r['epoch_starts']} epoch starts), the other steps at {r['other_steps_img_s']} "
                         f"img/s (ratio {r['epoch_start_img_s'] / r['other_steps_img_s']:.2f}; per logged step: "
                         f"train.log_every)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m vwe.bench.suite stages RUN_DIR [WALL_SECONDS] (scripts/gpu-check.sh)
    if len(sys.argv) not in (3, 4) or sys.argv[1] != "stages":
        sys.exit("usage: python -m vwe.bench.suite stages RUN_DIR [WALL_SECONDS]")
    print(stage_table(Path(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) == 4 else None), end="")
