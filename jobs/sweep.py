"""`ray job submit --working-dir . -- python jobs/sweep.py --dataset NAME [sweep flags]`"""

import sys

from distalign_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
