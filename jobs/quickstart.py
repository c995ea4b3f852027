"""`ray job submit --working-dir . -- python jobs/quickstart.py [--config FILE] [quickstart flags]`"""

import sys

from distalign_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["quickstart", *sys.argv[1:]]))
