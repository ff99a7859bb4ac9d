"""`mlflow run . -e promote -P overrides="..."`: compose the config and run the promote stage."""

import sys

from prefsculpt.cli import main

if __name__ == "__main__":
    sys.exit(main(stage="promote"))
