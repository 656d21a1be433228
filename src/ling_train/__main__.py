"""`python -m ling_train ...`: what torchrun users type (`torchrun ... -m ling_train ...`)."""

import sys

from ling_train.cli import main

sys.exit(main())
