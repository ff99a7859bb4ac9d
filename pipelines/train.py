"""`mlflow run . -e train -P overrides="..."`: compose the config and run the train stage."""

import sys

from prefsculpt.cli import main

if __name__ == "__main__":
    sys.exit(main(stage="train"))
