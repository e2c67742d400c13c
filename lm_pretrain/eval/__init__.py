"""Zero-shot evaluation that reproduces the BabyLM 2025 pipeline's scores (`lmp eval`).

tasks.py reads the task files, scoring.py turns candidates into log-probabilities, probe.py
generates lmp's own grammar minimal pairs, perplexity.py scores held-out text, report.py
aggregates and writes tables, JSON and predictions, runner.py ties them together.
"""
