import sys

from neuralreg.cli import main

sys.exit(main())
