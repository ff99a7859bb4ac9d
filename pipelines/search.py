"""`mlflow run . -e search -P overrides="..."`: compose the config and run the search stage."""

import sys

from prefsculpt.cli import main

if __name__ == "__main__":
    sys.exit(main(stage="search"))
