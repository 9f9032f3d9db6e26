from prunec.cli import main

raise SystemExit(main())
