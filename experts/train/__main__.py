"""``python -m experts.train svf --task gsm8k --data DIR ...`` (same flags as ``t2serve train``)."""
import sys

from experts.commands import train_main

sys.exit(train_main())
