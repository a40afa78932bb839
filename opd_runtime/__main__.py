import sys

from .cli import main

# The guard matters: vLLM's engine starts worker processes that may re-import the main module.
if __name__ == "__main__":
    sys.exit(main())
