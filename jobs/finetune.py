"""`ray job submit --working-dir . -- python jobs/finetune.py --dataset NAME --output DIR [flags]`"""

import sys

from distalign_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
