"""raycv: Ray-orchestrated cross-validation and hyperparameter search for BERT-family regressors.

Data flow, one module each:
config -> data (folds) -> train_fold (plain PyTorch) -> worker (Ray Train) -> sweep (Ray Tune)
-> collect (out-of-fold predictions) -> report.
"""

__version__ = "0.1.0"


class RaycvError(Exception):
    """A problem with the user's input. The CLI prints it as one line and exits with status 2."""


def write_atomic(path, write) -> None:
    """Call `write(tmp_path)` and rename the result onto `path`, so a failure leaves nothing half-written."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
