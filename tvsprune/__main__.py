import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while the command line tool itself imports
    print("tvsprune: error: interrupted; nothing was written", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
