"""`mlflow run . -e evaluate -P overrides="..."`: compose the config and run the evaluate stage."""

import sys

from prefsculpt.cli import main

if __name__ == "__main__":
    sys.exit(main(stage="evaluate"))
