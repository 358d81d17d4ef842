"""Run the CLI under torchrun with --out made per process (OUT/rank<RANK>): whatever appears under
OUT/rank1 was written by a process that is not rank 0, which must write nothing."""

import os
import sys

from pipeline.cli import main

args = sys.argv[1:]
at = args.index("--out") + 1
args[at] = os.path.join(args[at], f"rank{os.environ.get('RANK', '0')}")
main(args)
