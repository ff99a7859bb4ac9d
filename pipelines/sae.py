"""`mlflow run . -e sae -P overrides="..."`: compose the config and run the sae stage."""

import sys

from prefsculpt.cli import main

if __name__ == "__main__":
    sys.exit(main(stage="sae"))
