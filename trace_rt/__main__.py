from trace_rt.cli import main

raise SystemExit(main())
