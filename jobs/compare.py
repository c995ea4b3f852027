"""`ray job submit --working-dir . -- python jobs/compare.py [--config FILE] [compare flags]`"""

import sys

from distalign_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
