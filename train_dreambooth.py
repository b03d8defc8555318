#!/usr/bin/env python
"""DreamBooth trainer for SVD adapters (issue 4). Not built yet: this stub says so and exits non-zero."""

import sys

if __name__ == "__main__":
    sys.exit("train_dreambooth.py is not implemented yet (issue 4); the core API in svdiff_tools is ready.")
