"""Peak memory of `lmp merge-checkpoints` for 2, 4 and 8 inputs: it should not grow with the count.

Writes N synthetic transformers folders (fp32 weights of about --mb megabytes each, a config and a
small tokenizer file), then merges the first 2, 4, 8 of them, each merge in a fresh Python process
that reports its own peak RSS (VmHWM, else ru_maxrss). For contrast, the naive way (load every
input's state dict, then average) is measured the same way. A baseline process that only imports
what the merge imports shows the interpreter's share.

    python scripts/bench_merge_rss.py                      # ~100 MB models, 2/4/8 inputs
    python scripts/bench_merge_rss.py --mb 4 --inputs 2,4  # a quick version for CI
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# Each child prints its own peak RSS in kB as its last line. VmHWM (Linux) is the high-water mark
# of the child's own address space; ru_maxrss would also count the parent's RSS at fork time,
# which survives exec.
PEAK = """
def peak_kb():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""
CHILD_BASELINE = (
    PEAK
    + """
import torch, lm_pretrain.merge
print(peak_kb())
"""
)
CHILD_STREAMING = (
    PEAK
    + """
import sys
from pathlib import Path
from lm_pretrain.merge import merge_checkpoints
merge_checkpoints([Path(p) for p in sys.argv[2:]], Path(sys.argv[1]), force=True)
print(peak_kb())
"""
)
CHILD_NAIVE = (
    PEAK
    + """
import sys
from safetensors.torch import load_file, save_file
states = [load_file(p + "/model.safetensors") for p in sys.argv[2:]]
out = {k: sum(s[k] for s in states) / len(states) for k in states[0]}
save_file(out, sys.argv[1] + "/naive.safetensors")
print(peak_kb())
"""
)


def make_inputs(root: Path, count: int, megabytes: float) -> list[Path]:
    """`count` folders of a Llama-shaped config with ~`megabytes` of fp32 weights in 16 tensors."""
    import torch
    from safetensors.torch import save_file

    per_tensor = int(megabytes * 2**20 / 4 / 16)
    width = 256
    rows = max(1, per_tensor // width)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": width}
    folders = []
    for i in range(count):
        folder = root / f"input-{i}"
        folders.append(folder)
        if (folder / "model.safetensors").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(i)
        tensors = {f"layers.{j}.weight": torch.randn(rows, width, generator=generator) for j in range(16)}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    return folders


def peak_rss_mb(code: str, args: list[str]) -> float:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"child failed:\n{result.stderr}")
    return int(result.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=100.0, help="weights per input, in MiB (fp32)")
    parser.add_argument("--inputs", default="2,4,8", help="comma-separated input counts")
    parser.add_argument("--dir", type=Path, default=None, help="where to write inputs (default: a temp dir)")
    parser.add_argument("--no-naive", action="store_true", help="skip the load-everything comparison")
    args = parser.parse_args()
    counts = [int(c) for c in args.inputs.split(",")]

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        inputs = make_inputs(root, max(counts), args.mb)
        size = (inputs[0] / "model.safetensors").stat().st_size / 2**20
        baseline = peak_rss_mb(CHILD_BASELINE, [])
        print(
            f"model size {size:.1f} MiB per input; interpreter + imports alone: {baseline:.0f} MiB peak RSS"
        )
        print(f"{'inputs':>6}  {'streaming MiB':>13}  {'over baseline':>13}  {'naive MiB':>9}")
        for count in counts:
            out = root / f"out-{count}"
            streaming = peak_rss_mb(CHILD_STREAMING, [str(out), *map(str, inputs[:count])])
            naive = "-"
            if not args.no_naive:
                (root / "naive").mkdir(exist_ok=True)
                naive = f"{peak_rss_mb(CHILD_NAIVE, [str(root / 'naive'), *map(str, inputs[:count])]):.0f}"
            print(f"{count:>6}  {streaming:>13.0f}  {streaming - baseline:>13.0f}  {naive:>9}")


if __name__ == "__main__":
    main()
