"""What a study records in Optuna (studies.runner writes, studies.report reads)."""

ATTR_RUNS = "fuselab.runs"  # trial: [{"seed": int, "metrics": {name: float}}], one per seed it ran
ATTR_SETTING = "fuselab.setting"  # trial: "fusion.alignment=dtw, fusion.fusion=mince"
ATTR_ERROR = "fuselab.error"  # trial: "ValueError: ..." when the trial raised
ATTR_RUN_ID = "fuselab.mlflow_run_id"  # trial: its MLflow run
ATTR_WORKER = "fuselab.worker"  # trial: the worker that ran it
ATTR_SPEC_HASH = "fuselab.spec_hash"  # study: identity of the spec + overrides it was created with
ATTR_GRID_SIZE = "fuselab.grid_size"  # study: set once the grid is queued
ATTR_OBJECTIVE = "fuselab.objective"  # study: {"metric": ..., "direction": ...}
ATTR_SEARCH_SPACE = "fuselab.search_space"  # study: searched param names, in spec order
ATTR_HELDOUT = "fuselab.heldout"  # study: the chosen setting on the test split (studies.heldout)
