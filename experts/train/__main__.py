"""``python -m experts.train svf --task gsm8k --data DIR ...`` (same flags as ``t2serve train``)."""
import sys

from experts.train.cli import main

sys.exit(main())
