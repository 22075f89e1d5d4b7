"""``python -m experts.eval --task gsm8k --strategy base --data DIR`` (same flags as ``t2serve eval``)."""
import sys

from experts.eval.cli import main

sys.exit(main())
