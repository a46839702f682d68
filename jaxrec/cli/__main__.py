import sys

from jaxrec.cli import main

sys.exit(main())
