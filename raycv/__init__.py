"""raycv: Ray-orchestrated cross-validation and hyperparameter search for BERT-family regressors.

Data flow, one module each:
config -> data (folds, tokens) / model -> train_fold (plain PyTorch) -> worker (Ray Train) -> sweep (Ray
Tune) -> collect (out-of-fold predictions) -> report; below them all, storage (the run's files) and scoring
(RMSEs), and progress (the two progress lines).
"""

__version__ = "0.1.0"


class RaycvError(Exception):
    """A problem with the user's input. The CLI prints it as one line and exits with status 2."""
