"""Logged records reach every tracker the recipe asks for: metrics.jsonl always, wandb offline."""

import json

from conftest import ROOT
from lm_pretrain.recipe import load_recipe
from lm_pretrain.track import JsonlTracker, MetricsSink, WandbTracker


def test_records_go_to_jsonl_and_an_offline_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = load_recipe(ROOT / "recipes/demo.yaml", ["tracking.wandb=offline"])
    sink = MetricsSink(tmp_path, recipe)
    assert [type(t) for t in sink.trackers] == [JsonlTracker, WandbTracker]
    sink.log({"step": 1, "loss": 3.25})
    sink.log({"step": 2, "loss": 2.75, "val_loss": 2.5})
    sink.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 3.25), (2, 2.75)] and "time" in records[0]
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and b"val_loss" in runs[0].read_bytes()  # written locally, nothing sent


def test_a_disabled_sink_writes_nothing(tmp_path):
    sink = MetricsSink(tmp_path, load_recipe(ROOT / "recipes/demo.yaml"), enabled=False)
    sink.log({"step": 1, "loss": 1.0})
    sink.close()
    assert not (tmp_path / "metrics.jsonl").exists()
