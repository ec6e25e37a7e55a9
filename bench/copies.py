"""Copies of a trial's MLflow run, row for row in an SQLite store, for the state benchmark's sweeps of
10,000 trials (bench/state.py): writing them through MLflow would take hours, and copies hold
exactly what the tracker wrote for one real trial."""

from __future__ import annotations

import random
import sqlite3
import uuid


def copy_trial_runs(tracking_uri: str, exp_id: str, parent: str, template: str,
                    indices) -> dict[str, str]:
    """Copies of a trial's run (row for row: run, tags, params, metrics, latest metrics, dataset
    input and its tags) as trials `indices` of the same sweep, each with its own run id, trial
    id, name and `activation.p`; and the parent's summary metrics after each of them closed.
    Their trial ids -> run ids."""
    db = sqlite3.connect(tracking_uri.removeprefix("sqlite:///"))
    rng = random.Random(1)
    clones = [(uuid.uuid4().hex, f"{i:08x}", repr(rng.random())) for i in indices]
    with db:
        db.execute("CREATE TEMP TABLE clones (run_uuid TEXT, trial_id TEXT, p TEXT)")
        db.executemany("INSERT INTO clones VALUES (?, ?, ?)", clones)
        columns = {table: [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
                   for table in ("runs", "tags", "params", "metrics", "latest_metrics", "inputs",
                                 "input_tags")}

        def copy(table: str, where: str, values: dict[str, str]) -> None:
            select = ", ".join(values.get(c, f"t.{c}") for c in columns[table])
            db.execute(f"INSERT INTO {table} ({', '.join(columns[table])}) SELECT {select} "
                       f"FROM {table} t, clones c WHERE {where}", {"template": template})

        copy("runs", "t.run_uuid = :template", {
            "run_uuid": "c.run_uuid", "name": "'bench-state-' || c.trial_id",
            "artifact_uri": "replace(t.artifact_uri, :template, c.run_uuid)"})
        for table in ("tags", "params"):
            copy(table, "t.run_uuid = :template", {"run_uuid": "c.run_uuid", "value": (
                "CASE t.key WHEN 'trial.id' THEN c.trial_id WHEN 'mlflow.runName' THEN "
                "'bench-state-' || c.trial_id WHEN 'activation.p' THEN c.p ELSE t.value END")})
        for table in ("metrics", "latest_metrics"):
            copy(table, "t.run_uuid = :template", {"run_uuid": "c.run_uuid"})
        [input_uuid] = db.execute("SELECT input_uuid FROM inputs WHERE destination_id = ?",
                                  (template,)).fetchone()
        copy("inputs", "t.destination_id = :template", {
            "input_uuid": "c.run_uuid", "destination_id": "c.run_uuid"})
        db.execute("INSERT INTO input_tags (input_uuid, name, value) SELECT c.run_uuid, t.name, "
                   "t.value FROM input_tags t, clones c WHERE t.input_uuid = ?", (input_uuid,))
        summary = db.execute("SELECT key, value, timestamp, is_nan FROM metrics WHERE run_uuid = ?"
                             " AND step = 1", (parent,)).fetchall()
        db.executemany("INSERT OR IGNORE INTO metrics (key, value, timestamp, run_uuid, step, "
                       "is_nan) VALUES (?, ?, ?, ?, ?, ?)",
                       [(key, value, stamp, parent, 1 + i, nan) for i in range(1, len(clones) + 1)
                        for key, value, stamp, nan in summary])
    db.close()
    return {trial_id: run_id for run_id, trial_id, _ in clones}
