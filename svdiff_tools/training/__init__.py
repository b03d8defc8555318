"""The DreamBooth trainer's pieces: flags, data, checkpoints, model card."""
