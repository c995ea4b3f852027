"""`ray job submit --working-dir . -- python jobs/estimate.py --dataset NAME [estimate flags]`"""

import sys

from distalign_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["estimate", *sys.argv[1:]]))
