"""`python -m digitlab ...` (also what `torchrun -m digitlab` runs)."""

from digitlab.cli import main

raise SystemExit(main())
