import sys

from robustdet.cli import main

sys.exit(main())
