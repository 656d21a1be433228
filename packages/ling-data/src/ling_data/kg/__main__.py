import sys

from ling_data.kg.cli import main

sys.exit(main())
