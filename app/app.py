"""`python app/app.py [RUN] [--index DIR] ...`: the same as `mmcl app` (see `mmcl app --help`)."""

import sys

from mmcl.cli import main

if __name__ == "__main__":
    sys.exit(main(["app", *sys.argv[1:]]))
