"""`mlflow run . -e prepare -P overrides="..."`: compose the config and run the prepare stage."""

import sys

from prefsculpt.cli import main

if __name__ == "__main__":
    sys.exit(main(stage="prepare"))
