from aioqueue.cli import main

raise SystemExit(main())
