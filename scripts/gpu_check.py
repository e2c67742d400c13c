"""The first run on a CUDA GPU: everything lmp has only run on CPU so far, in one go (~6 minutes).

    bash scripts/gpu_check.sh [OUT_DIR]            # on one CUDA GPU; OUT_DIR default gpu-check/
    python scripts/gpu_check.py --smoke --out DIR  # the same steps at toy sizes on CPU (CI runs it)

Steps, each timed and recorded even when it fails (one failing step does not stop the rest):
1. `pytest -m cuda`: flash SDPA vs the math kernel, variable-length flash vs the document mask,
   compiled vs eager bf16, tiny runs (packing: document + compile, hard masking) that resume.
2. `lmp bench` at a 125M shape (hidden 768, 12 layers, seq 1024, batch 8): lmp eager and compiled
   against transformers eager and compiled (as the HF Trainer's torch_compile=True runs it), MFU
   against the measured bf16 matmul peak and against the GPU's datasheet dense bf16 peak.
3. The strict-small recipe's model (28M) for 200 steps on the built-in corpus, packing: document
   (variable-length flash), bf16, compile; tokens/s from the run's own metrics.
4. A resume of that run from its step-100 checkpoint: the last 100 steps' losses against the
   uninterrupted run's (GPU kernels are not bitwise deterministic: compared within 2%).

Writes OUT/gpu_check.json (every figure) and OUT/gpu_check.md (the table), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# datasheet dense bf16 peaks (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name()
DENSE_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0,
                     "L40S": 362.1, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.2}  # fmt: skip


def dense_peak(device_name: str) -> float | None:
    return next((tflops for key, tflops in DENSE_BF16_TFLOPS.items() if key in device_name), None)


def run(cmd: list[str], log: Path, timeout: int) -> tuple[int, float, str]:
    """(exit code, seconds, the output's last 2,000 characters); output also goes to `log`."""
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        code, output = 124, f"timed out after {timeout}s\n{exc.stdout or ''}{exc.stderr or ''}"
    log.write_text(output)
    return code, time.perf_counter() - start, output[-2000:]


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--smoke", action="store_true", help="toy sizes on CPU: checks the script itself")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if not args.smoke and device == "cpu":
        sys.exit("gpu_check: no CUDA GPU here; use --smoke for the CPU check of this script")
    lmp = [sys.executable, "-m", "lm_pretrain.cli"]
    report: dict = {"device": device, "torch": torch.__version__, "smoke": args.smoke, "steps": {}}

    def record(name: str, code: int, seconds: float, tail: str, **figures: object) -> None:
        report["steps"][name] = {"ok": code == 0, "exit_code": code, "seconds": round(seconds, 1), **figures}
        if code != 0:
            report["steps"][name]["output_tail"] = tail
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")  # kept after every step

    # 1. the CUDA tests (on CPU they all skip: the smoke run only checks they are collected)
    code, seconds, tail = run([sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-m", "cuda", "-p", "no:cacheprovider",
                               "tests"], out / "pytest.log", 240)  # fmt: skip
    summary = next((line for line in reversed(tail.splitlines()) if " in " in line), tail[-200:])
    record("cuda tests", code, seconds, tail, summary=summary.strip())

    # 2. lmp bench at 125M (smoke: a toy shape, no compile)
    shape = ["--hidden", "768", "--layers", "12", "--heads", "12", "--seq", "1024", "--batch", "8",
             "--vocab", "16384", "--steps", "10"]  # fmt: skip
    if args.smoke:
        shape = ["--hidden", "32", "--layers", "1", "--heads", "2", "--seq", "32", "--batch", "2", "--vocab",
                 "300", "--steps", "2", "--no-compile"]  # fmt: skip
    code, seconds, tail = run([*lmp, "bench", *shape, "--no-prep", "--json", str(out / "bench.json")],
                              out / "bench.log", 300)  # fmt: skip
    figures: dict = {}
    if (out / "bench.json").is_file():
        bench = json.loads((out / "bench.json").read_text())
        datasheet = dense_peak(device)
        figures = {
            "parameters": bench["parameters"],
            "bf16_matmul_peak_tflops": bench["peak_gflops"]["bf16"] / 1e3,
            "datasheet_dense_bf16_tflops": datasheet,
            "models": {
                m["name"]: {
                    "tokens_per_s": round(m["tokens_per_s"]),
                    "mfu_vs_measured_peak": round(m["mfu"], 4),
                    "mfu_vs_datasheet": round(m["mfu"] * bench["peak_gflops"]["bf16"] / 1e3 / datasheet, 4)
                    if datasheet
                    else None,
                }
                for m in bench["models"]
            },
            "ratios": {k: round(v, 3) for k, v in bench["ratios"].items()},
        }
    record("bench 125M" if not args.smoke else "bench (toy)", code, seconds, tail, **figures)

    # 3. the strict-small model, 200 steps, packing: document, bf16, compile (smoke: toy, 8 steps)
    steps = 8 if args.smoke else 200
    sets = {"data.path": "builtin:demo", "data.packing": "document", "train.max_steps": steps,
            "train.batch_size": 32, "train.log_every": 10, "train.eval_every": steps, "checkpoint.every": steps // 2,
            "checkpoint.keep_last": 4, "eval": "null", "train.average": "null", "data.word_budget": "null",
            "data.cache_dir": str(out / "cache")}  # fmt: skip
    if args.smoke:
        sets.update({"model.hidden_size": 32, "model.num_layers": 1, "model.num_heads": 2, "model.intermediate_size": 64,
                     "model.max_seq_len": 32, "train.batch_size": 4, "train.log_every": 1, "train.compile": "false",
                     "tokenizer.vocab_size": 512, "train.precision": "fp32"})  # fmt: skip
    overrides = [part for key, value in sets.items() for part in ("--set", f"{key}={value}")]
    recipe = str(ROOT / "recipes/babylm-strict-small.yaml")
    straight = out / "run-straight"
    shutil.rmtree(straight, ignore_errors=True)
    code, seconds, tail = run(
        [*lmp, "train", recipe, *overrides, "--out", str(straight)], out / "train.log", 300
    )
    logged = [r for r in metrics(straight) if "loss" in r]
    rates = [r["tokens_per_s"] for r in logged if "tokens_per_s" in r][1:]  # the first includes compiling
    record("train 200 steps" if not args.smoke else "train (toy)", code, seconds, tail,
           final_loss=logged[-1]["loss"] if logged else None,
           val_loss=next((r["val_loss"] for r in reversed(metrics(straight)) if "val_loss" in r), None),
           tokens_per_s=round(sum(rates) / len(rates)) if rates else None)  # fmt: skip

    # 4. resume from the middle checkpoint: the second half again
    resumed = out / "run-resumed"
    shutil.rmtree(resumed, ignore_errors=True)
    code, seconds, tail = 1, 0.0, "the straight run left no checkpoints"
    if (straight / "checkpoints").is_dir():
        shutil.copytree(
            straight, resumed, ignore=shutil.ignore_patterns(f"step-{steps}", "final*", "summary.json")
        )
        code, seconds, tail = run(
            [*lmp, "train", recipe, *overrides, "--out", str(resumed)], out / "resume.log", 300
        )
    before = {r["step"]: r["loss"] for r in logged}
    after = {r["step"]: r["loss"] for r in metrics(resumed) if "loss" in r and r["step"] > steps // 2}
    worst = max((abs(after[s] - before[s]) / before[s] for s in after if s in before), default=None)
    agree = worst is not None and worst < 0.02 and len(after) > 0
    record("resume from the middle", code if agree or code else 1, seconds, tail, compared_steps=len(after),
           worst_relative_loss_difference=worst)  # fmt: skip

    lines = [f"# lmp GPU check: {device}, torch {torch.__version__}", "", "| step | ok | seconds | figures |",
             "|---|---|---|---|"]  # fmt: skip
    for name, step in report["steps"].items():
        shown = {k: v for k, v in step.items() if k not in ("ok", "exit_code", "seconds", "output_tail")}
        lines.append(
            f"| {name} | {'yes' if step['ok'] else 'NO'} | {step['seconds']} | {json.dumps(shown)} |"
        )
    table = "\n".join(lines) + "\n"
    (out / "gpu_check.md").write_text(table)
    print(table)
    sys.exit(0 if all(step["ok"] for step in report["steps"].values()) else 1)


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    main()
