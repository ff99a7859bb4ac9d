"""`mlflow run . -e audit -P overrides="..."`: compose the config and run the audit stage."""

import sys

from prefsculpt.cli import main

if __name__ == "__main__":
    sys.exit(main(stage="audit"))
