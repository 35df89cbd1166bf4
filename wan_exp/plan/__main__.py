"""``python -m wan_exp.plan``: see wan_exp.plan.run."""

import sys

from wan_exp.plan.run import main

sys.exit(main())
