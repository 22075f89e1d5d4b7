"""``python -m experts.train svf --task gsm8k --data DIR ...`` (same flags as ``t2serve train``)."""
import sys

from experts.train.lifeline import die_with_parent

die_with_parent()  # started by a server: never outlive it

from experts.commands import train_main  # noqa: E402  (after the tie to the server: imports take seconds)

sys.exit(train_main())
