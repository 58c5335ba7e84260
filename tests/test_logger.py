"""RunLogger: metrics.jsonl, rollout samples (samples.jsonl + a W&B table) in a real offline W&B run."""
import json

import wandb

from rl.logger import SAMPLE_COLUMNS, SAMPLES_KEY, RunLogger, read_metrics


def test_offline_wandb_run_holds_metrics_and_rollout_table(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    lg = RunLogger(tmp_path, backend="wandb", project="qrl-test", mode="offline", total_steps=2, progress=False)
    rows = [{"step": 0, "group": g, "seed": 100 + g, "prompt": f"p{g}", "response": f"r{g}", "reward": 0.5 * g,
             "version": 0, "finish_reason": "stop", "turns": 1} for g in range(3)]
    lg.log({"step": 0, "reward/mean": 0.25, SAMPLES_KEY: rows})
    lg.log({"step": 1, "reward/mean": 0.5})
    lg.close()
    # run.finish() returns before wandb-core has closed the run's history file (seen on a loaded CI machine);
    # teardown waits for the W&B service to exit, as the atexit hook does when a training process ends
    wandb.teardown()
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert [m["reward/mean"] for m in metrics] == [0.25, 0.5] and all(SAMPLES_KEY not in m for m in metrics)
    saved = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert saved == rows
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    tables = list(run.glob("files/media/table/rollouts_*.table.json"))
    assert len(tables) == 1, list(run.rglob("*"))
    table = json.loads(tables[0].read_text())
    assert table["columns"] == SAMPLE_COLUMNS and len(table["data"]) == 3 and table["data"][2][4] == "r2"
    # the offline history (protobuf records, no reader in the wandb package): the metrics and the table
    history = next(run.glob("run-*.wandb")).read_bytes()
    assert b"reward/mean" in history and b'"table-file"' in history and tables[0].name.encode() in history
