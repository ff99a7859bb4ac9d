"""`mlflow run . -e review -P overrides="..."`: compose the config and serve the review page of an audit run."""

import sys

from prefsculpt.cli import main

if __name__ == "__main__":
    sys.exit(main(stage="review"))
