import platform
import subprocess
import sys

import pytest

# Eager training steps of a small decoder (bf16 autocast), in a fresh process since the setting
# lasts for the process: prints the page faults a step takes once warm (the median step: a step
# now and then faults in pages for reasons of its own, e.g. a buffer that grows).
STEPS = """
import resource, statistics, sys, torch
from lm_pretrain.bench import Shape, build_lmp
from lm_pretrain.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.set_num_threads(1)
shape = Shape(hidden=128, layers=2, heads=2, seq=128, batch=8, vocab=4096)
model = build_lmp(shape, torch.device("cpu"))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
faults = []
for step in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with torch.autocast("cpu", torch.bfloat16):
        loss = model(ids, ids, return_logits=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if step >= 3:
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(int(statistics.median(faults)))
"""


def faults_per_step(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator only"
)
def test_a_training_step_reuses_freed_memory_instead_of_faulting_in_fresh_pages():
    default, kept = faults_per_step("default"), faults_per_step("keep")
    assert default > 1_000  # glibc's defaults hand the step's temporaries back every step
    assert kept < default / 10


def test_elsewhere_the_allocator_is_left_alone(monkeypatch):
    from lm_pretrain import host_memory

    monkeypatch.setattr(host_memory.platform, "system", lambda: "Darwin")
    assert host_memory.keep_freed_memory() is False
