"""The toy world: a seeded generator of captioned scenes, the Stable Diffusion pipeline pretrained on it (the
trainer's embedded base, through `preset.PRESET`), and a metric network that reads scenes back (the DINO / CLIP analogue), so that
subject fidelity, prompt fidelity and prior drift are numbers anyone can rerun.

    world.py     attributes, scenes, captions, subjects          render.py    PIL drawing (deterministic)
    tokenizer.py the CLIP vocabulary (every grammar word a token) models.py    the pipeline's model configs
    metric.py    the metric network and subject identification    pretrain.py  staged, resumable pretraining
    gate.py      the pipeline's quality gate                      assets.py    shipped files and grids
    evaluate.py  subject identification of a DreamBooth run       measure.py   its command line, on other seeds
    preset.py    the trainer's preset (entry point ``svdiff_trainer.presets``): defaults, subject, evaluator
"""
