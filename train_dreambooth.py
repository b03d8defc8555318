#!/usr/bin/env python
"""DreamBooth with spectral adapters (SVDiff, SVFit, SVFT, VectorFit), or PEFT LoRA / PiSSA for comparison.

    accelerate launch train_dreambooth.py --method svfit            # the embedded base + its example subject
    accelerate launch train_dreambooth.py --method svdiff --pretrained_model_name_or_path <hub id or folder> \
        --instance_data_dir ./dog --instance_prompt "a photo of sks dog" --output_dir out

The trainer is the `svdiff_trainer` package (`svdiff_trainer.dreambooth`); this script is its command line, named
as diffusers names its training scripts. `--help` lists every flag.
"""

import sys

from svdiff_trainer.dreambooth import main, parse_args  # noqa: F401  (parse_args: the tests' entry)

if __name__ == "__main__":
    sys.exit(main())
