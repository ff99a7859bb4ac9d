"""`mlflow run . -e main -P overrides="..."`: compose the config and run the main stage."""

import sys

from prefsculpt.cli import main

if __name__ == "__main__":
    sys.exit(main(stage="main"))
