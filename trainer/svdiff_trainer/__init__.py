"""svdiff-trainer: the DreamBooth trainer (`dreambooth.main`, run as ``accelerate launch train_dreambooth.py``) and
its pieces: flags, data, backends, loss, checkpoints, validation, model card; `presets` is its one plug-in point
for embedded base models and evaluators (docs/architecture.md)."""
