from darkspec.cli import main

raise SystemExit(main())
